"""DataModule for classifiers: labelled latent or image shards in memory, a fixed held-out split, and
optional latent augmentation (on the latents, or decoded to pixels for pixel classifiers)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from sdtune.data.latents import decode
from sdtune.data.tables import LabelledTable, cap_per_class, heldout_split, read_table
from sdtune.latent.augment import LatentAugmentation
from sdtune.models.components import load_vae_of
from sdtune.storage import Storage

log = logging.getLogger(__name__)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


class EpochOrder(Sampler[int]):
    """A seeded permutation of the training set per epoch, started `skip` batches in on a mid-epoch resume.

    The epoch and the batches already trained come from the DataModule (`start_epoch`), not from Lightning's
    loop counter: Lightning iterates the loader once before it restores its loops (see ShardDataModule).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_epoch: Callable[[int], tuple[int, int]]):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._start_epoch = start_epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        epoch, batches_done = self._start_epoch(math.ceil(self.num_samples / self.batch_size))
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        yield from order[batches_done * self.batch_size :].tolist()


class ClassificationDataModule(L.LightningDataModule):
    """Labelled shards for classification; see `sdtune.data.tables` for the split."""

    def __init__(
        self,
        shards: str,
        latents: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        image_size: int | None = None,
        augment: list[LatentAugmentation] | None = None,
        synthetic_only: bool = False,
        generated: str | None = None,
        max_train_per_class: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        """
        Args:
            shards: Labelled shards: latent shards (the classifier sees latents) or image shards (pixels).
            latents: With image shards and `augment`: latent shards of the same images, whose augmented
                latents are decoded to images by the VAE recorded in their manifest.
            val_fraction: Held-out fraction of each class (the split depends only on keys and split_seed).
            split_seed: Seed of the held-out split; keep it fixed to compare classifiers.
            image_size: Pixel inputs are resized to this (default: the shards' resolution).
            augment: Latent augmentations; their output is added to the training set (latents: regenerated
                each epoch when trainer.reload_dataloaders_every_n_epochs is 1; pixels: decoded once).
            synthetic_only: Train on the augmentations' (or `generated`'s) samples only (never on a real training
                sample).
            generated: Labelled shards made by a generator (`sdtune generate dataset`; for latent inputs, those
                shards encoded with `data_tools encode_latents` by the same VAE), added to the training set.
            max_train_per_class: Keep at most this many real training samples per class (data-scarcity runs).
            batch_size: Training batch size.
            seed: Seed of the augmentation draws.
        """
        super().__init__()
        if synthetic_only and not augment and not generated:
            raise ValueError("data.synthetic_only: needs data.augment or data.generated for the synthetic samples")
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be >= 1, got {batch_size}")
        self.shards, self.latents_spec = shards, latents
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.requested_size = image_size
        self.augment = list(augment or [])
        self.generated_spec = generated
        self.generated: LabelledTable | None = None
        self.synthetic_only = synthetic_only
        self.max_train_per_class = max_train_per_class
        self.batch_size, self.seed = batch_size, seed
        self.train: LabelledTable | None = None
        self.val: LabelledTable | None = None
        self.train_latents: LabelledTable | None = None  # for decoding augmentations into pixels
        self.vae: torch.nn.Module | None = None
        self._decoded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch, self._batches_done = 0, 0  # the training position, saved in checkpoints
        self.storage = Storage()  # the run's own (the config's `s3:` section) comes through use_storage()

    def use_storage(self, storage: Storage) -> None:
        """Read shards through `storage` (built by the CLI from the config's settings)."""
        self.storage = storage

    # ---- shape of the data, read by the classifier in configure_model -------------------------------------
    @property
    def in_channels(self) -> int:
        assert self.train is not None, "setup() first"
        return int(self.train.inputs.shape[1])

    @property
    def image_size(self) -> int:
        assert self.train is not None, "setup() first"
        return int(self.train.inputs.shape[-1])

    @property
    def num_classes(self) -> int:
        assert self.train is not None, "setup() first"
        return len(self.train.classes)

    def classification_shape(self) -> tuple[int, int, int]:
        """(input channels, input side, number of classes), for sdtune.contracts.ClassificationData."""
        return self.in_channels, self.image_size, self.num_classes

    @property
    def input_kind(self) -> str:
        assert self.train is not None, "setup() first"
        return "latents" if self.train.latent_settings is not None else "pixels"

    def setup(self, stage: str) -> None:
        if self.train is not None:
            return
        table = read_table(self.shards, "data.shards", self.storage)
        if table.latent_settings is None and self.requested_size:
            table = dataclasses.replace(table, inputs=_resize(table.inputs, self.requested_size))
        train_index, val_index = heldout_split(table.keys, table.labels, self.val_fraction, self.split_seed)
        train_index = cap_per_class(train_index, table.labels, self.max_train_per_class)
        self.train, self.val = table.subset(train_index), table.subset(val_index)
        if self.generated_spec:
            self.generated = self._read_generated(table)
        log.info("data: %d training, %d held-out samples, %d classes", len(self.train), len(self.val), self.num_classes)
        if self.augment and table.latent_settings is None:
            self._setup_decoded_augmentation()

    def _read_generated(self, real: LabelledTable) -> LabelledTable:
        assert self.generated_spec is not None
        made = read_table(self.generated_spec, "data.generated", self.storage)
        if (made.latent_settings is None) != (real.latent_settings is None):
            kinds = ("images" if made.latent_settings is None else "latents", self.input_kind)
            raise ValueError(f"data.generated: {self.generated_spec} holds {kinds[0]} but data.shards {kinds[1]}")
        if made.latent_settings is not None and made.latent_settings.differences(real.latent_settings):  # type: ignore[arg-type]
            raise ValueError(f"data.generated: {self.generated_spec} was encoded with other latent settings")
        if made.classes != real.classes:
            raise ValueError(f"data.generated: classes {made.classes} differ from data.shards' {real.classes}")
        if made.latent_settings is None and made.inputs.shape[-1] != real.inputs.shape[-1]:
            made = dataclasses.replace(made, inputs=_resize(made.inputs, real.inputs.shape[-1]))
        return made

    def _setup_decoded_augmentation(self) -> None:
        if not self.latents_spec:
            raise ValueError(
                "data.latents: augmenting a pixel classifier needs the latent shards of the same images "
                "(data_tools encode_latents), to augment in latent space and decode"
            )
        latents = read_table(self.latents_spec, "data.latents", self.storage)
        if latents.latent_settings is None:
            raise ValueError(f"data.latents: {self.latents_spec} holds images, not latents (see encode_latents)")
        assert self.train is not None
        position = {key: i for i, key in enumerate(latents.keys)}
        missing = [k for k in self.train.keys if k not in position]
        if missing:
            raise ValueError(f"data.latents: {len(missing)} training image(s) have no latent, e.g. {missing[0]}")
        self.train_latents = latents.subset([position[k] for k in self.train.keys])
        settings = latents.latent_settings
        self.vae = load_vae_of(settings)

    def synthetic(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmentations' samples for `epoch`: latents, or images decoded from them for pixel inputs
        (decoding is slow: pixel inputs get one draw per run, made at the first epoch)."""
        assert self.train is not None
        if self.train_latents is not None and self._decoded is not None:
            return self._decoded
        source = self.train_latents if self.train_latents is not None else self.train
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        latents, labels = source.inputs, source.labels
        new_latents, new_labels = latents[:0], labels[:0]
        for transform in self.augment:
            made, made_labels = transform(latents, labels, generator)
            new_latents, new_labels = torch.cat([new_latents, made]), torch.cat([new_labels, made_labels])
        if self.train_latents is None:
            return new_latents, new_labels
        assert self.vae is not None and source.latent_settings is not None
        self._decoded = (_resize(decode(self.vae, new_latents, source.latent_settings), self.image_size), new_labels)
        return self._decoded

    def train_dataloader(self) -> DataLoader:
        inputs, labels = self.training_set()
        order = EpochOrder(len(labels), self.batch_size, self.seed, self._start_epoch)
        return DataLoader(TensorDataset(inputs, labels), batch_size=self.batch_size, sampler=order, drop_last=False)

    def _start_epoch(self, num_batches: int) -> tuple[int, int]:
        """(epoch, batches already trained in it) for a new iteration: the next epoch once this one is done;
        iterating again before a batch is trained gives the same answer."""
        if self._batches_done >= num_batches:
            self._epoch, self._batches_done = self._epoch + 1, 0
        return self._epoch, self._batches_done

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self._batches_done += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_done": self._batches_done, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"data.batch_size: {self.batch_size}, but the checkpoint was trained with {state['batch_size']}; "
                "resume with the same batch size"
            )
        self._epoch, self._batches_done = state["epoch"], state["batches_done"]

    def export_info(self) -> dict[str, Any]:
        """What a classifier exported from this data needs to be used: classes, input kind, latent settings, split."""
        assert self.train is not None, "setup() first"
        settings = self.train.latent_settings
        return {
            "classes": self.train.classes,
            "input": self.input_kind,
            "latent_settings": settings.to_json() if settings else None,
            "split": {"val_fraction": self.val_fraction, "split_seed": self.split_seed},
        }

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's training inputs and labels: real, real + synthetic, or synthetic only."""
        assert self.train is not None, "setup() first"
        inputs, labels = self.train.inputs, self.train.labels
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self.augment or self.generated is not None:
            new_inputs, new_labels = self.synthetic(epoch) if self.augment else (inputs[:0], labels[:0])
            if self.generated is not None:
                new_inputs = torch.cat([new_inputs, self.generated.inputs.to(new_inputs.dtype)])
                new_labels = torch.cat([new_labels, self.generated.labels])
            if self.synthetic_only:
                inputs, labels = new_inputs, new_labels
            else:
                inputs, labels = torch.cat([inputs, new_inputs]), torch.cat([labels, new_labels])
        return inputs, labels

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None, "setup() first"
        return DataLoader(TensorDataset(self.val.inputs, self.val.labels), batch_size=256)
