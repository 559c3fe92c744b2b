"""The training state (optimizer, LR schedule, loops, callbacks, RNG, data position) as one safetensors file.

Lightning's checkpoint dict is a tree of dicts, lists, tuples, scalars, strings, tensors and NumPy arrays.
Tensors and arrays go into the safetensors body; the rest of the tree goes, as tagged JSON, into the
file's metadata. Loading never unpickles anything, so a checkpoint from a remote bucket or the Hub cannot
run code, and the file can be published wherever safetensors are accepted.

`SafetensorsCheckpointIO` plugs this into Lightning (`trainer.strategy.checkpoint_io`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from sdtune.tensorfile import HostSnapshot, TensorFile, write_tensor_file

_TREE_KEY = "sdtune_tree"


class _Encoder:
    def __init__(self, snapshot: HostSnapshot | None = None) -> None:
        self.snapshot = snapshot  # copy every tensor to the host (the file is written later, off this thread)
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[tuple, str] = {}  # the same tensor met again (bitsandbytes shares its qmaps)
        self._storages: set[int] = set()

    def _store(self, tensor: torch.Tensor) -> str:
        if isinstance(tensor, DTensor):
            raise TypeError("a DTensor reached the training-state file: the strategy must save shards or full tensors")
        tensor = self.snapshot.copy(tensor) if self.snapshot else tensor.detach().to("cpu").contiguous()
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in self._names:
            return self._names[identity]  # stored once, loaded back as one shared tensor
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._storages:
            tensor = tensor.clone()  # another view of a stored storage: safetensors refuses shared memory
        self._storages.add(tensor.untyped_storage().data_ptr())
        name = self._names[identity] = f"t{len(self.tensors)}"
        self.tensors[name] = tensor
        return name

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._store(value)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self._store(torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, np.generic):
            return {"__npscalar__": value.dtype.str, "value": value.item()}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(
            f"training state {where}: a {type(value).__name__} cannot be stored without pickle; "
            "keep checkpoint state to tensors, arrays, numbers, strings, lists, tuples and dicts"
        )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__npscalar__" in value:
        return np.dtype(value["__npscalar__"]).type(value["value"])
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def state_file(state: dict[str, Any], snapshot: HostSnapshot | None = None) -> TensorFile:
    """The training-state file's content; with `snapshot`, its tensors are host copies taken now."""
    encoder = _Encoder(snapshot)
    tree = encoder.encode(state, "checkpoint")
    return TensorFile(encoder.tensors, {_TREE_KEY: json.dumps(tree)})


def save_state(state: dict[str, Any], path: Path) -> None:
    write_tensor_file(path, state_file(state))


def load_state(path: Path, device: str = "cpu") -> dict[str, Any]:
    with safe_open(str(path), framework="pt", device=device) as f:
        metadata = f.metadata() or {}
        if _TREE_KEY not in metadata:
            raise ValueError(f"{path}: not an sdtune training state (no {_TREE_KEY} metadata)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _decode(json.loads(metadata[_TREE_KEY]), tensors)


class DeferredFiles(Protocol):
    """Where a checkpoint being taken collects its files: snapshotted now, written off the training thread."""

    folder: Path
    snapshot: HostSnapshot

    def add(self, name: str, content: TensorFile) -> None: ...


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO that writes and reads the training state with `save_state` / `load_state`.

    While `deferred` is set (by the checkpoint callback, for the duration of one save on this rank), a save
    hands a host snapshot of the state to it instead of writing the file.
    """

    def __init__(self) -> None:
        self.deferred: DeferredFiles | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        if self.deferred is not None and path.parent == self.deferred.folder:
            self.deferred.add(path.name, state_file(checkpoint, self.deferred.snapshot))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training state {path} not found")
        return load_state(Path(path))

    def remove_checkpoint(self, path: Any) -> None:
        if os.path.exists(path):
            os.remove(path)
