"""Count the valid samples of shards written anywhere (img2dataset, webdataset, an older tool): the
loader's own checks, run once per shard, give the per-shard counts and bad-sample positions that exact
epochs need (`sdtune.data.plan`).

`index_shards` is resumable: each shard's result is appended to a JSONL file as it finishes, keyed by the
shard's fingerprint (size and mtime, or ETag), and a shard whose fingerprint still matches is not read
again. `data index` turns the results into `manifest.json`; training without a manifest keeps them in the
run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from sdtune.data.decode import (
    IMAGE_EXTS,
    LABEL_EXT,
    LATENT_EXTS,
    WANTED_EXTS,
    BadSample,
    ImageLimits,
    decode_caption,
    decode_image_converted,
)
from sdtune.data.manifest import DatasetManifest, ShardEntry
from sdtune.data.tar_stream import RawSample, iter_tar_samples
from sdtune.storage import Storage

log = logging.getLogger(__name__)
CHECKS_VERSION = 2  # bump when a check changes what counts as valid: older results are then redone


def checks_of(limits: ImageLimits) -> dict:
    """The settings a count holds for; a manifest made with other ones is recounted by training."""
    return {"version": CHECKS_VERSION, "min_side": limits.min_side, "max_pixels": limits.max_pixels}


def check_sample(raw: RawSample, limits: ImageLimits) -> str | None:
    """The loader's checks in the loader's order (caption, then latents or image); raises BadSample,
    returns the image's conversion kind."""
    decode_caption(raw)
    if any(ext in raw for ext in LATENT_EXTS):
        from sdtune.data.latents import decode_latents  # torch and diffusers only for latent shards

        decode_latents(raw)
        return None
    return decode_image_converted(raw, limits)[1]


class _HashingReader:
    """Reads a stream and hashes every byte read; `finish()` reads the rest (tar padding) and returns
    (sha256, bytes)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._hash.update(data)
        self.num_bytes += len(data)
        return data

    def finish(self) -> tuple[str, int]:
        while self.read(1 << 20):
            pass
        return self._hash.hexdigest(), self.num_bytes


@dataclass
class ShardScan:
    """What one shard holds, as the loader sees it."""

    entry: ShardEntry
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)  # samples holding each kind of member
    labels: list[int] = field(default_factory=list)  # distinct `.cls` values seen

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardScan:
        return cls(**data | {"entry": ShardEntry(**data["entry"])})


def _member_kinds(raw: RawSample) -> list[str]:
    kinds = [ext for ext in ("txt", "json", LABEL_EXT) if ext in raw]
    if any(ext in raw for ext in IMAGE_EXTS):
        kinds.append("image")
    if any(ext in raw for ext in LATENT_EXTS):
        kinds.append("latent")
    return kinds


def scan_shard(url: str, storage: Storage, limits: ImageLimits) -> ShardScan:
    """Read one shard once: sha256 and size of the file, and every sample through the loader's checks."""
    fingerprint = storage.fingerprint(url)
    errors: dict[str, int] = {}
    bad: list[list] = []
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    members: Counter[str] = Counter()
    labels: set[int] = set()
    num_raw = 0
    with storage.open_read(url) as stream:
        reader = _HashingReader(stream)
        for position, raw in enumerate(iter_tar_samples(reader, url, WANTED_EXTS, errors)):  # type: ignore[arg-type]
            num_raw = position + 1
            members.update(_member_kinds(raw))
            label = raw.get(LABEL_EXT)
            if isinstance(label, bytes) and label.strip().isdigit():
                labels.add(int(label))
            try:
                kind = check_sample(raw, limits)
            except BadSample as err:
                bad.append([position, err.reason])
                skipped[err.reason] += 1
                continue
            if kind is not None:
                converted[kind] += 1
        sha256, num_bytes = reader.finish()
    for reason, number in errors.items():
        skipped[reason] += number
    entry = ShardEntry(
        name=os.path.basename(url),
        num_samples=num_raw - len(bad),
        sha256=sha256,
        num_bytes=num_bytes,
        num_raw=num_raw,
        bad=bad,
        truncated=bool(errors.get("truncated_shard")),
    )
    return ShardScan(entry, fingerprint, dict(skipped), dict(converted), dict(members), sorted(labels))


class ScanLog:
    """Per-shard results appended as JSON lines, keyed by shard name, for the checks they were made with
    (`writable` False: only read, e.g. on ranks other than 0)."""

    def __init__(self, path: Path, checks: dict, writable: bool = True) -> None:
        self.path = path
        self.checks = checks
        self.writable = writable
        self.done: dict[str, ShardScan] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if record.get("checks") == checks:
                        scan = ShardScan.from_json(record["scan"])
                        self.done[scan.entry.name] = scan
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill, or from another version: that shard is read again

    def get(self, name: str, fingerprint: str) -> ShardScan | None:
        scan = self.done.get(name)
        return scan if scan is not None and scan.fingerprint == fingerprint else None

    def add(self, scan: ShardScan) -> None:
        known = self.done.get(scan.entry.name)
        if known is not None and known.fingerprint == scan.fingerprint or not self.writable:
            return
        self.done[scan.entry.name] = scan
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"checks": self.checks, "scan": scan.to_json()}) + "\n")


def index_shards(
    urls: list[str],
    storage: Storage,
    limits: ImageLimits,
    done: ScanLog | None,
    num_threads: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[ShardScan]:
    """Scan every shard not already in `done` with a matching fingerprint; results in `urls` order."""
    names = [os.path.basename(u) for u in urls]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.shards: shard names must be unique, found {duplicates[:3]} more than once")
    results: dict[str, ShardScan] = {}
    todo: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for url, fingerprint in zip(urls, pool.map(storage.fingerprint, urls), strict=True):
            cached = done.get(os.path.basename(url), fingerprint) if done is not None else None
            if cached is not None:
                results[url] = cached
            else:
                todo.append(url)
        # Threads: Pillow decodes and hashlib hashes without holding the GIL.
        for number, scan in enumerate(pool.map(lambda u: scan_shard(u, storage, limits), todo), start=1):
            if done is not None:
                done.add(scan)
            results[todo[number - 1]] = scan
            if progress is not None:
                progress(number, len(todo))
    return [results[u] for u in urls]


def manifest_of(scans: list[ShardScan], limits: ImageLimits) -> DatasetManifest:
    """The dataset manifest for scanned shards, with what they hold (content, caption source, classes)."""
    skipped: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    members: Counter[str] = Counter()
    labels: set[int] = set()
    for scan in scans:
        skipped.update(scan.skipped)
        converted.update(scan.converted)
        members.update(scan.members)
        labels.update(scan.labels)
    caption_source = "+".join(ext for ext in ("txt", "json") if members.get(ext)) or None
    return DatasetManifest(
        shards=[scan.entry for scan in scans],
        skipped={k: skipped[k] for k in sorted(skipped)},
        classes=[str(i) for i in range(max(labels) + 1)] if labels else None,
        checks=checks_of(limits),
        converted=dict(sorted(converted.items())),
        caption_source=caption_source,
        content="latents" if members.get("latent") else "images",
    )
