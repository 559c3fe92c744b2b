"""`sdtune data index`: a manifest for shards made elsewhere, resumable after a SIGKILL, and written into an s3://
prefix for shards that only live there; `verify` then checks them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from data_tools.index import index
from data_tools.remote import verify
from data_tools.shard_sink import TarSampleWriter
from sdtune.data.manifest import MANIFEST_NAME
from sdtune.storage.settings import S3Settings
from tests.helpers.corpus import encode, write_foreign_corpus
from tests.helpers.runs import REPO


def _many_shards(folder: Path, num_shards: int = 24, per_shard: int = 12) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(num_shards):
        writer = TarSampleWriter(folder / f"part-{shard:04d}.tar")
        for i in range(per_shard):
            pixels = rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)
            writer.write({"__key__": f"{shard:04d}{i:04d}", "png": encode(Image.fromarray(pixels), "PNG"), "txt": "x"})
        writer.close()


def test_index_resumes_after_a_kill(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    _many_shards(shards)
    partial = shards / f".{MANIFEST_NAME}.partial.jsonl"
    command = [sys.executable, "-m", "sdtune", "data", "index", "--shards", str(shards), "--num_workers", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
            assert process.poll() is None, f"index ended before the kill: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (shards / MANIFEST_NAME).exists(), "the manifest is written last"
    done_before = len(partial.read_text().splitlines())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reused = int(result.stdout.split(" shard(s) (")[1].split(" from an earlier run")[0])
    assert 3 <= reused <= done_before and reused < 24
    assert not partial.exists()
    resumed = json.loads((shards / MANIFEST_NAME).read_text())
    (shards / MANIFEST_NAME).unlink()
    fresh = index(str(shards), num_workers=2)
    assert resumed["num_samples"] == fresh.num_samples == 24 * 12
    assert [s["sha256"] for s in resumed["shards"]] == [s.sha256 for s in fresh.shards]


def test_index_in_s3_prefix_then_verify(tmp_path: Path, s3_settings: S3Settings, s3_bucket: str) -> None:
    corpus = write_foreign_corpus(tmp_path / "foreign", tmp_path / "unpickled.txt")
    client = boto3.client("s3", endpoint_url=s3_settings.endpoint_url, region_name="us-east-1")
    for shard in sorted(corpus.folder.glob("*.tar")):
        client.upload_file(str(shard), s3_bucket, f"scraped/{shard.name}")
    with pytest.raises(FileNotFoundError, match="no manifest; write one with `sdtune data index --shards"):
        verify(f"s3://{s3_bucket}/scraped", s3=s3_settings)
    manifest = index(f"s3://{s3_bucket}/scraped", resolution=64, s3=s3_settings)
    assert manifest.num_samples == 24 and manifest.skipped == corpus.skipped and manifest.converted == corpus.converted
    remote = json.loads(client.get_object(Bucket=s3_bucket, Key=f"scraped/{MANIFEST_NAME}")["Body"].read())
    assert remote["num_samples"] == 24 and remote["checks"]["min_side"] == 32
    assert [len(s["bad"]) for s in remote["shards"]] == [7, 6, 0] and remote["shards"][2]["truncated"]
    assert len(verify(f"s3://{s3_bucket}/scraped", s3=s3_settings)["ok"]) == 3
    assert not corpus.marker.exists()


def test_manifest_kept_apart_from_read_only_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`index --out DIR` for shards that cannot take a manifest (a read-only hf:// dataset); `data.manifest` points
    training at it, so nothing is counted at start."""
    from sdtune.data.datamodule import ShardDataModule

    monkeypatch.chdir(tmp_path)  # without a trainer, a count at start is kept under ./data_index
    corpus = write_foreign_corpus(tmp_path / "foreign", tmp_path / "unpickled.txt")
    index(str(corpus.folder), out=tmp_path / "kept", resolution=64)
    assert not (corpus.folder / MANIFEST_NAME).exists() and (tmp_path / "kept" / MANIFEST_NAME).exists()

    def setup(**options: object) -> ShardDataModule:
        datamodule = ShardDataModule(str(corpus.folder), batch_size=4, num_workers=0, resolution=64, **options)
        datamodule.setup("fit")
        return datamodule

    with caplog.at_level("WARNING"):
        counted = setup()
    assert "no manifest.json" in caplog.text and (tmp_path / "data_index").is_dir()
    caplog.clear()
    with caplog.at_level("WARNING"):
        kept = setup(manifest=str(tmp_path / "kept" / MANIFEST_NAME))
    assert "counting valid samples" not in caplog.text
    assert kept.train_stream.shards == counted.train_stream.shards and kept.train_stream.num_valid == 24
    with pytest.raises(FileNotFoundError, match="data.manifest: .* not found"):
        setup(manifest=str(tmp_path / "nowhere.json"))
