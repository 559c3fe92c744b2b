"""Measure remote storage: the shard loader from S3 against local disk, and what checkpoint publishing costs training.

    python -m sdtune.bench_remote --endpoint_url https://<account>.r2.cloudflarestorage.com --bucket my-bucket
    make bench-remote    # the same against a local S3 server on 127.0.0.1 (scripts/local_s3.py, moto: dev extra)

loader:  images/s of the real ShardStream + DataLoader (decode, resize, augment) reading the same shards
         from a local folder and from s3:// (median of `repeats` epochs each), and their ratio.
publish: a quickstart training run that publishes every epoch's checkpoint to s3://; per checkpoint, the
         seconds training blocked (snapshot + queue) against the upload's own duration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import auto_cli
from torch.utils.data import DataLoader

from data_tools.make_shards import make_shards
from data_tools.remote import upload
from data_tools.synth import synth
from sdtune.checkpoint.publish import PUBLISH_LOG
from sdtune.data.decode import ImageLimits
from sdtune.data.plan import ShardInfo
from sdtune.data.stream import SampleTransform, ShardStream
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings

REPO = Path(__file__).resolve().parents[1]


def loader_rate(
    urls: list[str], counts: list[int], resolution: int, workers: int, repeats: int, storage: Storage
) -> float:
    transform = SampleTransform(resolution=resolution, limits=ImageLimits(min_side=resolution // 2, max_pixels=10**8))
    stream = ShardStream(
        [ShardInfo.all_valid(u, c) for u, c in zip(urls, counts, strict=True)],
        batch_size=8,
        num_workers=workers,
        rank=0,
        world_size=1,
        transform=transform,
        storage=storage,
    )
    loader = DataLoader(stream, batch_size=8, num_workers=workers, persistent_workers=False)
    rates = []
    for _ in range(repeats):
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch["caption"])
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_loader(
    shards: Path, s3_prefix: str, resolution: int, workers: int, repeats: int, storage: Storage
) -> dict[str, float]:
    upload(shards, s3_prefix, read_back=False, s3=storage.s3)
    local_urls, remote_urls = storage.expand_urls(str(shards)), storage.expand_urls(s3_prefix)
    by_name = {s["name"]: s["num_samples"] for s in json.loads((shards / "manifest.json").read_text())["shards"]}
    counts = [by_name[os.path.basename(u)] for u in local_urls]
    local = loader_rate(local_urls, counts, resolution, workers, repeats, storage)
    remote = loader_rate(remote_urls, counts, resolution, workers, repeats, storage)
    return {"local_img_s": round(local, 1), "s3_img_s": round(remote, 1), "s3_over_local": round(remote / local, 3)}


def bench_publish(shards: Path, s3_prefix: str, workdir: Path, endpoint_url: str | None, epochs: int) -> dict[str, Any]:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(default_root_dir=str(workdir / "run"), logger=False, enable_progress_bar=False)
    config["trainer"]["max_epochs"] = epochs
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("PeriodicCheckpoint"):
            callback["init_args"]["remote"] = f"{s3_prefix}/checkpoints"
    config["data"]["init_args"]["shards"] = str(shards)
    config["s3"] = {"endpoint_url": endpoint_url}
    path = workdir / "publish.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(path)], check=True, cwd=REPO,
                   env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True)  # fmt: skip
    records = [json.loads(line) for line in (workdir / "run" / "checkpoints" / PUBLISH_LOG).read_text().splitlines()]
    blocked = [r["blocked_s"] for r in records if r["event"] == "checkpoint"]  # training's wait per checkpoint
    uploads = [r for r in records if r["event"] == "publish"]
    return {
        "train_wall_s": round(time.perf_counter() - start, 1),
        "checkpoints": len(uploads),
        "checkpoint_mb": round(statistics.mean(r["bytes"] for r in uploads) / 1e6, 1),
        "blocked_per_checkpoint_s": [round(b, 3) for b in blocked],
        "upload_s": [round(r["upload_s"], 3) for r in uploads],
        "wait_at_end_s": round(sum(r["blocked_s"] for r in records if r["event"] == "wait"), 3),
        "errors": [r["error"] for r in uploads if r["error"]],
    }


def main(
    endpoint_url: str,
    bucket: str,
    create_bucket: bool = False,
    num_images: int = 256,
    resolution: int = 512,
    workers: int = 2,
    repeats: int = 3,
    mode: str = "all",
    publish_epochs: int = 3,
) -> dict[str, Any]:
    """
    Args:
        endpoint_url: S3/R2 endpoint, e.g. https://<account>.r2.cloudflarestorage.com.
        bucket: Bucket to write a temporary prefix into.
        create_bucket: Create the bucket first (a local test server starts empty).
        num_images: Synthetic images in the loader benchmark's dataset.
        resolution: Their size in pixels (512: real fine-tuning shard sizes, ~0.1 MB per image).
        workers: DataLoader workers.
        repeats: Epochs per loader measurement (median reported).
        mode: all, loader or publish.
        publish_epochs: Epochs (one checkpoint each) of the quickstart run that publishes.
    """
    storage = Storage(S3Settings(endpoint_url=endpoint_url))
    if create_bucket:
        _create_bucket(endpoint_url, bucket)
    prefix = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}"
    report: dict[str, Any] = {"endpoint": endpoint_url}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if mode in ("all", "loader"):
            synth(work / "images", num_images=num_images, size=resolution, seed=0)
            make_shards(work / "images", work / "shards", resolution=resolution, samples_per_shard=num_images // 8)
            report["loader"] = bench_loader(work / "shards", f"{prefix}/dataset", resolution, workers, repeats, storage)
        if mode in ("all", "publish"):
            synth(work / "small", num_images=64, size=64, seed=0)
            make_shards(work / "small", work / "small_shards", resolution=64, samples_per_shard=16)
            report["publish"] = bench_publish(work / "small_shards", prefix, work, endpoint_url, publish_epochs)
    print(json.dumps(report, indent=2))
    return report


def _create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)


if __name__ == "__main__":
    auto_cli(main, as_positional=False, allow_abbrev=False)
