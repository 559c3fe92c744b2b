"""`sdtune generate dataset` on tiny-pretrained and sklearn's digits: a run killed mid-way and rerun writes the same
shards as an uninterrupted one, byte for byte; held-out samples are never sources; the shards train a classifier
through the shipped pixel CNN config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from sdtune.data.tables import heldout_split, read_table
from sdtune.storage import Storage
from tests.helpers.runs import REPO, run_train, train_env

pytestmark = pytest.mark.slow


def command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdtune", "generate", "dataset", "--source", str(source), "--out", str(out),
            "--per_class", "4", "--samples_per_shard", "8", "--steps", "6", "--prompt_template",
            "a handwritten digit {label}", *extra]  # fmt: skip


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_a_killed_run_resumes_to_the_same_shards_and_they_train_a_classifier(
    digit_data: tuple[Path, Path], tmp_path: Path
) -> None:
    source, _ = digit_data
    whole = subprocess.run(command(source, tmp_path / "whole"), cwd=REPO, env=train_env(), capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = shard_bytes(tmp_path / "whole")
    assert len(expected) == 5  # 10 classes x 4 samples, 8 per shard

    # Killed once the first shard is recorded (while it makes the next), then rerun.
    cut = tmp_path / "cut"
    process = subprocess.Popen(command(source, cut), cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (cut / "progress.json").is_file() or not json.loads((cut / "progress.json").read_text())["done"]:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (cut / "manifest.json").exists(), "killed before the end: no manifest"
    done_before = set(json.loads((cut / "progress.json").read_text())["done"])
    assert 1 <= len(done_before) < 5
    rerun = subprocess.run(command(source, cut), cwd=REPO, env=train_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shard_bytes(cut) == expected, "same keys and bytes as the uninterrupted run"
    assert not (cut / ".staging").exists()
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert manifest == json.loads((tmp_path / "whole" / "manifest.json").read_text())

    # Other settings into the same folder are refused in one line.
    other = subprocess.run(command(source, cut, "--strength", "0.9"), cwd=REPO, env=train_env(), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert other.returncode == 2 and "holds shards made with other settings" in other.stderr, other.stderr[-2000:]

    # Provenance; sources come from the training split only (the held-out images stay unseen).
    generated = read_table(str(cut), "generated", Storage())
    assert len(generated) == 40 and generated.classes == manifest["classes"]
    table = read_table(str(source), "source", Storage())
    _, held_out = heldout_split(table.keys, table.labels, 0.2, 0)
    held_out_keys = {table.keys[i] for i in held_out}
    with tarfile.open(cut / "shard-000000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert records and all(r["method"] == "interpolate" and len(r["source_keys"]) == 2 for r in records)
    assert not {k for r in records for k in r["source_keys"]} & held_out_keys
    assert all(r["prompt"] == f"a handwritten digit {r['class']}" for r in records)

    # The generated shards train a classifier through an existing config.
    config = yaml.safe_load((REPO / "configs" / "latent" / "pixel_cnn.yaml").read_text())
    config["trainer"].update(max_epochs=2, default_root_dir=str(tmp_path / "classifier"), enable_progress_bar=False)
    config["data"]["init_args"].update(shards=str(cut), batch_size=16)
    path = tmp_path / "classifier.yaml"
    path.write_text(yaml.safe_dump(config))
    run_train(path)
    results = json.loads((tmp_path / "classifier" / "metrics.json").read_text())
    assert results["classes"] == manifest["classes"] and results["num_train"] + results["num_heldout"] == 40
    assert 0.0 <= results["accuracy"] <= 1.0 and (tmp_path / "classifier" / "classifier" / "classifier.json").is_file()


def test_generated_shards_join_the_training_set_and_the_benchmark(
    digit_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from sdtune.latent.benchmark import benchmark
    from sdtune.latent.classification_data import ClassificationDataModule

    source, latents = digit_data
    made = subprocess.run(command(source, tmp_path / "made", "--max_train_per_class", "5"), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    data = ClassificationDataModule(str(source), generated=str(tmp_path / "made"), max_train_per_class=5, seed=0)
    data.setup("fit")
    inputs, labels = data.training_set()
    assert len(data.train) == 50 and len(labels) == 50 + 40 and inputs.shape[1:] == data.train.inputs.shape[1:]
    only = ClassificationDataModule(str(source), generated=str(tmp_path / "made"), synthetic_only=True)
    only.setup("fit")
    assert len(only.training_set()[1]) == 40, "generated only: no real training sample"
    wrong = ClassificationDataModule(str(latents), generated=str(tmp_path / "made"))
    with pytest.raises(ValueError, match="data.generated: .* holds images but data.shards latents"):
        wrong.setup("fit")
    rows = benchmark(str(latents), str(source), tmp_path / "bench", classifiers=("pixel_cnn",), augmentations=("none",),
                     seeds=(0,), steps=5, max_train_per_class=5, generated=str(tmp_path / "made"))  # fmt: skip
    assert [r["augmentation"] for r in rows] == ["none", "generated", "generated_only"]
    assert "| pixel_cnn | pixels |" in (tmp_path / "bench" / "benchmark.md").read_text()
