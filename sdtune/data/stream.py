"""A resumable, seeded WebDataset stream split over ranks and DataLoader workers.

Layout of one epoch. Shard i belongs to global worker `i % (world_size * num_workers)`; each global
worker yields exactly `batches_per_worker * batch_size` valid samples (so every rank gets the same
number of batches, which DDP needs), reading its shards in a seeded per-epoch order through a seeded
shuffle buffer. Bad samples are skipped and counted; a worker short of samples starts another pass.

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
    LABEL_LATENT_REASONS,
    LATENT_EXTS,
    WANTED_EXTS,
    BadSample,
    ImageLimits,
    decode_caption,
    decode_image,
    resize_crop_flip,
)
from sdtune.data.latents import decode_latents
from sdtune.data.tar_stream import RawSample, iter_tar_samples
from sdtune.storage import Storage, is_remote, reopen_count

STREAM_REASONS = ("truncated_shard", "oversized_member", "extra_pass", "shard_reopen")
# Counted events that are not skipped samples.
EVENTS = ("extra_pass", "shard_reopen")
ALL_REASONS = BAD_REASONS + STREAM_REASONS + LABEL_LATENT_REASONS


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


def assign_shards(num_shards: int, num_global_workers: int) -> list[list[int]]:
    if num_shards < num_global_workers:
        raise ValueError(
            f"data.shards: {num_shards} shard(s) for {num_global_workers} readers (ranks x data.num_workers); "
            "make more, smaller shards (data_tools make_shards --samples-per-shard) or lower data.num_workers"
        )
    return [list(range(g, num_shards, num_global_workers)) for g in range(num_global_workers)]


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
        shard_urls: list[str],
        shard_counts: list[int],
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
        transform: SampleTransform,
        storage: Storage,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.shard_urls = shard_urls
        self.num_workers = max(1, num_workers)
        self.rank = rank
        self.batch_size = batch_size
        self.transform = transform
        self.storage = storage
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.assignment = assign_shards(len(shard_urls), world_size * self.num_workers)
        per_worker = [sum(shard_counts[i] for i in shards) for shards in self.assignment]
        self.samples_per_reader = per_worker
        self.batches_per_worker = min(per_worker) // batch_size
        if self.batches_per_worker == 0:
            raise ValueError(
                f"data.batch_size: {batch_size} is more than the {min(per_worker)} samples one reader gets "
                f"({sum(shard_counts)} samples over {len(self.assignment)} readers); lower batch_size or num_workers"
            )
        self.epoch = 0
        self.resume: EpochResume | None = None

    def __len__(self) -> int:
        """Samples this rank yields per epoch (DataLoader turns it into batches)."""
        return self.num_workers * self.batches_per_worker * self.batch_size

    def _read_shards(self, order: list[int], errors: dict[str, int]) -> Iterator[RawSample]:
        urls = [self.shard_urls[i] for i in order]
        # Remote shards: the next one is opened while this one is read, so its request latency is hidden.
        upcoming = self.storage.open_read(urls[0]) if urls else None
        try:
            for index, url in enumerate(urls):
                stream, upcoming = upcoming, None
                if index + 1 < len(urls) and is_remote(urls[index + 1]):
                    upcoming = self.storage.open_read(urls[index + 1])
                with stream:
                    reopens_before = errors.get("shard_reopen", 0)
                    for raw in iter_tar_samples(stream, url, WANTED_EXTS, errors):
                        errors["shard_reopen"] = reopens_before + reopen_count(stream)
                        yield raw
                if upcoming is None and index + 1 < len(urls):
                    upcoming = self.storage.open_read(urls[index + 1])
        finally:
            if upcoming is not None:
                upcoming.close()

    def _raw_stream(self, global_worker: int, errors: dict[str, int]) -> Iterator[RawSample]:
        """Raw samples of one reader: seeded passes over its shards, each through a seeded shuffle buffer."""
        shard_ids = self.assignment[global_worker]
        for pass_index in itertools.count():
            rng = np.random.default_rng([self.seed, self.epoch, global_worker, pass_index])
            order = [shard_ids[i] for i in rng.permutation(len(shard_ids))]
            if pass_index > 0:
                errors["extra_pass"] = errors.get("extra_pass", 0) + 1
            num_raw = 0
            for raw in _buffered_shuffle(self._read_shards(order, errors), self.shuffle_buffer, rng):
                num_raw += 1
                yield raw
            if num_raw == 0:
                names = [self.shard_urls[i] for i in shard_ids]
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
            image = decode_image(raw, t.limits)
            sample = {"pixel_values": resize_crop_flip(image, t.resolution, rng, t.random_crop, t.flip_prob)}
        if t.caption_dropout > 0 and rng.random() < t.caption_dropout:
            caption = ""
        return sample | {"caption": caption, "key": key}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
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
        max_bad_run = 2 * self.samples_per_reader[global_worker] + self.shuffle_buffer
        num_yielded, bad_run = 0, 0
        for raw in raw_iter:
            if num_yielded >= num_to_yield:
                return
            position += 1
            try:
                sample = self._decode(raw)
            except BadSample as bad_sample:
                bad[ALL_REASONS.index(bad_sample.reason)] += 1
                bad_run += 1
                if bad_run > max_bad_run:
                    raise RuntimeError(f"data reader {global_worker}: no valid sample in {bad_run} in a row") from None
                continue
            for reason in STREAM_REASONS:
                bad[ALL_REASONS.index(reason)] += errors.get(reason, 0) - errors_before.get(reason, 0)
            errors_before = dict(errors)
            bad_run = 0
            num_yielded += 1
            sample["data_worker"] = global_worker
            sample["data_position"] = position
            sample["data_bad"] = torch.tensor(bad, dtype=torch.long)
            yield sample
