"""One place that opens, lists, reads, writes and deletes by URL.

    data/ds, /abs/path, file:///abs/path    local files
    s3://bucket/prefix                        S3 or Cloudflare R2 (boto3; see `sdtune.storage.s3`)
    hf://user/repo[@rev]/path                 a Hugging Face Hub model repo; hf://datasets/user/repo/... for datasets

Shell pipes (`pipe:`) are refused: a URL from a config must never run a command. Credentials come from
the environment or the usual credential files only (boto3's and huggingface_hub's own lookup).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from braceexpand import braceexpand

from sdtune.storage.local import LocalBackend
from sdtune.storage.settings import S3Settings


class StorageBackend(Protocol):
    def open_read(self, url: str) -> BinaryIO: ...

    def list(self, url: str, suffix: str) -> list[str]:
        """Files directly under a folder/prefix (or matching a glob) whose names end with `suffix`."""
        ...

    def walk(self, url: str) -> dict[str, int]:
        """Every file under a folder/prefix, recursively: relative name -> bytes."""
        ...

    def exists(self, url: str) -> bool: ...

    def fingerprint(self, url: str) -> str:
        """Changes whenever the file's content may have: size plus mtime, ETag or blob id."""
        ...

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None: ...

    def download(self, url: str, local: Path) -> None: ...

    def delete(self, urls: list[str]) -> None: ...


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        raise ValueError(f"{url!r}: pipe: URLs run a shell command and are not accepted; give a path or URL")
    scheme = urlparse(url).scheme
    # A Windows drive letter or a relative path has no real scheme.
    return "" if len(scheme) <= 1 else scheme


def is_remote(url: str) -> bool:
    return scheme_of(url) not in ("", "file")


def reopen_count(stream: BinaryIO) -> int:
    """Times a stream from `Storage.open_read` re-opened its source after a dropped connection (0 for local files)."""
    return getattr(getattr(stream, "raw", stream), "reopens", 0)


class Storage:
    """The storage backends of one run, built from its settings and passed to whatever reads or writes URLs.

    Backends whose client libraries are heavy (boto3, huggingface_hub) are built on first use of their
    scheme. A Storage pickles as its settings (DataLoader workers started by spawn rebuild their clients).
    """

    def __init__(self, s3: S3Settings | None = None) -> None:
        self.s3 = s3 or S3Settings()
        self._backends: dict[str, StorageBackend] = {}

    def __getstate__(self) -> dict:
        return {"s3": self.s3}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s3"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage(s3={self.s3})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.s3 == self.s3

    def __hash__(self) -> int:
        return hash(self.s3)

    def backend_for(self, url: str) -> StorageBackend:
        scheme = scheme_of(url)
        if scheme not in self._backends:
            self._backends[scheme] = self._build(url, scheme)
        return self._backends[scheme]

    def _build(self, url: str, scheme: str) -> StorageBackend:
        if scheme in ("", "file"):
            return LocalBackend()
        if scheme == "s3":
            from sdtune.storage.s3 import S3Backend

            return S3Backend(self.s3)
        if scheme == "hf":
            from sdtune.storage.hub import HubBackend

            return HubBackend()
        raise ValueError(f"{url!r}: no storage backend for {scheme}:// (known: local paths, file://, s3://, hf://)")

    def open_read(self, url: str) -> BinaryIO:
        return self.backend_for(url).open_read(url)

    def read_bytes(self, url: str) -> bytes:
        with self.open_read(url) as f:
            return f.read()

    def exists(self, url: str) -> bool:
        return self.backend_for(url).exists(url)

    def walk(self, url: str) -> dict[str, int]:
        return self.backend_for(url).walk(url)

    def fingerprint(self, url: str) -> str:
        return self.backend_for(url).fingerprint(url)

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
        self.backend_for(url).upload(local, url, metadata)

    def download(self, url: str, local: Path) -> None:
        self.backend_for(url).download(url, local)

    def delete(self, urls: list[str]) -> None:
        """Delete files; all URLs must share one scheme."""
        if urls:
            self.backend_for(urls[0]).delete(urls)

    def expand_urls(self, spec: str, suffix: str = ".tar") -> list[str]:
        """Shard URLs from a brace pattern (`ds/shard-{000000..000009}.tar`), a folder/prefix, or a glob."""
        urls: list[str] = []
        for part in braceexpand(spec):
            if part.endswith(suffix) and not any(ch in part for ch in "*?["):
                urls.append(part)
            else:
                urls.extend(self.backend_for(part).list(part, suffix))
        return urls


def join(base: str, *names: str) -> str:
    if not scheme_of(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
