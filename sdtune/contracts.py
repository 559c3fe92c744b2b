"""What a LightningModule or DataModule must offer to be trained with sdtune's callbacks, written as Protocols.

The callbacks check them when fit starts (`require`), so a module that lacks something fails at once with
the names of what is missing, not with an AttributeError in the middle of the first epoch. Optional
abilities (a DataModule that counts skipped samples) are checked with `isinstance`, never `hasattr`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch

if TYPE_CHECKING:
    from pathlib import Path

    import lightning as L

    from sdtune.storage import Storage
    from sdtune.tensorfile import FileContent

T = TypeVar("T")


@runtime_checkable
class HasTrainableParameters(Protocol):
    """EMA and the training state keep only these (the frozen parts come from the base model)."""

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]: ...


@runtime_checkable
class Exportable(HasTrainableParameters, Protocol):
    """A checkpoint exports the weights in a format other tools load (diffusers layout for SD, safetensors +
    classifier.json for a classifier)."""

    def model_for_export(self) -> Any:
        """The full model to export (every rank calls it: FSDP gathers here); None on ranks that do not write."""
        ...

    def export_files(
        self,
        suffix: str = "",
        model: Any = None,
        dtype: torch.dtype | None = None,
        values: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, FileContent]:
        """The files of `model` (default: the module's own) in the format other tools load, by path relative to
        the checkpoint folder. Floating weights are cast to `dtype` when written; `values` replaces trainable
        parameters (by name) with other values, e.g. the EMA weights. Tensors may be the live ones: the caller
        copies them before training goes on."""
        ...


@runtime_checkable
class Sampleable(Protocol):
    """Sample grids run a diffusers pipeline built from these components."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any


@runtime_checkable
class UsesStorage(Protocol):
    """A DataModule or callback that reads or writes URLs: the CLI hands it the run's `Storage`, built from the
    config's `s3:` section, before fit, validate or test."""

    def use_storage(self, storage: Storage) -> None: ...


@runtime_checkable
class ImageData(Protocol):
    """A DataModule of square training images: sample grids render at its resolution."""

    @property
    def resolution(self) -> int: ...


@runtime_checkable
class CountsBadSamples(Protocol):
    """A DataModule that skips bad samples and counts them per reason (logged by `DataStats`)."""

    def bad_sample_counts(self) -> dict[str, int]: ...


@runtime_checkable
class ClassificationData(Protocol):
    """What a `Classifier` builds its network from, and records next to its exported weights (after setup)."""

    def classification_shape(self) -> tuple[int, int, int]:
        """(input channels, input side, number of classes)."""
        ...

    def export_info(self) -> dict[str, Any]: ...


def find_callback(trainer: L.Trainer, cls: type[T]) -> T | None:
    """The trainer's first callback of type `cls`, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def _members(protocol: type) -> list[str]:
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        names += [n for n in (*vars(cls), *getattr(cls, "__annotations__", {})) if not n.startswith("_")]
    return sorted(set(names))


def require(module: object, protocol: type, needed_by: str) -> None:
    """Raise a ValueError naming what `module` lacks of `protocol` (for `needed_by`, a callback)."""
    members = _members(protocol)
    missing = [name for name in members if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"{needed_by} needs a model that offers {protocol.__name__} ({', '.join(members)}); "
            f"{type(module).__name__} lacks {', '.join(missing)}. Remove {needed_by} from trainer.callbacks "
            "or use a model that has them"
        )


@runtime_checkable
class PipelineExportable(Protocol):
    """A module whose checkpoints, with the base model's other parts, make a complete diffusers pipeline (the Hub
    repository's root, `hub_root`)."""

    def save_base_pipeline(self, folder: Path) -> None:
        """Write the base model as a diffusers pipeline folder (safetensors), with this module's scheduler."""
        ...
