"""Which raw samples each reader reads in one epoch.

The epoch's sample sequence is every valid sample once: the shards in a seeded per-epoch order, each
shard's valid samples in tar order, rotated by a seeded offset. Reader r (of R = ranks x workers) takes
the contiguous positions [r*Q, (r+1)*Q), Q = valid samples per reader, a whole number of batches:

- `wrap` (the default, as torch's DistributedSampler pads): Q = ceil(N / (R*B)) * B; the R*Q - N
  positions past the end wrap to the start of the sequence, so that many samples are seen twice.
- `drop`: Q = floor(N / (R*B)) * B; the last N - R*Q positions of the sequence are left out this epoch
  (the rotation moves that window every epoch, so no sample is always left out).

A reader therefore reads whole shards or parts of them: a shard larger than Q is shared by several
readers by sample index, and 30 images in one shard serve 4 readers. A range of valid samples maps to
raw tar positions through the manifest's list of bad samples, so the loader never decodes a sample to
find out where a range starts; bad samples belong to the range holding the next valid sample, and each
is counted exactly once per epoch (repeats from `wrap` do not count again).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

REMAINDERS = ("wrap", "drop")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the loader plans it: its URL, valid and raw sample counts, and its known bad samples."""

    url: str
    num_valid: int
    num_raw: int
    bad: dict[int, str] = field(default_factory=dict)  # raw position -> reason
    truncated: bool = False

    @classmethod
    def all_valid(cls, url: str, num_samples: int) -> ShardInfo:
        """A shard whose samples are all valid (what make_shards and encode_latents write)."""
        return cls(url, num_samples, num_samples)

    def raw_of_valid(self, valid_index: int) -> int:
        """Raw tar position of the `valid_index`-th valid sample (`num_raw` for one past the last)."""
        if valid_index >= self.num_valid:
            return self.num_raw
        raw = valid_index
        for position in sorted(self.bad):
            if position > raw:
                break
            raw += 1
        return raw

    def bad_counts(self, raw_start: int, raw_end: int) -> dict[str, int]:
        """Known bad samples in [raw_start, raw_end), per reason."""
        counts: dict[str, int] = {}
        for position, reason in self.bad.items():
            if raw_start <= position < raw_end:
                counts[reason] = counts.get(reason, 0) + 1
        return counts


@dataclass(frozen=True)
class Segment:
    """Raw positions [raw_start, raw_end) of one shard; `count` False for a repeat (skips counted elsewhere)."""

    shard: int
    raw_start: int
    raw_end: int
    count: bool = True


@dataclass(frozen=True)
class EpochPlan:
    per_reader: int  # valid samples each reader yields
    segments: list[list[Segment]]  # per global reader, in reading order
    counted_only: list[list[Segment]]  # per reader: ranges whose skips it counts without reading them
    repeated: int  # samples yielded twice this epoch (`wrap`)
    dropped: int  # valid samples left out this epoch (`drop`)


def samples_per_reader(total: int, num_readers: int, batch_size: int, remainder: str) -> int:
    batches = total / (num_readers * batch_size)
    return (math.ceil(batches) if remainder == "wrap" else math.floor(batches)) * batch_size


def describe_remainder(total: int, num_readers: int, batch_size: int, remainder: str) -> str:
    """One line for the log: how the epoch's sample count fits the readers and batches."""
    per_reader = samples_per_reader(total, num_readers, batch_size, remainder)
    used = per_reader * num_readers
    if used == total:
        return f"{total} valid samples fill {num_readers} reader(s) x {per_reader // batch_size} batch(es) exactly"
    if remainder == "wrap":
        return f"{total} valid samples; data.remainder=wrap repeats {used - total} per epoch to fill the last batches"
    return f"{total} valid samples; data.remainder=drop leaves out {total - used} per epoch (a new window each epoch)"


class _Sequence:
    """The epoch's sample sequence: shards in `order`, each shard's valid samples in tar order."""

    def __init__(self, shards: list[ShardInfo], order: list[int]) -> None:
        self.shards = shards
        self.order = [i for i in order if shards[i].num_valid > 0]
        self.starts = np.cumsum([0] + [shards[i].num_valid for i in self.order]).tolist()
        self.total = self.starts[-1]

    def segments(self, start: int, length: int, count: bool) -> list[Segment]:
        """Segments covering `length` sequence positions from `start`, wrapping at the end."""
        out: list[Segment] = []
        position = start % self.total
        while length > 0:
            k = bisect.bisect_right(self.starts, position) - 1
            shard = self.shards[self.order[k]]
            first = position - self.starts[k]
            take = min(length, shard.num_valid - first)
            raw_start = 0 if first == 0 else shard.raw_of_valid(first)
            raw_end = shard.raw_of_valid(first + take)
            out.append(Segment(self.order[k], raw_start, raw_end, count))
            length -= take
            position = (position + take) % self.total
        return out


def plan_epoch(
    shards: list[ShardInfo], num_readers: int, batch_size: int, remainder: str, seed: int, epoch: int
) -> EpochPlan:
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    sequence = _Sequence(shards, rng.permutation(len(shards)).tolist())
    total = sequence.total
    per_reader = samples_per_reader(total, num_readers, batch_size, remainder)
    assert total > 0 and per_reader > 0, "checked by ShardStream"
    offset = int(rng.integers(0, total))
    segments: list[list[Segment]] = []
    for reader in range(num_readers):
        begin, end = reader * per_reader, (reader + 1) * per_reader
        first = sequence.segments(offset + begin, max(0, min(end, total) - begin), count=True)
        repeat = sequence.segments(offset + max(begin, total), max(0, end - max(begin, total)), count=False)
        segments.append(first + repeat)
    counted_only: list[list[Segment]] = [[] for _ in range(num_readers)]
    used = per_reader * num_readers
    if used < total:  # `drop`: the window's skips are still counted, by the last reader
        counted_only[-1] += sequence.segments(offset + used, total - used, count=True)
    for index, shard in enumerate(shards):
        if shard.num_valid == 0:  # nothing to read; its skips are counted by one reader
            counted_only[index % num_readers].append(Segment(index, 0, shard.num_raw))
    return EpochPlan(per_reader, segments, counted_only, max(0, used - total), max(0, total - used))
