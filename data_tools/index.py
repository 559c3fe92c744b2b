"""`index`: a manifest for shards written elsewhere (img2dataset, webdataset, another tool), so that
`verify`, `upload` and exact epochs work on them."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from sdtune.data.decode import ImageLimits
from sdtune.data.index import ScanLog, checks_of, index_shards, manifest_of
from sdtune.data.manifest import MANIFEST_NAME, DatasetManifest, dataset_url
from sdtune.storage import Storage, is_remote, join
from sdtune.storage.settings import S3Settings

log = logging.getLogger("data_tools")


def _scan_log_path(folder: str, out: Path | None) -> Path:
    """Local, beside the manifest, so a killed index resumes; remote datasets keep it in the user's cache."""
    if out is not None:
        return out / f".{MANIFEST_NAME}.partial.jsonl"
    if not is_remote(folder):
        return Path(folder) / f".{MANIFEST_NAME}.partial.jsonl"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdtune" / "index"
    return cache / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}.jsonl"


def index(
    shards: str,
    out: Path | None = None,
    resolution: int = 512,
    min_image_side: int | None = None,
    max_image_pixels: int = 64_000_000,
    num_workers: int = 4,
    s3: S3Settings | None = None,
) -> DatasetManifest:
    """Read every shard once with the loader's checks and write manifest.json (written last; resumable).

    The manifest lists each shard's valid samples, sha256 and size, the position and reason of every bad
    sample, skips and conversions per kind, and what the shards hold (images or latents, caption source,
    classes if `.cls` members exist). A local dataset gets it beside the shards, an s3:// one in its prefix.

    Args:
        shards: Shard folder, glob or brace pattern: local, s3:// or hf://.
        out: Local folder for manifest.json instead of the dataset's own folder (needed for read-only hf://).
        resolution: The training resolution the checks are for (the smallest side allowed is half of it).
        min_image_side: Smallest image side counted valid (default: resolution // 2), as data.min_image_side.
        max_image_pixels: Larger images are counted as too_large, as data.max_image_pixels.
        num_workers: Shards read in parallel (threads).
        s3: Settings for s3:// (endpoint, retries), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    urls = storage.expand_urls(shards)
    if not urls:
        raise ValueError(f"index --shards: no .tar shards match {shards!r}; check the path or pattern")
    limits = ImageLimits(
        min_side=resolution // 2 if min_image_side is None else min_image_side, max_pixels=max_image_pixels
    )
    folder = dataset_url(shards, storage)
    scan_log = ScanLog(_scan_log_path(folder, out), checks_of(limits))
    reused = len(scan_log.done)

    def progress(done: int, total: int) -> None:
        log.info("index: %d/%d shard(s) read", done, total)

    scans = index_shards(urls, storage, limits, scan_log, num_threads=num_workers, progress=progress)
    manifest = manifest_of(scans, limits)
    manifest.resolution = resolution
    if out is not None or not is_remote(folder):
        target = manifest.write(out if out is not None else Path(folder))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            manifest.write(Path(tmp))
            target = join(folder, MANIFEST_NAME)
            storage.upload(Path(tmp) / MANIFEST_NAME, target)
    scan_log.path.unlink(missing_ok=True)
    raw = sum(s.entry.total_raw for s in scans)
    print(
        f"{target}: {manifest.num_samples} valid of {raw} samples in {len(scans)} shard(s) "
        f"({min(reused, len(scans))} from an earlier run); skipped {dict(manifest.skipped) or 'none'}; "
        f"converted {manifest.converted or 'none'}; {manifest.content}, captions from {manifest.caption_source}"
    )
    return manifest
