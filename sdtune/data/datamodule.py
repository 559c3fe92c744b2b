"""DataModule over captioned WebDataset shards, with an exact data position for resume."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdtune.data.decode import ImageLimits, parse_colour
from sdtune.data.index import ScanLog, checks_of, index_shards
from sdtune.data.latents import LatentSettings
from sdtune.data.manifest import DatasetManifest, dataset_url, read_manifest, read_manifest_file
from sdtune.data.plan import REMAINDERS, ShardInfo, describe_remainder
from sdtune.data.stream import ALL_REASONS, EpochResume, SampleTransform, ShardStream
from sdtune.distributed import gather_objects
from sdtune.preflight import shm_prefetch
from sdtune.storage import Storage

log = logging.getLogger(__name__)
SHM = Path("/dev/shm")  # where DataLoader workers put the batches they hand over
_META_KEYS = ("data_worker", "data_position", "data_bad")


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch (and resume point) each time it is iterated."""

    def __init__(self, dataset: ShardStream, start_epoch: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._start_epoch = start_epoch

    def __iter__(self) -> Iterator[Any]:
        self._start_epoch()
        return super().__iter__()


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1/SIGTERM: SLURM signals every process of a job step, and a worker
    killed by the signal would end the fit before the training process can write its checkpoint."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _manifest_problem(manifest: DatasetManifest | None, names: list[str], checks: dict) -> str | None:
    """Why a dataset's manifest cannot plan this run's epochs, or None if it can."""
    if manifest is None:
        return "no manifest.json"
    listed = manifest.counts_by_name()
    missing = [n for n in names if n not in listed]
    if missing:
        return f"manifest.json does not list {len(missing)} shard(s) ({missing[0]}, ...)"
    if manifest.checks is not None and manifest.checks != checks:
        return f"manifest.json counts valid samples for other checks ({manifest.checks}, this run: {checks})"
    reasons = {reason for shard in manifest.shards for _, reason in shard.bad}
    unknown = sorted(reasons - set(ALL_REASONS))
    if unknown:
        return f"manifest.json names unknown skip reasons {unknown}"
    return None


class ShardDataModule(L.LightningDataModule):
    """Captioned image shards (jpg/png/webp + txt/json), or latent shards made from them by
    `data_tools encode_latents`, for Stable Diffusion fine-tuning."""

    def __init__(
        self,
        shards: str,
        batch_size: int = 4,
        num_workers: int = 2,
        resolution: int = 512,
        random_crop: bool = False,
        flip_prob: float = 0.5,
        caption_dropout: float = 0.0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        min_image_side: int | None = None,
        max_image_pixels: int = 64_000_000,
        alpha_background: str = "white",
        remainder: str = "wrap",
        manifest: str | None = None,
        val_shards: str | None = None,
    ) -> None:
        """
        Args:
            shards: Shard folder, glob or brace pattern, e.g. `data/ds` or `data/ds/shard-{000000..000009}.tar`;
                image shards, or latent shards (the VAE then does not run during training).
            batch_size: Samples per batch on each device.
            num_workers: DataLoader worker processes per device (0 reads in the training process).
            resolution: Square training resolution in pixels; images are resized (shorter side) and cropped.
            random_crop: Random instead of center crop.
            flip_prob: Probability of a horizontal flip.
            caption_dropout: Probability of replacing a caption by the empty string (for CFG).
            shuffle_buffer: Samples held in each reader's shuffle buffer.
            seed: Seed of shard order, shuffle buffer and augmentations.
            min_image_side: Skip images whose shorter side is smaller (default: resolution // 2).
            max_image_pixels: Skip images with more pixels than this (decompression-bomb guard).
            alpha_background: Colour that transparent images (RGBA, LA, P with transparency) are flattened on.
            remainder: When the valid samples do not fill every reader's batches evenly: `wrap` repeats a
                few samples to fill them, `drop` leaves a few out (a different window each epoch).
            manifest: The `shards`' manifest.json when it cannot sit beside them (a read-only hf:// dataset:
                `sdtune data index --shards hf://datasets/... --out DIR` writes one to DIR); local or a URL.
            val_shards: Held-out shards for `val/loss` (center crop, no flip, no caption dropout, same
                samples, noise and timesteps in every run, so runs can be compared).
        """
        super().__init__()
        for name, value in (("batch_size", batch_size), ("resolution", resolution), ("shuffle_buffer", shuffle_buffer)):
            if value < 1:
                raise ValueError(f"data.{name}: must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {num_workers}")
        for name, value in (("flip_prob", flip_prob), ("caption_dropout", caption_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name}: must be in [0, 1], got {value}")
        if remainder not in REMAINDERS:
            raise ValueError(f"data.remainder: {remainder!r} is not one of {list(REMAINDERS)}")
        self.remainder = remainder
        self.manifest = manifest
        self.shards = shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = SampleTransform(
            resolution=resolution,
            limits=ImageLimits(
                min_side=resolution // 2 if min_image_side is None else min_image_side,
                max_pixels=max_image_pixels,
                background=parse_colour(alpha_background, "data.alpha_background"),
            ),
            random_crop=random_crop,
            flip_prob=flip_prob,
            caption_dropout=caption_dropout,
        )
        self.val_shards = val_shards
        self.val_transform = dataclasses.replace(self.transform, random_crop=False, flip_prob=0.0, caption_dropout=0.0)
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self._progress = EpochResume(epoch=0, batches_done=0)
        self.latent_settings: LatentSettings | None = None  # set in setup() when the shards hold latents
        self.storage = Storage()  # the run's own (the config's `s3:` section) comes through use_storage()

    @property
    def resolution(self) -> int:
        """Side of the square training images (sdtune.contracts.ImageData)."""
        return self.transform.resolution

    def use_storage(self, storage: Storage) -> None:
        """Read shards through `storage` (built by the CLI from the config's settings)."""
        self.storage = storage

    def _manifest(self, spec: str) -> DatasetManifest | None:
        """The training shards' manifest: `data.manifest` if set, else the one beside them (None if none)."""
        if self.manifest is None:
            return read_manifest(dataset_url(spec, self.storage), self.storage)
        if not self.storage.exists(self.manifest):
            raise FileNotFoundError(f"data.manifest: {self.manifest} not found; check the path or leave it unset")
        return read_manifest_file(self.manifest, self.storage)

    def _shard_infos(self, urls: list[str], spec: str, option: str) -> list[ShardInfo]:
        """Valid samples and known bad ones per shard: from the manifest when it fits this run's checks,
        else counted once by reading the shards (split over ranks) and kept in the run folder."""
        folder = dataset_url(spec, self.storage)
        manifest = self._manifest(spec) if option == "shards" else read_manifest(folder, self.storage)
        checks = checks_of(self.transform.limits)
        names = [os.path.basename(u) for u in urls]
        problem = _manifest_problem(manifest, names, checks)
        if problem is None:
            assert manifest is not None
            entries = {s.name: s for s in manifest.shards}
            return [entries[name].shard_info(url) for url, name in zip(urls, names, strict=True)]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        key = hashlib.sha256(f"{folder}|{spec}".encode()).hexdigest()[:16]
        path = Path(trainer.default_root_dir if trainer else ".") / "data_index" / f"{key}.jsonl"
        log.warning(
            "data.%s: %s under %s; counting valid samples with the loader's checks once (kept in %s; "
            "`sdtune data index --shards %s` writes a manifest instead)",
            option,
            problem,
            folder,
            path,
            spec,
        )
        scan_log = ScanLog(path, checks, writable=rank == 0)
        mine = index_shards(
            urls[rank::world_size], self.storage, self.transform.limits, scan_log, max(1, self.num_workers)
        )
        scans = [None] * len(urls)
        for other, results in enumerate(gather_objects(mine)):
            scans[other::world_size] = results
        for scan in scans:
            scan_log.add(scan)  # rank 0 keeps the other ranks' results too
        return [scan.entry.shard_info(url) for scan, url in zip(scans, urls, strict=True)]

    def _stream(
        self, spec: str, option: str, transform: SampleTransform, num_workers: int, **kwargs: Any
    ) -> ShardStream:
        urls = self.storage.expand_urls(spec)
        if not urls:
            raise ValueError(f"data.{option}: no .tar shards match {spec!r}; check the path or pattern")
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return ShardStream(
            self._shard_infos(urls, spec, option),
            self.batch_size,
            num_workers,
            rank,
            world_size,
            transform,
            self.storage,
            seed=self.seed,
            remainder=self.remainder,
            **kwargs,
        )

    def _check_latent_shards(self) -> None:
        """Latent shards fix resolution, crop and flip at encoding time: refuse settings they cannot honour."""
        manifest = self._manifest(self.shards)
        if manifest is None or not manifest.latents:
            return
        settings = LatentSettings.from_json(manifest.latents)
        t = self.transform
        if t.resolution != settings.resolution:
            raise ValueError(
                f"data.resolution: {t.resolution}, but the latent shards {self.shards} were encoded at "
                f"{settings.resolution}; set data.resolution to {settings.resolution} or re-encode"
            )
        if t.random_crop:
            raise ValueError("data.random_crop: latent shards hold center crops; set random_crop: false")
        if t.flip_prob > 0 and not settings.flip:
            raise ValueError(
                f"data.flip_prob: {t.flip_prob}, but {self.shards} has no flipped latents; set flip_prob: 0 "
                "or re-encode with data_tools encode_latents --flip true"
            )
        self.latent_settings = settings

    def setup(self, stage: str) -> None:
        if self.train_stream is None:
            self._check_latent_shards()
            self.train_stream = self._stream(
                self.shards, "shards", self.transform, self.num_workers, shuffle_buffer=self.shuffle_buffer
            )
            stream = self.train_stream
            log.info(
                "data: %d shards, %d batches per epoch per device; %s",
                len(stream.shard_urls),
                len(stream) // self.batch_size,
                describe_remainder(stream.num_valid, stream.num_readers, self.batch_size, self.remainder),
            )
        if self.val_shards and self.val_stream is None:
            # One reader per rank, in the training process, no shuffle: the same batches in every run.
            self.val_stream = self._stream(self.val_shards, "val_shards", self.val_transform, 0, shuffle_buffer=1)

    def _start_epoch(self) -> None:
        """Called each time the loader is iterated: continue the current epoch or start the next one.

        The epoch number is the DataModule's own, not Lightning's loop counter: Lightning creates the
        first iterator (to count batches) before it restores its loops, and may iterate a loader twice
        before the first batch. Iterating again before any batch is consumed gives the same epoch.
        """
        stream = self.train_stream
        assert stream is not None
        progress = self._progress
        if progress.batches_done >= len(stream) // self.batch_size:
            progress = EpochResume(epoch=progress.epoch + 1, batches_done=0)
        stream.epoch = progress.epoch
        stream.resume = copy.deepcopy(progress) if progress.batches_done else None
        self._progress = progress

    def train_dataloader(self) -> DataLoader:
        assert self.train_stream is not None, "setup() first"
        return _EpochLoader(
            self.train_stream,
            self._start_epoch,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=False,  # workers must re-read the epoch and resume point each epoch
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self._prefetch_factor() if self.num_workers > 0 else None,
            worker_init_fn=_ignore_preemption_signals,
        )

    def _prefetch_factor(self, wanted: int = 4) -> int:
        """Batches each worker keeps ready, as many of `wanted` as `/dev/shm` holds (batches from workers live in
        shared memory: a 64 MB Docker default and 512 px batches end in a bus error, not a message)."""
        if not SHM.is_dir():
            return wanted
        if self.latent_settings is not None:  # float32 latents (C, h, w), possibly with a flipped copy
            channels, height, width = self.latent_settings.latent_shape
            sample_bytes = 2 * channels * height * width * 4
        else:
            sample_bytes = 3 * self.resolution**2 * 4  # float32 pixels
        free = shutil.disk_usage(SHM).free
        prefetch, problem = shm_prefetch(free, self.num_workers, self.batch_size * sample_bytes, wanted)
        if prefetch == 0:
            raise OSError(problem)
        if problem:
            log.warning("%s", problem)
        return prefetch

    def val_dataloader(self) -> DataLoader | list:
        if self.val_stream is None:
            return []
        return DataLoader(self.val_stream, batch_size=self.batch_size, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record where the batch's reader stood; runs on each batch just before its training step."""
        if self.trainer is not None and not self.trainer.training:
            return {k: v for k, v in batch.items() if k not in _META_KEYS}
        if isinstance(batch, dict) and "data_worker" in batch:
            worker = int(batch["data_worker"][-1])
            self._progress.positions[worker] = int(batch["data_position"][-1])
            self._progress.bad_counts[worker] = batch["data_bad"][-1].tolist()
            self._progress.batches_done += 1
            batch = {k: v for k, v in batch.items() if k not in _META_KEYS}
        return batch

    def bad_sample_counts(self) -> dict[str, int]:
        """Samples skipped so far this epoch on this device, per reason."""
        totals = [sum(c) for c in zip(*self._progress.bad_counts.values(), strict=True)] or [0] * len(ALL_REASONS)
        return dict(zip(ALL_REASONS, totals, strict=True))

    def _layout(self) -> dict[str, int]:
        trainer = self.trainer
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": trainer.world_size if trainer else 1,
            "seed": self.seed,
            "remainder": self.remainder,
            "epoch_plan": 2,  # how epochs are cut into readers' ranges (1: whole shards per reader)
        }

    def state_dict(self) -> dict[str, Any]:
        """The data position of every rank: each rank's readers are distinct global workers, so they merge."""
        p = self._progress
        ranks = gather_objects((p.epoch, p.batches_done, dict(p.positions), dict(p.bad_counts)))
        assert all(r[:2] == ranks[0][:2] for r in ranks), f"ranks out of step: {[r[:2] for r in ranks]}"
        return {
            "layout": self._layout(),
            "epoch": p.epoch,
            "batches_done": p.batches_done,
            "positions": {k: v for r in ranks for k, v in r[2].items()},
            "bad_counts": {k: list(v) for r in ranks for k, v in r[3].items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state["layout"], self._layout()
        saved = {"remainder": "wrap", "epoch_plan": 1} | saved  # checkpoints from before either existed
        if saved["epoch_plan"] != current["epoch_plan"]:
            raise ValueError(
                "data: this checkpoint's data position is from an sdtune that cut epochs into readers differently "
                f"(epoch plan {saved['epoch_plan']}, now {current['epoch_plan']}); resume it with that version, "
                "or start the run again"
            )
        changed = [f"{k}: {saved[k]} -> {current[k]}" for k in saved if saved[k] != current.get(k)]
        if changed:
            raise ValueError(
                "data: cannot resume exactly with a different data layout (" + ", ".join(changed) + "); "
                "use the settings of the run you resume"
            )
        num_readers = max(1, self.num_workers)
        rank = self.trainer.global_rank if self.trainer else 0
        mine = range(rank * num_readers, (rank + 1) * num_readers)  # this rank's global workers
        self._progress = EpochResume(
            epoch=state["epoch"],
            batches_done=state["batches_done"],
            positions={int(k): v for k, v in state["positions"].items() if int(k) in mine},
            # Older checkpoints count fewer reasons: pad (new reasons are appended, so positions hold).
            bad_counts={
                int(k): list(v) + [0] * (len(ALL_REASONS) - len(v))
                for k, v in state["bad_counts"].items()
                if int(k) in mine
            },
        )
