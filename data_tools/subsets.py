"""Nested, seeded subsets of a shard dataset for dataset-size sweeps, plus one held-out validation set.

    python -m data_tools subsets --source data/ds --out data/ds-sweep --sizes [30,100,300]

One seeded permutation of all samples: the first `val_size` form `val/`, the next `n` form `size-<n>/`
for each size, so every subset contains the smaller ones and none contains a validation sample. Each
subset is written as its own shard folder with a manifest (a sample in several subsets is stored in
each: about 1.3x the data for sizes spaced 3x apart), split into enough shards for several readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_tools.shard_sink import ShardSink
from sdtune.data.decode import WANTED_EXTS
from sdtune.data.manifest import dataset_url, read_manifest
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings


def subset_dir(out: Path, size: int) -> Path:
    return out / f"size-{size:06d}"


def _count(urls: list[str], storage: Storage) -> int:
    errors: dict[str, int] = {}
    total = 0
    for url in urls:
        with storage.open_read(url) as stream:
            total += sum(1 for _ in iter_tar_samples(stream, url, frozenset(), errors))
    return total


def subsets(
    source: str,
    out: Path,
    sizes: list[int],
    val_size: int = 32,
    seed: int = 0,
    min_shards: int = 8,
    max_samples_per_shard: int = 1000,
    s3: S3Settings | None = None,
) -> dict[str, int]:
    """Write `out/size-<n>/` for each size and `out/val/`, each a shard folder with a manifest.

    Args:
        source: The dataset: a shard folder, glob, brace pattern or s3:// prefix.
        out: Output folder.
        sizes: Subset sizes in samples, e.g. [30, 100, 300, 1000, 3000, 10000, 50000].
        val_size: Held-out samples for validation (never in a training subset).
        seed: Seed of the permutation (same seed and source: same subsets).
        min_shards: Shards per subset at least (so that ranks x workers readers each get one), if it has
            that many samples.
        max_samples_per_shard: Shards hold at most this many samples.
        s3: Settings for s3:// (endpoint, retries), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    sizes = sorted(set(sizes))
    urls = storage.expand_urls(source)
    if not urls:
        raise ValueError(f"--source: no .tar shards match {source!r}")
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--sizes: give positive sizes, got {sizes}")
    num_samples = _count(urls, storage)
    if val_size + sizes[-1] > num_samples:
        raise ValueError(
            f"--sizes: the largest subset ({sizes[-1]}) plus --val_size ({val_size}) exceeds the {num_samples} "
            f"samples in {source}; drop the size or lower --val_size"
        )
    order = np.random.default_rng(seed).permutation(num_samples)  # order[i]: the i-th sample in source order
    rank = np.empty(num_samples, dtype=np.int64)
    rank[order] = np.arange(num_samples)  # rank[j]: position of source sample j in the permutation

    def sink(folder: Path, n: int) -> ShardSink:
        per_shard = max(1, min(max_samples_per_shard, math.ceil(n / min_shards)))
        return ShardSink(folder, per_shard, source_manifest.resolution if source_manifest else None)

    source_manifest = read_manifest(dataset_url(source, storage), storage)
    sinks = {"val": sink(out / "val", val_size)} if val_size else {}
    sinks |= {str(n): sink(subset_dir(out, n), n) for n in sizes}
    errors: dict[str, int] = {}
    index = 0
    for url in urls:
        with storage.open_read(url) as stream:
            for raw in iter_tar_samples(stream, url, WANTED_EXTS, errors):
                position = int(rank[index])
                sample = {k: v for k, v in raw.items() if not k.startswith("__")}
                sample["__key__"] = f"{index:09d}"  # unique even when source shards reuse keys
                if position < val_size:
                    sinks["val"].write(sample)
                else:
                    for n in sizes:
                        if position - val_size < n:
                            sinks[str(n)].write(sample)
                index += 1
    # Labelled and latent datasets keep their class names and encoding settings in every subset.
    passed_on = {
        "classes": source_manifest.classes if source_manifest else None,
        "latents": source_manifest.latents if source_manifest else None,
    }
    counts = {name: s.close(**passed_on).num_samples for name, s in sinks.items()}
    (out / "subsets.json").write_text(
        json.dumps({"source": source, "seed": seed, "val_size": val_size, "sizes": sizes, "counts": counts}, indent=2)
    )
    print(f"wrote subsets {counts} to {out}")
    return counts
