"""Safetensors files written in one streaming pass (sha256 computed while writing), from host snapshots.

A checkpoint is taken in two halves. On the training thread, `HostSnapshot` copies the live tensors to host
memory (the only part that must see the weights of this step). Off it, `write_tensor_file` serialises them,
casting to the export dtype tensor by tensor, hashing the bytes as they are written, and fsyncs the file.
The files are standard safetensors (`safetensors.safe_open` and diffusers read them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_CHUNK = 64 << 20  # bytes per write and hash update


@dataclass
class TensorFile:
    """Tensors (and string metadata) to write as one safetensors file; floating tensors are cast to `dtype`."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype | None = None

    def stored_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * self.stored_dtype(t).itemsize for t in self.tensors.values())


FileContent = TensorFile | bytes


class HostSnapshot:
    """Host copies of live tensors, each source copied once per snapshot.

    A source is known by its storage, layout and version counter (`Tensor._version` grows with every in-place
    write): a parameter copied for the training state is not copied again for the exported weights, but the same
    parameter holding other values (EMA weights swapped in) is. Sources are kept alive until the snapshot is
    dropped, so an address cannot be reused by another tensor in between.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hosts: set[int] = set()  # storages of the copies: a copy handed back in is not copied again
        self.bytes_copied = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self._hosts:
            return tensor
        tensor = tensor.detach()
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.dtype,
            tuple(tensor.shape),
            tensor.stride(),
            tensor._version,
        )
        if key not in self._copies:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            host.copy_(tensor)
            self._copies[key] = (tensor, host)
            self._hosts.add(host.untyped_storage().data_ptr())
            self.bytes_copied += host.numel() * host.element_size()
        return self._copies[key][1]

    def file(self, content: FileContent) -> FileContent:
        """`content` with its tensors replaced by host copies (bytes are immutable: kept as they are)."""
        if isinstance(content, bytes):
            return content
        return TensorFile({k: self.copy(v) for k, v in content.tensors.items()}, dict(content.metadata), content.dtype)


def replace_values(
    state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` (a state dict of live tensors) with each tensor of `params[name]` replaced by `values[name]`,
    matched by storage: e.g. the EMA weights exported under the model's own weight names."""
    by_storage = {param.data_ptr(): values[name] for name, param in params.items()}
    return {key: by_storage.get(tensor.data_ptr(), tensor) for key, tensor in state.items()}


def _header(content: TensorFile) -> bytes:
    entries: dict[str, object] = {}
    offset = 0
    for name, tensor in content.tensors.items():
        dtype = content.stored_dtype(tensor)
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be written to safetensors here")
        size = tensor.numel() * dtype.itemsize
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if content.metadata:
        entries["__metadata__"] = content.metadata
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header


def write_tensor_file(path: Path, content: FileContent) -> tuple[str, int]:
    """Write `content` to `path` (fsynced); returns (sha256, bytes) of what was written, hashed on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with path.open("wb") as f:

        def put(data: bytes | memoryview) -> None:
            nonlocal size
            for start in range(0, len(data), _CHUNK):
                chunk = data[start : start + _CHUNK]
                digest.update(chunk)
                f.write(chunk)
            size += len(data)

        if isinstance(content, bytes):
            put(content)
        else:
            put(_header(content))
            for tensor in content.tensors.values():
                stored = tensor.to(content.stored_dtype(tensor)).contiguous().reshape(-1)
                if stored.numel():
                    put(memoryview(stored.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), size


def write_files(folder: Path, files: dict[str, FileContent]) -> dict[str, tuple[str, int]]:
    """Write `files` (names relative to `folder`); returns each file's (sha256, bytes)."""
    return {name: write_tensor_file(folder / name, content) for name, content in files.items()}
