"""One place that turns storage URLs into file objects and listings.

A plain path or `file://` URL is local. Other schemes (`s3://`, `hf://`) plug in here as backends;
shell pipes (`pipe:`) are refused because a URL from a config must never run a command.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from braceexpand import braceexpand


class StorageBackend(Protocol):
    def open_read(self, url: str) -> BinaryIO: ...

    def list(self, url: str, suffix: str) -> list[str]: ...

    def exists(self, url: str) -> bool: ...


class LocalBackend:
    """Local files; `url` is a path or a `file://` URL."""

    @staticmethod
    def path(url: str) -> Path:
        return Path(urlparse(url).path if url.startswith("file://") else url).expanduser()

    def open_read(self, url: str) -> BinaryIO:
        return self.path(url).open("rb")

    def list(self, url: str, suffix: str) -> list[str]:
        root = self.path(url)
        if root.is_dir():
            return sorted(str(p) for p in root.iterdir() if p.name.endswith(suffix) and p.is_file())
        return sorted(p for p in glob.glob(str(root)) if p.endswith(suffix))

    def exists(self, url: str) -> bool:
        return self.path(url).exists()


_BACKENDS: dict[str, StorageBackend] = {"": LocalBackend(), "file": LocalBackend()}


def register_backend(scheme: str, backend: StorageBackend) -> None:
    """Plug in a backend for a URL scheme (e.g. `s3`)."""
    _BACKENDS[scheme] = backend


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        raise ValueError(f"{url!r}: pipe: URLs run a shell command and are not accepted; give a path or URL")
    scheme = urlparse(url).scheme
    # A Windows drive letter or a relative path has no real scheme.
    return "" if len(scheme) <= 1 else scheme


def backend_for(url: str) -> StorageBackend:
    scheme = scheme_of(url)
    if scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS) if s) or "none"
        raise ValueError(f"{url!r}: no storage backend for {scheme}:// (known: local paths, {known})")
    return _BACKENDS[scheme]


def open_read(url: str) -> BinaryIO:
    return backend_for(url).open_read(url)


def exists(url: str) -> bool:
    return backend_for(url).exists(url)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if scheme_of(base) else os.path.join(base, name)


def expand_urls(spec: str, suffix: str = ".tar") -> list[str]:
    """Shard URLs from a brace pattern (`ds/shard-{000000..000009}.tar`), a folder/prefix, or a glob."""
    urls: list[str] = []
    for part in braceexpand(spec):
        if part.endswith(suffix) and not any(ch in part for ch in "*?["):
            urls.append(part)
        else:
            urls.extend(backend_for(part).list(part, suffix))
    return urls
