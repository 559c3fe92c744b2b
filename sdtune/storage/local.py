"""Local files: a path or a `file://` URL."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse


class LocalBackend:
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

    def walk(self, url: str) -> dict[str, int]:
        root = self.path(url)
        if not root.is_dir():
            return {}
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    def exists(self, url: str) -> bool:
        return self.path(url).exists()

    def fingerprint(self, url: str) -> str:
        stat = self.path(url).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
        copy_atomic(local, self.path(url))

    def download(self, url: str, local: Path) -> None:
        copy_atomic(self.path(url), local)

    def delete(self, urls: list[str]) -> None:
        for url in urls:
            self.path(url).unlink(missing_ok=True)


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
