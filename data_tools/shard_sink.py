"""Write samples into numbered WebDataset shards (each renamed into place when complete) plus a manifest."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from sdtune.data.manifest import DatasetManifest, ShardEntry
from sdtune.fileio import sha256_file


def encode_member(ext: str, value: Any) -> bytes:
    """A member's bytes: bytes as they are, text as UTF-8, `.json` values as JSON (as webdataset encodes them)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json":
        return json.dumps(value).encode("utf-8")
    raise ValueError(f"shard member .{ext}: cannot store a {type(value).__name__}; give bytes, str or (json) a dict")


class TarSampleWriter:
    """Writes samples as WebDataset tar members `<key>.<ext>` (extensions sorted, like webdataset's TarWriter).

    Plain `tarfile`: making shards needs neither torch nor webdataset (whose import loads torch)."""

    def __init__(self, path: Path) -> None:
        self._tar = tarfile.open(path, "w")

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = encode_member(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), time.time(), 0o444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


class ShardSink:
    """`write(sample)` fills `shard-000000.tar`, `shard-000001.tar`, ...; `close()` writes the manifest."""

    def __init__(self, out: Path, samples_per_shard: int, resolution: int | None = None) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
        self.out = out
        self.samples_per_shard = samples_per_shard
        self.resolution = resolution
        self.shards: list[ShardEntry] = []
        self._writer: TarSampleWriter | None = None
        self._num_in_shard = 0
        out.mkdir(parents=True, exist_ok=True)

    def _tmp(self) -> Path:
        return self.out / f".{len(self.shards):06d}.tar.tmp"

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = TarSampleWriter(self._tmp())
            self._num_in_shard = 0
        self._writer.write(sample)
        self._num_in_shard += 1
        if self._num_in_shard == self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        final = self.out / f"shard-{len(self.shards):06d}.tar"
        self._tmp().replace(final)
        self.shards.append(ShardEntry(final.name, self._num_in_shard, sha256_file(final), final.stat().st_size))

    def close(
        self,
        skipped: dict[str, int] | None = None,
        classes: list[str] | None = None,
        latents: dict | None = None,
        converted: dict[str, int] | None = None,
    ) -> DatasetManifest:
        """Finish the last shard and write the manifest (class names and latent settings pass through)."""
        if self._writer is not None:
            self._close_shard()
        manifest = DatasetManifest(
            shards=self.shards,
            resolution=self.resolution,
            skipped=dict(skipped or {}),
            classes=classes,
            latents=latents,
            converted=dict(sorted((converted or {}).items())),
        )
        manifest.write(self.out)
        return manifest
