"""hf://owner/name[@revision]/path on the Hugging Face Hub, through huggingface_hub.

`hf://owner/name/...` is a model repo; `hf://datasets/owner/name/...` a dataset repo. The endpoint is
huggingface_hub's (HF_ENDPOINT) and the token its own lookup (HF_TOKEN or `hf auth login`); sdtune never
handles the token. Writes through this backend are one commit per call; checkpoint publishing builds its
own single commit per checkpoint (`sdtune.checkpoint.publish`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile

from sdtune.storage.local import copy_atomic

_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class HubPath:
    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    path: str = ""

    def url(self, path: str | None = None) -> str:
        kind = next((k + "/" for k, v in _REPO_TYPES.items() if v == self.repo_type), "")
        rev = f"@{self.revision}" if self.revision else ""
        sub = path if path is not None else self.path
        return f"hf://{kind}{self.repo_id}{rev}" + (f"/{sub}" if sub else "")


def parse_hub_url(url: str) -> HubPath:
    if not url.startswith("hf://"):
        raise ValueError(f"{url!r} is not an hf:// URL")
    parts = url[len("hf://") :].strip("/").split("/")
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{url!r}: expected hf://owner/name[@revision]/path (or hf://datasets/owner/name/...)")
    name, _, revision = parts[1].partition("@")
    return HubPath(f"{parts[0]}/{name}", repo_type, revision or None, "/".join(parts[2:]))


def _explain(err: Exception, url: str) -> Exception:
    if isinstance(err, RepositoryNotFoundError):
        return FileNotFoundError(f"{url}: repository not found, or no access (check the name and HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return FileNotFoundError(f"{url}: no such revision/branch")
    if isinstance(err, EntryNotFoundError):
        return FileNotFoundError(f"{url}: no such file")
    return err


class HubBackend:
    def _tree(self, url: str, recursive: bool) -> list[RepoFile]:
        hub = parse_hub_url(url)
        try:
            entries = HfApi().list_repo_tree(
                hub.repo_id,
                path_in_repo=hub.path or None,
                revision=hub.revision,
                repo_type=hub.repo_type,
                recursive=recursive,
            )
            return [e for e in entries if isinstance(e, RepoFile)]
        except EntryNotFoundError:
            return []
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise _explain(err, url) from err

    def _cached(self, url: str) -> Path:
        """The file, downloaded into huggingface_hub's cache (or found there)."""
        hub = parse_hub_url(url)
        try:
            return Path(hf_hub_download(hub.repo_id, hub.path, repo_type=hub.repo_type, revision=hub.revision))
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
            raise _explain(err, url) from err

    def open_read(self, url: str) -> BinaryIO:
        return self._cached(url).open("rb")

    def list(self, url: str, suffix: str) -> list[str]:
        hub = parse_hub_url(url)
        return sorted(hub.url(e.path) for e in self._tree(url, recursive=False) if e.path.endswith(suffix))

    def walk(self, url: str) -> dict[str, int]:
        prefix = parse_hub_url(url).path.strip("/")
        cut = len(prefix) + 1 if prefix else 0
        return {e.path[cut:]: e.size for e in self._tree(url, recursive=True)}

    def fingerprint(self, url: str) -> str:
        hub = parse_hub_url(url)
        try:
            infos = HfApi().get_paths_info(hub.repo_id, [hub.path], revision=hub.revision, repo_type=hub.repo_type)
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise _explain(err, url) from err
        files = [i for i in infos if isinstance(i, RepoFile)]
        if not files:
            raise FileNotFoundError(f"{url}: no such file")
        return f"{files[0].size}:{files[0].blob_id}"

    def exists(self, url: str) -> bool:
        hub = parse_hub_url(url)
        api = HfApi()
        if hub.path and api.file_exists(hub.repo_id, hub.path, repo_type=hub.repo_type, revision=hub.revision):
            return True
        return bool(self._tree(url, recursive=False))

    def upload(self, local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
        hub = parse_hub_url(url)
        op = CommitOperationAdd(path_in_repo=hub.path, path_or_fileobj=str(local))
        HfApi().create_commit(
            hub.repo_id, [op], commit_message=f"Upload {hub.path}", repo_type=hub.repo_type, revision=hub.revision
        )

    def download(self, url: str, local: Path) -> None:
        copy_atomic(self._cached(url), local)

    def delete(self, urls: list[str]) -> None:
        hubs = [parse_hub_url(u) for u in urls]
        first = hubs[0]
        ops = [CommitOperationDelete(path_in_repo=h.path) for h in hubs]
        HfApi().create_commit(
            first.repo_id,
            ops,
            commit_message=f"Delete {len(ops)} file(s)",
            repo_type=first.repo_type,
            revision=first.revision,
        )
