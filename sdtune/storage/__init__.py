"""One place that opens, lists, reads, writes and deletes by URL.

    data/ds, /abs/path, file:///abs/path    local files
    s3://bucket/prefix                        S3 or Cloudflare R2 (boto3; see `sdtune.storage.s3`)
    hf://user/repo[@rev]/path                 a Hugging Face Hub model repo; hf://datasets/user/repo/... for datasets

Shell pipes (`pipe:`) are refused: a URL from a config must never run a command. Credentials come from
the environment or the usual credential files only (boto3's and huggingface_hub's own lookup).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from braceexpand import braceexpand

from sdtune.storage.local import LocalBackend


class StorageBackend(Protocol):
    def open_read(self, url: str) -> BinaryIO: ...

    def list(self, url: str, suffix: str) -> list[str]:
        """Files directly under a folder/prefix (or matching a glob) whose names end with `suffix`."""
        ...

    def walk(self, url: str) -> dict[str, int]:
        """Every file under a folder/prefix, recursively: relative name -> bytes."""
        ...

    def exists(self, url: str) -> bool: ...

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None: ...

    def download(self, url: str, local: Path) -> None: ...

    def delete(self, urls: list[str]) -> None: ...


_BACKENDS: dict[str, StorageBackend] = {"": LocalBackend(), "file": LocalBackend()}
# Backends whose client libraries are imported only when a URL of theirs is used.
_LAZY = {"s3": "sdtune.storage.s3:S3Backend", "hf": "sdtune.storage.hub:HubBackend"}


def register_backend(scheme: str, backend: StorageBackend) -> None:
    """Plug in a backend for a URL scheme."""
    _BACKENDS[scheme] = backend


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        raise ValueError(f"{url!r}: pipe: URLs run a shell command and are not accepted; give a path or URL")
    scheme = urlparse(url).scheme
    # A Windows drive letter or a relative path has no real scheme.
    return "" if len(scheme) <= 1 else scheme


def is_remote(url: str) -> bool:
    return scheme_of(url) not in ("", "file")


def backend_for(url: str) -> StorageBackend:
    scheme = scheme_of(url)
    if scheme not in _BACKENDS and scheme in _LAZY:
        module, name = _LAZY[scheme].split(":")
        register_backend(scheme, getattr(importlib.import_module(module), name)())
    if scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted({*_BACKENDS, *_LAZY}) if s)
        raise ValueError(f"{url!r}: no storage backend for {scheme}:// (known: local paths, {known})")
    return _BACKENDS[scheme]


def open_read(url: str) -> BinaryIO:
    return backend_for(url).open_read(url)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def reopen_count(stream: BinaryIO) -> int:
    """Times a stream from `open_read` re-opened its source after a dropped connection (0 for local files)."""
    return getattr(getattr(stream, "raw", stream), "reopens", 0)


def exists(url: str) -> bool:
    return backend_for(url).exists(url)


def walk(url: str) -> dict[str, int]:
    return backend_for(url).walk(url)


def upload(local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
    backend_for(url).upload(local, url, metadata)


def download(url: str, local: Path) -> None:
    backend_for(url).download(url, local)


def delete(urls: list[str]) -> None:
    """Delete files; all URLs must share one scheme."""
    if urls:
        backend_for(urls[0]).delete(urls)


def join(base: str, *names: str) -> str:
    if not scheme_of(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def expand_urls(spec: str, suffix: str = ".tar") -> list[str]:
    """Shard URLs from a brace pattern (`ds/shard-{000000..000009}.tar`), a folder/prefix, or a glob."""
    urls: list[str] = []
    for part in braceexpand(spec):
        if part.endswith(suffix) and not any(ch in part for ch in "*?["):
            urls.append(part)
        else:
            urls.extend(backend_for(part).list(part, suffix))
    return urls
