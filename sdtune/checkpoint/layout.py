"""Checkpoint folders: names, the manifest written last, verification, and finding the newest complete one.

    <run>/checkpoints/epoch=0003-step=000120/
        unet/ (or lora/)            diffusers-layout safetensors weights
        unet_ema/ (or lora_ema/)    the EMA weights, when EMA is on
        training_state.safetensors  optimizer, scheduler, loops, callbacks, RNG and data position (no pickle)
        samples.png                 the sample grid of this step, when one was rendered
        manifest.json               written last: files, sizes, sha256, epoch, step, config hash, base model

A folder without a valid manifest does not exist for resume.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from sdtune.fileio import sha256_file, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.safetensors"
FORMAT = "sdtune-checkpoint/2"
_TAG = re.compile(r"^epoch=(\d+)-step=(\d+)$")


def due(trainer: L.Trainer, batch_idx: int, every_n_epochs: int, every_n_train_steps: int) -> bool:
    """Whether a per-epoch or per-step action is due after this batch.

    Epoch-end actions run in `on_train_batch_end` of the epoch's last batch, not in `on_train_epoch_end`:
    Lightning resumes a checkpoint written there into a fresh next epoch, whereas one written in
    `on_train_epoch_end` is restored into an epoch that runs no batches.
    """
    last_batch = batch_idx + 1 == trainer.num_training_batches
    if every_n_epochs and last_batch and (trainer.current_epoch + 1) % every_n_epochs == 0:
        return True
    return bool(every_n_train_steps) and trainer.global_step % every_n_train_steps == 0


def checkpoint_tag(trainer: L.Trainer) -> str:
    return f"epoch={trainer.current_epoch:04d}-step={trainer.global_step:06d}"


def parse_tag(name: str) -> tuple[int, int] | None:
    """(step, epoch) of a checkpoint folder name, or None if it is not one."""
    match = _TAG.match(name)
    return (int(match[2]), int(match[1])) if match else None


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    epoch: int
    step: int

    @property
    def training_state(self) -> Path:
        return self.path / TRAINING_STATE


def write_manifest(folder: Path, meta: dict[str, Any], known: dict[str, tuple[str, int]] | None = None) -> Path:
    """Write manifest.json (atomically) as the last file: every file in `folder` with its size and sha256.

    `known` gives (sha256, bytes) of files hashed while they were written; the others are read and hashed here.
    """
    known = known or {}
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and path.name != MANIFEST:
            digest, size = known.get(name) or (sha256_file(path), path.stat().st_size)
            files[name] = {"bytes": size, "sha256": digest}
    manifest = {"format": FORMAT, "created_unix": time.time(), **meta, "files": files}
    return write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def verify_checkpoint(folder: Path, check_hashes: bool = True, need_state: bool = True) -> str | None:
    """None when the folder is a complete checkpoint, else the reason it is not (without `need_state`, a
    weights-only checkpoint, one published with `hub_weights_only`, is complete too)."""
    if not (folder / MANIFEST).is_file():
        return "no manifest.json (incomplete write)"
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as err:
        return f"unreadable manifest.json ({err})"
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r} is not {FORMAT}"
    if need_state and TRAINING_STATE not in manifest.get("files", {}):
        return f"manifest lists no {TRAINING_STATE}"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
        if check_hashes and sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def list_checkpoints(checkpoint_dir: Path) -> list[CheckpointRef]:
    """Checkpoint folders (complete or not), newest first; temp folders (dot-prefixed) are ignored."""
    refs = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            key = parse_tag(path.name)
            if key and path.is_dir():
                refs.append(CheckpointRef(path, epoch=key[1], step=key[0]))
    return sorted(refs, key=lambda r: (r.step, r.epoch), reverse=True)


def find_latest_checkpoint(checkpoint_dir: Path) -> CheckpointRef | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for ref in list_checkpoints(checkpoint_dir):
        problem = verify_checkpoint(ref.path)
        if problem is None:
            return ref
        log.warning("skipping checkpoint %s: %s", ref.path, problem)
    return None
