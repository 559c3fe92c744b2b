"""Shards written by the real img2dataset (installed from the package registry into its own venv, downloading
images served on 127.0.0.1): `data index` gives them a manifest, `verify` passes, `upload` copies them to the local
S3 server, and they train with 2 loader workers on 1 rank (from S3) and on 2 ranks (4 readers on one shard)."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.index import index
from data_tools.remote import upload, verify
from sdtune.storage.settings import S3Settings
from tests.helpers.runs import run_train, train_config, with_settings

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdtune-tests" / "img2dataset-venv"
NUM_IMAGES = 24


def img2dataset_command() -> Path:
    """img2dataset from the package registry, in a venv of its own (its pins must not touch the project's)."""
    program = VENV / "bin" / "img2dataset"
    if not program.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        install = subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], capture_output=True, text=True
        )
        assert install.returncode == 0, f"pip install img2dataset failed: {install.stderr[-2000:]}"
    return program


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """JPEGs of several sizes served by a real HTTP server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("web")
    (root / "img").mkdir()
    for i in range(NUM_IMAGES):
        size = (96 + 8 * (i % 3), 80 + 8 * (i % 4))
        pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.jpg", quality=90)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.fixture(scope="module")
def img2dataset_shards(image_server: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    url, root = image_server
    listing = root / "list.csv"
    listing.write_text("url,caption\n" + "".join(f"{url}/img/{i}.jpg,image number {i}\n" for i in range(NUM_IMAGES)))
    out = tmp_path_factory.mktemp("img2dataset") / "shards"
    result = subprocess.run(
        [
            str(img2dataset_command()),
            f"--url_list={listing}",
            "--input_format=csv",
            "--url_col=url",
            "--caption_col=caption",
            "--output_format=webdataset",
            f"--output_folder={out}",
            "--image_size=64",
            "--resize_mode=center_crop",
            "--processes_count=1",
            "--thread_count=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    return out


def _keys(run_dir: Path, rank: int) -> Counter:
    lines = (run_dir / "probe" / f"keys-rank{rank}.txt").read_text().splitlines()
    return Counter(line.split(" ", 1)[1] for line in lines)


def test_img2dataset_shards_index_verify_upload_and_train(
    img2dataset_shards: Path, s3_settings: S3Settings, s3_bucket: str, tmp_path: Path
) -> None:
    manifest = index(str(img2dataset_shards), resolution=64)
    assert manifest.num_samples == NUM_IMAGES and manifest.skipped == {} and manifest.caption_source == "txt+json"
    assert len(verify(str(img2dataset_shards))["ok"]) == 1
    remote = f"s3://{s3_bucket}/i2d"
    assert upload(img2dataset_shards, remote, s3=s3_settings) == {"uploaded": 1, "skipped_identical": 0}
    assert len(verify(remote, s3=s3_settings)["ok"]) == 1
    expected = {f"00000.tar/{i:09d}" for i in range(NUM_IMAGES)}

    def config(run_dir: Path, shards: str, **trainer: object) -> Path:
        probe = {"class_path": "tests.helpers.probes.KeyRecorder", "init_args": {"out_dir": str(run_dir / "probe")}}
        return train_config(
            run_dir, shards, callbacks=[probe], data={"num_workers": 2}, max_epochs=1, accelerator="cpu", **trainer
        )

    one_rank = tmp_path / "one-rank"
    run_train(with_settings(config(one_rank, remote), s3={"endpoint_url": s3_settings.endpoint_url}))
    assert _keys(one_rank, 0) == Counter(dict.fromkeys(expected, 1)), "each image once (24 = 2 readers x 3 x 4)"

    two_ranks = tmp_path / "two-ranks"
    result = run_train(config(two_ranks, str(img2dataset_shards), devices=2, strategy="ddp"))
    assert "data.remainder=wrap repeats 8 per epoch" in result.stderr
    both = _keys(two_ranks, 0) + _keys(two_ranks, 1)
    assert set(both) == expected and sum(both.values()) == 32, "4 readers x 2 batches x 4, all 24 images"
