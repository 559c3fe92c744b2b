"""A resumable, seeded WebDataset stream split over ranks and DataLoader workers.

Layout of one epoch (`sdtune.data.plan`): every valid sample once, in a seeded order, cut into one
contiguous range per global reader (rank x worker); each reader yields exactly `batches_per_worker *
batch_size` valid samples through a seeded shuffle buffer, so every rank gets the same number of
batches, which DDP needs. Samples the manifest knows to be bad are skipped without decoding and counted
once; a sample that fails to decode although the manifest calls it valid is counted too, and its reader
makes up the shortfall with another pass over its range (`extra_pass`).

Data position. Each sample carries its global worker id and the number of raw samples that worker has
consumed, so the consumer knows exactly where each worker stands. On resume after `batches_done`
batches, a worker skips its consumed raw samples without decoding them, and DataLoader worker p plays
logical worker `(p + batches_done) % num_workers`, which keeps the round-robin batch order intact.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sdtune.data.decode import (
    BAD_REASONS,
    CONVERSIONS,
    LABEL_LATENT_REASONS,
    LATENT_EXTS,
    WANTED_EXTS,
    BadSample,
    ImageLimits,
    decode_caption,
    decode_image_converted,
    resize_crop_flip,
)
from sdtune.data.latents import decode_latents
from sdtune.data.plan import REMAINDERS, Segment, ShardInfo, plan_epoch, samples_per_reader
from sdtune.data.tar_stream import RawSample, iter_tar_samples
from sdtune.storage import Storage, is_remote, reopen_count

STREAM_REASONS = ("truncated_shard", "oversized_member", "extra_pass", "shard_reopen")
# Counted events that are not skipped samples.
EVENTS = ("extra_pass", "shard_reopen")
CONVERTED = tuple(f"converted_{kind}" for kind in CONVERSIONS)
# Appended in this order so that counters saved by older checkpoints keep their positions.
ALL_REASONS = BAD_REASONS + STREAM_REASONS + LABEL_LATENT_REASONS + CONVERTED


@dataclass(frozen=True)
class SampleTransform:
    """Per-sample decoding and augmentation settings."""

    resolution: int
    limits: ImageLimits
    random_crop: bool = False
    flip_prob: float = 0.5
    caption_dropout: float = 0.0


@dataclass
class EpochResume:
    """Where each global worker stood when a checkpoint was taken in `epoch`."""

    epoch: int
    batches_done: int
    positions: dict[int, int] = field(default_factory=dict)
    bad_counts: dict[int, list[int]] = field(default_factory=dict)


def _buffered_shuffle(items: Iterator[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = int(rng.integers(0, size))
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Yields decoded samples for one rank; see the module docstring for the epoch layout."""

    def __init__(
        self,
        shards: list[ShardInfo],
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
        transform: SampleTransform,
        storage: Storage,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        remainder: str = "wrap",
    ) -> None:
        if remainder not in REMAINDERS:
            raise ValueError(f"data.remainder: {remainder!r} is not one of {list(REMAINDERS)}")
        self.shards = shards
        self.shard_urls = [s.url for s in shards]
        self.num_workers = max(1, num_workers)
        self.num_readers = world_size * self.num_workers
        self.rank = rank
        self.batch_size = batch_size
        self.transform = transform
        self.storage = storage
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.remainder = remainder
        self.num_valid = sum(s.num_valid for s in shards)
        if self.num_valid == 0:
            raise ValueError(f"data.shards: no valid sample in {len(shards)} shard(s) ({shards[0].url}, ...)")
        per_reader = samples_per_reader(self.num_valid, self.num_readers, batch_size, remainder)
        if per_reader == 0:
            raise ValueError(
                f"data.batch_size: {self.num_valid} valid samples cannot give one batch of {batch_size} to each of "
                f"{self.num_readers} readers (ranks x data.num_workers); lower data.batch_size or "
                "data.num_workers, or set data.remainder: wrap"
            )
        self.batches_per_worker = per_reader // batch_size
        self.epoch = 0
        self.resume: EpochResume | None = None

    def __len__(self) -> int:
        """Samples this rank yields per epoch (DataLoader turns it into batches)."""
        return self.num_workers * self.batches_per_worker * self.batch_size

    def _segment_samples(
        self, segment: Segment, stream: object, count: bool, errors: dict[str, int]
    ) -> Iterator[RawSample]:
        """Raw samples of one segment, without the ones the manifest knows to be bad (counted instead)."""
        shard = self.shards[segment.shard]
        to_end = segment.raw_end >= shard.num_raw  # only the range that ends the tar sees a truncation
        shard_errors: dict[str, int] = {}
        position = 0
        for raw in iter_tar_samples(stream, shard.url, WANTED_EXTS, shard_errors):  # type: ignore[arg-type]
            if position >= segment.raw_end and not to_end:
                break
            if segment.raw_start <= position < segment.raw_end:
                reason = shard.bad.get(position)
                if reason is None:
                    yield raw if count else raw | {"__repeat__": "1"}  # a repeat's conversion is not counted again
                elif count:
                    errors[reason] = errors.get(reason, 0) + 1
            position += 1
        if count and to_end:
            for reason in ("truncated_shard", "oversized_member"):
                errors[reason] = errors.get(reason, 0) + shard_errors.get(reason, 0)

    def _read_segments(self, segments: list[Segment], count: bool, errors: dict[str, int]) -> Iterator[RawSample]:
        urls = [self.shards[segment.shard].url for segment in segments]
        # Remote shards: the next one is opened while this one is read, so its request latency is hidden.
        upcoming = self.storage.open_read(urls[0]) if urls else None
        try:
            for index, segment in enumerate(segments):
                stream, upcoming = upcoming, None
                if index + 1 < len(urls) and is_remote(urls[index + 1]):
                    upcoming = self.storage.open_read(urls[index + 1])
                with stream:
                    reopens_before = errors.get("shard_reopen", 0)
                    for raw in self._segment_samples(segment, stream, count and segment.count, errors):
                        errors["shard_reopen"] = reopens_before + reopen_count(stream)
                        yield raw
                if upcoming is None and index + 1 < len(urls):
                    upcoming = self.storage.open_read(urls[index + 1])
        finally:
            if upcoming is not None:
                upcoming.close()

    def _raw_stream(self, global_worker: int, errors: dict[str, int]) -> Iterator[RawSample]:
        """Raw samples of one reader: its range of the epoch through a seeded shuffle buffer; further passes
        over the same range only if samples the manifest calls valid failed to decode."""
        plan = plan_epoch(self.shards, self.num_readers, self.batch_size, self.remainder, self.seed, self.epoch)
        for segment in plan.counted_only[global_worker]:
            shard = self.shards[segment.shard]
            for reason, number in shard.bad_counts(segment.raw_start, segment.raw_end).items():
                errors[reason] = errors.get(reason, 0) + number
            if shard.truncated and segment.raw_end >= shard.num_raw:
                errors["truncated_shard"] = errors.get("truncated_shard", 0) + 1
        segments = plan.segments[global_worker]
        for pass_index in itertools.count():
            rng = np.random.default_rng([self.seed, self.epoch, global_worker, pass_index])
            if pass_index > 0:
                errors["extra_pass"] = errors.get("extra_pass", 0) + 1
            num_raw = 0
            raws = self._read_segments(segments, pass_index == 0, errors)
            for raw in _buffered_shuffle(raws, self.shuffle_buffer, rng):
                num_raw += 1
                yield raw
            if num_raw == 0:
                names = sorted({self.shards[s.shard].url for s in segments})
                raise RuntimeError(f"data reader {global_worker}: shards {names} hold no readable samples")

    def _decode(self, raw: RawSample) -> dict:
        # Augmentation randomness comes from the sample's identity, not from stream position, so a
        # resumed stream transforms every sample exactly as an uninterrupted one would. The shard's file
        # name, not its URL, so the same dataset gives the same run from a local folder or from R2.
        key = f"{raw['__shard__'].rsplit('/', 1)[-1]}/{raw['__key__']}"
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
        caption = decode_caption(raw)
        t = self.transform
        if any(ext in raw for ext in LATENT_EXTS):
            # Latent shards: the VAE ran at encoding time (center crop); a flip picks the mirrored latent.
            latent, flipped = decode_latents(raw)
            use_flipped = flipped is not None and t.flip_prob > 0 and rng.random() < t.flip_prob
            sample = {"latents": flipped if use_flipped else latent}
        else:
            image, conversion = decode_image_converted(raw, t.limits)
            sample = {"pixel_values": resize_crop_flip(image, t.resolution, rng, t.random_crop, t.flip_prob)}
            if conversion is not None:
                sample["conversion"] = f"converted_{conversion}"
        if t.caption_dropout > 0 and rng.random() < t.caption_dropout:
            caption = ""
        return sample | {"caption": caption, "key": key}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return self.worker_samples(info.id if info is not None else 0)

    def worker_samples(self, physical: int) -> Iterator[dict]:
        """What DataLoader worker `physical` of this rank yields this epoch."""
        resume = self.resume if self.resume is not None and self.resume.epoch == self.epoch else None
        batches_done = resume.batches_done if resume else 0
        logical = (physical + batches_done) % self.num_workers
        global_worker = self.rank * self.num_workers + logical
        consumed_batches = len(range(logical, batches_done, self.num_workers))
        num_to_yield = (self.batches_per_worker - consumed_batches) * self.batch_size
        position = resume.positions.get(global_worker, 0) if resume else 0
        bad = list(resume.bad_counts.get(global_worker, [0] * len(ALL_REASONS))) if resume else [0] * len(ALL_REASONS)
        assert consumed_batches == 0 or resume is not None and global_worker in resume.positions, "missing position"

        errors: dict[str, int] = {}
        raw_iter = self._raw_stream(global_worker, errors)
        for _ in itertools.islice(raw_iter, position):
            pass  # fast-forward without decoding; these samples were consumed before the checkpoint
        errors_before = dict(errors)
        # Bounds the search for a valid sample: two full passes without one means the shards are all bad.
        max_bad_run = 2 * self.batches_per_worker * self.batch_size + self.shuffle_buffer
        num_yielded, bad_run = 0, 0
        for raw in raw_iter if num_to_yield > 0 else ():
            position += 1
            try:
                sample = self._decode(raw)
            except BadSample as bad_sample:
                bad[ALL_REASONS.index(bad_sample.reason)] += "__repeat__" not in raw
                bad_run += 1
                if bad_run > max_bad_run:
                    raise RuntimeError(f"data reader {global_worker}: no valid sample in {bad_run} in a row") from None
                continue
            for reason, number in errors.items():  # stream events and skips known from the manifest
                bad[ALL_REASONS.index(reason)] += number - errors_before.get(reason, 0)
            errors_before = dict(errors)
            conversion = sample.pop("conversion", None)
            if conversion is not None and "__repeat__" not in raw:
                bad[ALL_REASONS.index(conversion)] += 1
            bad_run = 0
            num_yielded += 1
            sample["data_worker"] = global_worker
            sample["data_position"] = position
            sample["data_bad"] = torch.tensor(bad, dtype=torch.long)
            yield sample
            if num_yielded >= num_to_yield:
                return  # before asking for another raw sample: that could start a needless pass
