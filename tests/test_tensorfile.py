"""The streaming safetensors writer and host snapshots behind background checkpoint writes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

from sdtune.tensorfile import HostSnapshot, TensorFile, write_tensor_file


def test_written_files_are_standard_safetensors_hashed_while_written(tmp_path):
    tensors = {
        "w": torch.randn(5, 3),
        "steps": torch.arange(7),
        "half": torch.randn(4).bfloat16(),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False, True]),
        "bits": torch.tensor([1, 2, 3], dtype=torch.uint32),
        "view": torch.randn(6, 4)[:, 1],  # not contiguous
    }
    path = tmp_path / "a.safetensors"
    digest, size = write_tensor_file(path, TensorFile(tensors, {"format": "pt"}, torch.float16))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert size == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        back = {name: f.get_tensor(name) for name in f.keys()}
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        assert back[name].dtype == expected.dtype, name
        assert torch.equal(back[name], expected), name


def test_bytes_are_written_as_they_are(tmp_path):
    digest, size = write_tensor_file(tmp_path / "config.json", b'{"a": 1}\n')
    assert (tmp_path / "config.json").read_bytes() == b'{"a": 1}\n'
    assert (digest, size) == (hashlib.sha256(b'{"a": 1}\n').hexdigest(), 9)


def test_a_snapshot_copies_a_source_once_per_version():
    param = torch.ones(3)
    snapshot = HostSnapshot()
    first = snapshot.copy(param)
    assert snapshot.copy(param) is first  # the training state and the export share one host copy
    assert snapshot.copy(first) is first  # a copy handed back in is not copied again
    param.add_(1)  # new values in the same storage (EMA weights swapped in): copied again
    second = snapshot.copy(param)
    assert second is not first
    assert torch.equal(first, torch.ones(3)) and torch.equal(second, torch.full((3,), 2.0))
    assert snapshot.bytes_copied == 2 * 3 * 4


def test_unknown_dtypes_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="z: dtype torch.complex64"):
        write_tensor_file(tmp_path / "c.safetensors", TensorFile({"z": torch.zeros(2, dtype=torch.complex64)}))
