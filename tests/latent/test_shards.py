"""Latent shards: resumable encoding, refusal of mismatched caches, SD fine-tuning from latents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_tools.encode_latents import encode_latents
from data_tools.make_shards import make_shards
from data_tools.synth import synth
from sdtune.data.datamodule import ShardDataModule
from sdtune.data.decode import WANTED_EXTS, ImageLimits, decode_image, resize_crop_flip
from sdtune.data.latents import LatentSettings, decode_latents, encode
from sdtune.data.tables import read_table
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.models.components import load_vae
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings
from tests.helpers.assertions import read_losses
from tests.helpers.runs import REPO, run_train, train_config


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 synthetic shapes (3 classes) at 64 px in 12 shards of 8."""
    root = tmp_path_factory.mktemp("labelled")
    synth(root / "images", num_images=96, size=64, seed=1, class_folders=True)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=8, class_folders=True)
    return root / "shards"


def _samples(folder: Path) -> dict[str, dict]:
    samples = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        with tar.open("rb") as f:
            for raw in iter_tar_samples(f, str(tar), WANTED_EXTS, {}):
                key = f"{tar.name}/{raw['__key__']}"
                assert key not in samples, f"{key} twice"
                samples[key] = {ext: value for ext, value in raw.items() if ext != "__shard__"}
    return samples


def test_killed_encoding_resumes_without_repeating_or_missing_a_sample(labelled_shards: Path, tmp_path: Path) -> None:
    reference = encode_latents(str(labelled_shards), str(tmp_path / "reference"), batch_size=2, flip=True)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_tools", "encode_latents", "--source", str(labelled_shards)]
    command += ["--out", str(out), "--batch_size", "2", "--flip", "true"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress.json"
    deadline = time.monotonic() + 120
    while not (progress.exists() and json.loads(progress.read_text())["done"]):
        assert process.poll() is None, "encoding ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    done_before = json.loads(progress.read_text())["done"]
    assert 1 <= len(done_before) < 12 and not (out / "manifest.json").exists()
    times_before = {name: (out / name).stat().st_mtime_ns for name in done_before}

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done_before)} of 12 shards already encoded; encoding {12 - len(done_before)}" in rerun.stderr
    assert rerun.stderr.count("encoded shard-") == 12 - len(done_before)
    # Finished shards were not rewritten; every sample's members are bitwise the uninterrupted run's.
    assert {name: (out / name).stat().st_mtime_ns for name in done_before} == times_before
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [s.name for s in reference.shards]
    samples, expected = _samples(out), _samples(tmp_path / "reference")
    assert manifest["num_samples"] == 96 and len(samples) == 96  # 96 distinct keys
    assert samples == expected
    assert manifest["classes"] == ["circle", "square", "triangle"]
    assert not (out / ".staging").exists()


def test_latents_are_the_scaled_posterior_mean_of_the_center_crop(labelled_shards: Path, tmp_path: Path) -> None:
    manifest = encode_latents(str(labelled_shards), str(tmp_path / "lat"), flip=True, file_format="safetensors")
    settings = LatentSettings.from_json(manifest.latents)
    assert settings.latent_shape == (4, 32, 32) and settings.vae == "tiny" and settings.crop == "center"
    vae = load_vae("tiny").eval()
    images, latents = _samples(labelled_shards), _samples(tmp_path / "lat")
    key = sorted(images)[5]
    pixels = resize_crop_flip(
        decode_image(images[key], ImageLimits(1, 10**8)), 64, np.random.default_rng(0), False, 0.0
    )[None]
    latent, flipped = decode_latents(latents[key])
    expected = encode(vae, pixels, settings)[0]
    assert torch.allclose(latent, expected, atol=2e-3 * expected.abs().max())  # stored as float16
    expected_flip = encode(vae, torch.flip(pixels, dims=[3]), settings)[0]
    assert flipped is not None and torch.allclose(flipped, expected_flip, atol=2e-3 * expected.abs().max())
    assert latents[key]["cls"] == images[key]["cls"] and latents[key]["txt"] == images[key]["txt"]
    table = read_table(str(tmp_path / "lat"), "test", Storage())
    assert table.inputs.shape == (96, 4, 32, 32) and table.classes == ["circle", "square", "triangle"]


def test_a_cache_made_with_other_settings_is_refused(labelled_shards: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "lat")
    encode_latents(str(labelled_shards), out)
    with pytest.raises(ValueError, match=r"other settings \(resolution: 64 -> 32.*latent_shape"):
        encode_latents(str(labelled_shards), out, resolution=32)
    with pytest.raises(ValueError, match=r"flip: False -> True"):
        encode_latents(str(labelled_shards), out, flip=True)
    # Training refuses settings the cache cannot honour...
    for options, message in (
        ({"resolution": 32}, "encoded at 64"),
        ({"flip_prob": 0.5}, "no flipped latents"),
        ({"random_crop": True, "flip_prob": 0.0}, "center crops"),
    ):
        data = ShardDataModule(out, batch_size=2, num_workers=0, **({"resolution": 64, "flip_prob": 0.0} | options))
        with pytest.raises(ValueError, match=message):
            data.setup("fit")
    # ...and a model whose VAE is not the one the latents came from.
    from sdtune.models import SDFineTune

    model = SDFineTune(pretrained="tiny")
    data = ShardDataModule(out, batch_size=2, num_workers=0, resolution=64, flip_prob=0.0)
    data.setup("fit")
    data.latent_settings = LatentSettings(**{**vars(data.latent_settings), "scaling_factor": 0.5})
    model._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(ValueError, match="re-encode with this model's VAE"):
        model.setup("fit")


@pytest.mark.slow
def test_sd_finetune_trains_from_latent_shards(synth_shards: Path, tmp_path: Path) -> None:
    latents = tmp_path / "latents"
    encode_latents(str(synth_shards), str(latents), flip=True)
    run_dir = tmp_path / "run"
    callbacks = [{"class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint", "init_args": {"every_n_epochs": 1}}]
    config = train_config(run_dir, latents, callbacks=callbacks, max_epochs=1, data={"num_workers": 1})
    result = run_train(config)
    losses = read_losses(run_dir)
    assert len(losses) == 16 and all(np.isfinite(v).all() for v in losses.values())
    assert (run_dir / "checkpoints" / "epoch=0000-step=000016" / "manifest.json").exists()
    assert "Traceback" not in result.stderr


def test_encoding_streams_from_and_to_s3(labelled_shards: Path, s3_settings: S3Settings, s3_bucket: str) -> None:
    from data_tools.remote import upload

    upload(labelled_shards, f"s3://{s3_bucket}/images", s3=s3_settings)
    out = f"s3://{s3_bucket}/latents"
    manifest = encode_latents(f"s3://{s3_bucket}/images", out, batch_size=16, s3=s3_settings)
    assert manifest.num_samples == 96 and manifest.classes == ["circle", "square", "triangle"]
    table = read_table(out, "test", Storage(s3_settings))  # read straight from S3, like a classifier would
    assert table.inputs.shape == (96, 4, 32, 32) and table.latent_settings is not None
    again = encode_latents(
        f"s3://{s3_bucket}/images", out, batch_size=16, s3=s3_settings
    )  # all done: nothing re-encoded
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    with pytest.raises(ValueError, match="other settings"):
        encode_latents(f"s3://{s3_bucket}/images", out, dtype="float32", s3=s3_settings)
