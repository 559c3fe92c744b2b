"""Small file helpers shared by data tools and checkpoints: hashing and atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO


def sha256_stream(stream: BinaryIO, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """sha256 hex digest and byte count of everything left in `stream`."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return sha256_stream(f)[0]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a crash after rename must not lose it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write via a temp file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
    return path
