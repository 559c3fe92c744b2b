"""`upload`: copy a local shard folder and its manifest to a storage URL; `verify`: check a dataset against it."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdtune.data.manifest import MANIFEST_NAME, DatasetManifest, read_manifest
from sdtune.fileio import sha256_stream
from sdtune.storage import Storage, join
from sdtune.storage.settings import S3Settings

log = logging.getLogger("data_tools")


def _remote_sha256(url: str, storage: Storage) -> tuple[str, int]:
    with storage.open_read(url) as f:
        return sha256_stream(f)


def _upload_one(path: Path, url: str, sha256: str, read_back: bool, storage: Storage) -> str:
    backend = storage.backend_for(url)
    head = backend.head(url) if hasattr(backend, "head") else None
    if head and head["bytes"] == path.stat().st_size and head["metadata"].get("sha256") == sha256:
        return "skipped_identical"
    storage.upload(path, url, {"sha256": sha256})
    if read_back:
        remote_sha, _ = _remote_sha256(url, storage)
        if remote_sha != sha256:
            raise OSError(f"{url}: sha256 after upload is {remote_sha}, the local file has {sha256}; upload again")
    return "uploaded"


def upload(
    source: Path, dest: str, num_workers: int = 8, read_back: bool = True, s3: S3Settings | None = None
) -> dict[str, int]:
    """Upload a shard folder (shards, then manifest.json last) to `dest`, e.g. `s3://bucket/datasets/my-set`.

    Files already there with the same size and sha256 (kept in the object's metadata) are skipped. Large
    files go as parallel multipart uploads (part size and parallelism: `--s3.*`).

    Args:
        source: Local folder written by `make_shards` (with manifest.json).
        dest: Destination folder/prefix URL.
        num_workers: Files uploaded in parallel.
        read_back: Read every uploaded file back and check its sha256.
        s3: Settings for s3:// (endpoint, retries, multipart), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    manifest_path = source / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path}: no manifest; for shards made elsewhere write one with `sdtune data index --shards "
            f"{source}`, or make the folder from images with `sdtune data make-shards --source <images> --out {source}`"
        )
    manifest = DatasetManifest.from_json(manifest_path.read_text(), str(manifest_path))
    for shard in manifest.shards:
        if not (source / shard.name).is_file():
            raise FileNotFoundError(f"{source / shard.name}: listed in the manifest but missing")
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(
            pool.map(
                lambda s: _upload_one(source / s.name, join(dest, s.name), s.sha256, read_back, storage),
                manifest.shards,
            )
        )
    storage.upload(manifest_path, join(dest, MANIFEST_NAME))  # last: the dataset exists once it is there
    counts = {key: results.count(key) for key in ("uploaded", "skipped_identical")}
    log.info("upload %s -> %s: %s", source, dest, counts)
    print(f"{dest}: {counts['uploaded']} shard(s) uploaded, {counts['skipped_identical']} already there")
    return counts


def verify(dataset: str, num_workers: int = 8, s3: S3Settings | None = None) -> dict[str, list[str]]:
    """Check every shard of a dataset (local or remote) against its manifest: present, size, sha256.

    Args:
        dataset: Folder/prefix URL holding manifest.json and the shards.
        num_workers: Shards read in parallel.
        s3: Settings for s3:// (endpoint, retries), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    manifest = read_manifest(dataset, storage)
    if manifest is None:
        raise FileNotFoundError(
            f"{join(dataset, MANIFEST_NAME)}: no manifest; write one with `sdtune data index --shards {dataset}`"
        )

    def check(shard) -> str:
        url = join(dataset, shard.name)
        try:
            sha, size = _remote_sha256(url, storage)
        except FileNotFoundError:
            return "missing"
        return "ok" if sha == shard.sha256 and size == shard.num_bytes else "mismatch"

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(pool.map(check, manifest.shards))
    report = {
        k: [s.name for s, r in zip(manifest.shards, results, strict=True) if r == k]
        for k in ("ok", "missing", "mismatch")
    }
    print(f"{dataset}: {len(report['ok'])} ok, {len(report['missing'])} missing, {len(report['mismatch'])} mismatched")
    for kind in ("missing", "mismatch"):
        for name in report[kind]:
            print(f"  {kind}: {name}")
    if report["missing"] or report["mismatch"]:
        raise SystemExit(1)
    return report
