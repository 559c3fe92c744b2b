"""Write samples into numbered WebDataset shards (each renamed into place when complete) plus a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import webdataset as wds

from sdtune.data.manifest import DatasetManifest, ShardEntry
from sdtune.fileio import sha256_file


class ShardSink:
    """`write(sample)` fills `shard-000000.tar`, `shard-000001.tar`, ...; `close()` writes the manifest."""

    def __init__(self, out: Path, samples_per_shard: int, resolution: int | None = None) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
        self.out = out
        self.samples_per_shard = samples_per_shard
        self.resolution = resolution
        self.shards: list[ShardEntry] = []
        self._writer: wds.TarWriter | None = None
        self._num_in_shard = 0
        out.mkdir(parents=True, exist_ok=True)

    def _tmp(self) -> Path:
        return self.out / f".{len(self.shards):06d}.tar.tmp"

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = wds.TarWriter(str(self._tmp()))
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
        self, skipped: dict[str, int] | None = None, classes: list[str] | None = None, latents: dict | None = None
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
        )
        manifest.write(self.out)
        return manifest
