"""Checkpoint folders in remote storage: publish one (manifest last), list the complete ones, fetch one back.

    <remote>/epoch=0003-step=000120/...   the local folder's files; manifest.json is uploaded last

A remote checkpoint without its manifest does not exist: listing ignores it and pruning deletes it once a
newer complete one is there. Pruning deletes a checkpoint's manifest first, then its other files.

`StorageRemote` works for any storage URL (s3://, or a mounted network path). `HubRemote` publishes each
checkpoint as one commit to a Hub repo (under `checkpoints/<tag>/`, with a model card at the root).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sdtune.checkpoint.hub_root import (
    ROOT_RECORD,
    RootRule,
    checkpoint_score,
    replaces_root,
    root_card_section,
    root_files,
    root_record,
)
from sdtune.checkpoint.layout import MANIFEST, TRAINING_STATE, parse_tag, read_manifest, verify_checkpoint
from sdtune.fileio import fsync_dir
from sdtune.storage import Storage, join

log = logging.getLogger(__name__)


class Remote(Protocol):
    url: str

    def prepare(self) -> None: ...

    def publish(self, folder: Path, tag: str, card: str) -> None: ...

    def complete_tags(self) -> list[str]: ...

    def fetch(self, tag: str, checkpoint_dir: Path) -> Path:
        """Download checkpoint `tag` into `checkpoint_dir/<tag>` and verify it."""
        ...


def complete_checkpoints(files: dict[str, int], need_state: bool = True) -> list[str]:
    """Tags (newest first) of checkpoint folders in a recursive listing that have their manifest."""
    by_tag: dict[str, set[str]] = {}
    for name in files:
        tag, _, rest = name.partition("/")
        if parse_tag(tag) is not None and rest:
            by_tag.setdefault(tag, set()).add(rest)
    complete = [t for t, names in by_tag.items() if MANIFEST in names and (TRAINING_STATE in names or not need_state)]
    return sorted(complete, key=lambda t: parse_tag(t), reverse=True)  # type: ignore[arg-type,return-value]


def fetch_checkpoint(
    remote_url: str, tag: str, checkpoint_dir: Path, storage: Storage, need_state: bool = True
) -> Path:
    """Download a remote checkpoint into `checkpoint_dir/<tag>` (via a temp folder) and verify its hashes (a
    weights-only one too, without `need_state`)."""
    base = join(remote_url, tag)
    tmp = checkpoint_dir / f".tmp-fetch-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    storage.download(join(base, MANIFEST), tmp / MANIFEST)
    manifest = json.loads((tmp / MANIFEST).read_text())
    for name in manifest["files"]:
        storage.download(join(base, name), tmp / name)
    problem = verify_checkpoint(tmp, need_state=need_state)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{base}: downloaded checkpoint does not verify: {problem}")
    final = checkpoint_dir / tag
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(checkpoint_dir)
    return final


class StorageRemote:
    """Full checkpoints under a storage URL (s3://bucket/prefix or a path); keeps the newest `keep_last`."""

    def __init__(self, url: str, keep_last: int, storage: Storage) -> None:
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.storage = storage

    def prepare(self) -> None:
        backend = self.storage.backend_for(self.url)
        if hasattr(backend, "abort_multipart_uploads"):
            aborted = backend.abort_multipart_uploads(self.url + "/")
            if aborted:
                log.warning("aborted %d unfinished multipart upload(s) under %s (from a killed run)", aborted, self.url)

    def publish(self, folder: Path, tag: str, card: str) -> None:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        for path in files:
            self.storage.upload(path, join(self.url, tag, str(path.relative_to(folder))))
        self.storage.upload(folder / MANIFEST, join(self.url, tag, MANIFEST))
        self.prune()

    def complete_tags(self) -> list[str]:
        return complete_checkpoints(self.storage.walk(self.url))

    def fetch(self, tag: str, checkpoint_dir: Path) -> Path:
        return fetch_checkpoint(self.url, tag, checkpoint_dir, self.storage)

    def prune(self) -> None:
        files = self.storage.walk(self.url)
        complete = complete_checkpoints(files)
        if not complete:
            return
        newest = parse_tag(complete[0])
        doomed = set(complete[self.keep_last :])
        # Folders without a manifest older than the newest complete one are uploads cut short.
        doomed |= {n.partition("/")[0] for n in files if (t := parse_tag(n.partition("/")[0])) and t < newest}
        doomed -= set(complete[: self.keep_last])
        for tag in sorted(doomed):
            names = [n for n in files if n.startswith(f"{tag}/")]
            self.storage.delete([join(self.url, tag, MANIFEST)])
            self.storage.delete([join(self.url, n) for n in names if n != f"{tag}/{MANIFEST}"])
            log.info("remote: deleted old checkpoint %s/%s", self.url, tag)


def with_retry(call: Callable[[], Any], what: str, budget_s: float = 600.0, max_attempts: int = 8) -> Any:
    """Run `call`, retrying HTTP 429/5xx with the server's Retry-After (or backoff), within a time budget."""
    from huggingface_hub.errors import HfHubHTTPError

    start = time.monotonic()
    for attempt in range(1, max_attempts + 1):
        try:
            return call()
        except HfHubHTTPError as err:
            response = err.response
            status = response.status_code if response is not None else 0
            if status != 429 and status < 500 or attempt == max_attempts:
                raise
            retry_after = response.headers.get("Retry-After") if response is not None else None
            wait = float(retry_after) if retry_after and retry_after.isdigit() else min(2.0**attempt, 60.0)
            if time.monotonic() - start + wait > budget_s:
                raise
            log.warning("%s: HTTP %d, retrying in %.0f s (attempt %d/%d)", what, status, wait, attempt, max_attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")


class HubRemote:
    """Each checkpoint is one commit to `repo` at `revision`: files under `checkpoints/<tag>/` plus README.md.

    `weights_only` leaves the training state out (safetensors weights, samples and manifest only): such
    checkpoints are for sharing and cannot be resumed from.
    """

    def __init__(
        self,
        repo: str,
        revision: str,
        keep_last: int,
        storage: Storage,
        private: bool = True,
        weights_only: bool = False,
        root: RootRule | None = None,
        save_base: Callable[[Path], None] | None = None,
    ) -> None:
        self.repo = repo
        self.storage = storage
        self.revision = revision
        self.keep_last = keep_last
        self.private = private
        self.weights_only = weights_only
        self.url = f"hf://{repo}@{revision}/checkpoints"
        # The root pipeline (sdtune.checkpoint.hub_root): needs the module's base model writer.
        self.root = root if root is not None and save_base is not None else RootRule("none")
        self.save_base = save_base
        self.root_state: dict[str, Any] | None = None

    def prepare(self) -> None:
        from huggingface_hub import HfApi

        api = HfApi()
        with_retry(lambda: api.create_repo(self.repo, private=self.private, exist_ok=True), f"create {self.repo}")
        if self.revision != "main":
            with_retry(lambda: api.create_branch(self.repo, branch=self.revision, exist_ok=True), "create branch")
        if self.root.kind != "none":
            record_url = f"hf://{self.repo}@{self.revision}/{ROOT_RECORD}"
            self.root_state = (
                json.loads(self.storage.read_bytes(record_url)) if self.storage.exists(record_url) else None
            )

    def complete_tags(self) -> list[str]:
        return complete_checkpoints(self.storage.walk(self.url))

    def fetch(self, tag: str, checkpoint_dir: Path) -> Path:
        return fetch_checkpoint(self.url, tag, checkpoint_dir, self.storage)

    def publish(self, folder: Path, tag: str, card: str) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if self.weights_only:
            files = [p for p in files if p.name != TRAINING_STATE]
        ops: list[Any] = [CommitOperationAdd(f"checkpoints/{tag}/{p.relative_to(folder)}", str(p)) for p in files]
        root_ops, new_root = self._root_operations(folder, tag)
        ops += root_ops
        root = new_root or self.root_state
        if root is not None:
            section = root_card_section(root, self.repo)
            card = card.replace("\n## Samples\n", f"\n{section}\n## Samples\n", 1)
        ops.append(CommitOperationAdd("README.md", card.encode()))
        existing = complete_checkpoints(self.storage.walk(self.url), need_state=False)
        for old in [t for t in existing if t != tag][self.keep_last - 1 :]:
            ops.append(CommitOperationDelete(f"checkpoints/{old}/", is_folder=True))
        api = HfApi()
        info = with_retry(
            lambda: api.create_commit(
                self.repo, ops, commit_message=f"sdtune checkpoint {tag}", revision=self.revision
            ),
            f"commit {tag} to {self.repo}",
        )
        log.info("hub: %s committed %s (%s)", self.repo, tag, info.oid)
        if new_root is not None:
            self.root_state = new_root
            log.info("hub: %s root pipeline is now %s (%s)", self.repo, tag, self.root)

    def _root_operations(self, folder: Path, tag: str) -> tuple[list[Any], dict[str, Any] | None]:
        """The commit's additions that make `folder` the root pipeline, and the new root record; none when the rule
        keeps the current root."""
        from huggingface_hub import CommitOperationAdd

        rule = self.root
        score = checkpoint_score(folder, rule.metric) if rule.metric else None
        if not replaces_root(rule, self.root_state, score):
            return [], None
        if rule.kind == "best" and score is None:
            log.warning("hub_root: %s has no %s score (no eval.json from the Evaluate callback); it is the root only "
                        "until a scored checkpoint comes", tag, rule.metric)  # fmt: skip
        assert self.save_base is not None
        base_model = str(read_manifest(folder).get("base_model"))
        with_base = self.root_state is None or self.root_state.get("base_model") != base_model
        files = root_files(folder, folder.parent / ".hub-root", self.save_base, with_base)
        record = root_record(rule, tag, score, base_model)
        ops = [CommitOperationAdd(name, str(path)) for name, path in files.items()]
        return ops + [CommitOperationAdd(ROOT_RECORD, json.dumps(record, indent=2).encode())], record
