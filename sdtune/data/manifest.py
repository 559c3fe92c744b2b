"""The dataset manifest written next to a shard folder: shard names, sample counts, sha256.

`make_shards` and `encode_latents` write only valid samples, so their entries need no more. A manifest
made by `data index` for shards written elsewhere also lists, per shard, the raw samples the loader's
checks refuse (`bad`: [position, reason] pairs) and the check settings it used (`checks`): the loader
then plans exact epochs over the valid samples without decoding anything to count them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtune.data.plan import ShardInfo
from sdtune.fileio import write_text_atomic
from sdtune.storage import Storage, join

MANIFEST_NAME = "manifest.json"
FORMAT = "sdtune-shards/1"


@dataclass
class ShardEntry:
    name: str
    num_samples: int  # valid samples
    sha256: str
    num_bytes: int
    num_raw: int | None = None  # samples in the tar, valid or not (None: all are valid)
    bad: list[list] = field(default_factory=list)  # [[raw position, reason], ...] in tar order
    truncated: bool = False  # the tar ends inside a member (the samples before the cut are counted)

    def bad_positions(self) -> dict[int, str]:
        return {int(position): str(reason) for position, reason in self.bad}

    @property
    def total_raw(self) -> int:
        return self.num_samples + len(self.bad) if self.num_raw is None else self.num_raw

    def shard_info(self, url: str) -> ShardInfo:
        """What the epoch plan needs of this shard, read from `url`."""
        return ShardInfo(url, self.num_samples, self.total_raw, self.bad_positions(), self.truncated)


@dataclass
class DatasetManifest:
    shards: list[ShardEntry]
    resolution: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    classes: list[str] | None = None  # class names by label index, for labelled datasets
    latents: dict | None = None  # latent shards: the encoding settings (see sdtune.data.latents)
    checks: dict | None = None  # `data index`: the image checks the counts hold for (see sdtune.data.index)
    converted: dict[str, int] = field(default_factory=dict)  # images converted to RGB, per kind
    caption_source: str | None = None  # "txt", "json" or "txt+json" (`data index`)
    content: str | None = None  # "images" or "latents" (`data index`)
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def counts_by_name(self) -> dict[str, int]:
        return {s.name: s.num_samples for s in self.shards}

    def write(self, folder: Path) -> Path:
        data = asdict(self) | {"num_samples": self.num_samples}
        return write_text_atomic(folder / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_json(cls, text: str, source: str) -> DatasetManifest:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                found = data.get("format") if isinstance(data, dict) else type(data).__name__
                raise ValueError(f"not an sdtune shard manifest (format {found!r})")
            return cls(
                shards=[ShardEntry(**s) for s in data["shards"]],
                resolution=data.get("resolution"),
                skipped=data.get("skipped", {}),
                classes=data.get("classes"),
                latents=data.get("latents"),
                checks=data.get("checks"),
                converted=data.get("converted", {}),
                caption_source=data.get("caption_source"),
                content=data.get("content"),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{source}: unreadable shard manifest ({err}); remake it with `sdtune data index --shards <folder>`, "
                "or delete manifest.json to count samples from the shards"
            ) from None


def read_manifest(dataset_url: str, storage: Storage) -> DatasetManifest | None:
    """The manifest in a dataset folder/prefix, or None if it has none."""
    url = join(dataset_url, MANIFEST_NAME)
    if not storage.exists(url):
        return None
    return read_manifest_file(url, storage)


def read_manifest_file(url: str, storage: Storage) -> DatasetManifest:
    """A manifest file anywhere (e.g. one `data index --out` wrote for a read-only dataset)."""
    with storage.open_read(url) as f:
        return DatasetManifest.from_json(f.read().decode("utf-8"), url)


def dataset_url(shards: str, storage: Storage) -> str:
    """The folder/prefix holding the shards (and the manifest) of a shard spec (folder, glob or brace pattern)."""
    first = shards.split("{", 1)[0]
    if first.endswith(".tar") or "*" in first or not first.endswith("/") and not storage.exists(first):
        return first.rsplit("/", 1)[0] if "/" in first else "."
    return first
