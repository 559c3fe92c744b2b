"""What `sdtune eval` evaluates: checkpoints from run folders, checkpoint folders or remote URLs, and the base model.

Each target knows its step (the base model is step 0), which weights to load (the EMA weights when the
checkpoint has them), and an identity: the sha256 of those weights from the checkpoint's manifest (the base
model's: of its UNet weights file), which keys the image cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sdtune.checkpoint.layout import list_checkpoints, parse_tag, read_manifest, verify_checkpoint
from sdtune.checkpoint.remote import complete_checkpoints, fetch_checkpoint
from sdtune.fileio import sha256_file
from sdtune.models.components import TINY_PRESET, TINY_PRETRAINED, resolve_pretrained
from sdtune.storage import Storage, is_remote

log = logging.getLogger(__name__)
BASE = "base"


@dataclass(frozen=True)
class Target:
    label: str  # "base" or the checkpoint's tag
    step: int
    identity: str  # sha256 of the weights (cache key)
    base_model: str  # model.pretrained of the run: the rest of the pipeline
    weights: Path | None  # unet_ema/, unet/, lora_ema/ or lora/ folder; None for the base model
    lora: bool = False


def _weights_folder(folder: Path, use_ema: bool) -> tuple[Path, bool]:
    for name in (["unet_ema", "lora_ema"] if use_ema else []) + ["unet", "lora"]:
        if (folder / name).is_dir():
            return folder / name, name.startswith("lora")
    raise ValueError(f"eval: {folder} holds no unet/ or lora/ weights folder")


def checkpoint_target(folder: Path, use_ema: bool = True) -> Target:
    """A checkpoint folder (one with manifest.json) as a target."""
    problem = verify_checkpoint(folder, check_hashes=False, need_state=False)  # weights-only ones are fine here
    if problem is not None:
        raise ValueError(f"eval: {folder} is not a complete checkpoint ({problem})")
    manifest = read_manifest(folder)
    weights, lora = _weights_folder(folder, use_ema)
    files = manifest["files"]
    digest = hashlib.sha256()
    for name in sorted(n for n in files if n.startswith(weights.name + "/")):
        digest.update(f"{name}:{files[name]['sha256']}\n".encode())
    return Target(
        label=folder.name,
        step=int(manifest.get("step", 0)),
        identity=digest.hexdigest(),
        base_model=str(manifest.get("base_model") or TINY_PRETRAINED),
        weights=weights,
        lora=lora,
    )


def base_target(pretrained: str) -> Target:
    """The base model as step 0; its identity hashes its UNet weights (or names a seeded preset)."""
    if pretrained == TINY_PRESET:
        identity = hashlib.sha256(b"preset:tiny").hexdigest()
    else:
        folder = Path(resolve_pretrained(pretrained))
        weights = sorted((folder / "unet").glob("*.safetensors")) if folder.is_dir() else []
        if weights:
            identity = hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest()
        else:  # a Hub id: its name stands for it (the cache key changes with a revision only if the id does)
            identity = hashlib.sha256(f"hub:{pretrained}".encode()).hexdigest()
    return Target(BASE, 0, identity, pretrained, None)


def _remote_targets(url: str, download_dir: Path, storage: Storage, use_ema: bool) -> list[Target]:
    tags = complete_checkpoints(storage.walk(url), need_state=False)
    if not tags:
        raise ValueError(f"eval: no complete checkpoint under {url}")
    download_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for tag in tags:
        local = download_dir / tag
        if verify_checkpoint(local, need_state=False) is not None:
            local = fetch_checkpoint(url, tag, download_dir, storage, need_state=False)
        targets.append(checkpoint_target(local, use_ema))
    return targets


def _plan_targets(plan: Path, use_ema: bool) -> list[Target]:
    """A sweep plan's runs, each as its newest complete checkpoint, labelled with the run's name."""
    targets = []
    for run in json.loads(plan.read_text())["runs"]:
        checkpoints = Path(run["run_dir"]) / "checkpoints"
        found = _run_targets(checkpoints, use_ema)
        if not found:
            log.warning("eval: %s has no complete checkpoint in %s; run it first", run["name"], checkpoints)
            continue
        targets.append(dataclasses.replace(found[-1], label=run["name"]))
    return targets


def _run_targets(folder: Path, use_ema: bool) -> list[Target]:
    """Every complete checkpoint of a run's checkpoint folder, oldest first."""
    targets = []
    for ref in reversed(list_checkpoints(folder)):
        problem = verify_checkpoint(ref.path, check_hashes=False, need_state=False)
        if problem is not None:
            log.warning("eval: skipping %s: %s", ref.path, problem)
            continue
        targets.append(checkpoint_target(ref.path, use_ema))
    return targets


def resolve_targets(
    sources: list[str], download_dir: Path, storage: Storage, base: bool = False, use_ema: bool = True
) -> list[Target]:
    """Targets from `sources` (run folders, checkpoint folders, a sweep's plan.json, s3:// or hf:// checkpoint
    URLs), by step (a sweep's runs in the plan's order), the base model first when `base`. Incomplete local
    checkpoints are skipped with a warning."""
    targets: list[Target] = []
    sweep = False
    for source in sources:
        if is_remote(source):
            targets += _remote_targets(source.rstrip("/"), download_dir, storage, use_ema)
            continue
        path = Path(source)
        if path.is_file() and path.suffix == ".json":
            targets += _plan_targets(path, use_ema)
            sweep = True
        elif (path / "manifest.json").is_file():
            targets.append(checkpoint_target(path, use_ema))
        elif (path / "checkpoints").is_dir() or (path.is_dir() and any(parse_tag(p.name) for p in path.iterdir())):
            targets += _run_targets(path / "checkpoints" if (path / "checkpoints").is_dir() else path, use_ema)
        else:
            raise ValueError(
                f"eval: {source} is neither a run folder (with checkpoints/), a checkpoint folder nor a sweep plan"
            )
    if not targets and not base:
        raise ValueError(f"eval: no complete checkpoint in {', '.join(sources)}")
    bases = sorted({t.base_model for t in targets}) or [TINY_PRETRAINED]
    if len(bases) > 1:
        raise ValueError(f"eval: the checkpoints come from different base models ({bases}); evaluate them apart")
    if not sweep:
        targets.sort(key=lambda t: t.step)
    return ([base_target(bases[0])] if base else []) + targets
