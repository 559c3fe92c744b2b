"""The Hub repository's root: a complete diffusers pipeline of one checkpoint, so that
`StableDiffusionPipeline.from_pretrained("user/repo")` gives the model to use.

    user/repo/
        model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   the root pipeline
        sdtune_root.json        which checkpoint the root holds, by which rule, its score
        README.md               the card
        checkpoints/<tag>/...   the per-checkpoint history (as before)

`hub_root: newest` puts each new checkpoint at the root; `best:<metric>` only a checkpoint whose `eval.json`
(written by the Evaluate callback) scores better on that metric than the root's, in the direction the eval.json
states (`higher_is_better`); a checkpoint without that score never replaces a scored root. The parts a fine-tune
does not change (VAE, text encoder, tokenizer, scheduler) are written once, from the base model; the root's UNet
is the checkpoint's EMA UNet when it has one, its trained UNet otherwise, or for a LoRA run the base UNet with the
adapter fused in.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.checkpoint.card import SCORES_FILE

log = logging.getLogger(__name__)

ROOT_RECORD = "sdtune_root.json"
_UNET_FOLDERS = ("unet_ema", "unet", "lora_ema", "lora")


@dataclass(frozen=True)
class RootRule:
    kind: str  # "none", "newest" or "best"
    metric: str | None = None

    @classmethod
    def parse(cls, text: str) -> RootRule:
        if text in ("none", "newest"):
            return cls(text)
        if text.startswith("best:") and text[len("best:") :]:
            return cls("best", text[len("best:") :])
        raise ValueError(
            f"PeriodicCheckpoint.hub_root: {text!r} is not none, newest or best:<metric> (e.g. best:fd, "
            "best:checker_all: a metric of the Evaluate callback)"
        )

    def __str__(self) -> str:
        return f"best:{self.metric}" if self.kind == "best" else self.kind


def checkpoint_score(folder: Path, metric: str) -> tuple[float, bool] | None:
    """(value, higher_is_better) of `metric` in the checkpoint's eval.json, or None when it has no such score."""
    path = folder / SCORES_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    value = record.get("metrics", {}).get(metric)
    higher = record.get("higher_is_better", {}).get(metric)
    if not isinstance(value, int | float) or higher is None:
        return None
    return float(value), bool(higher)


def replaces_root(rule: RootRule, current: dict[str, Any] | None, score: tuple[float, bool] | None) -> bool:
    """Whether a new checkpoint (with `score` under the rule's metric) takes the root from `current`."""
    if rule.kind == "none":
        return False
    if rule.kind == "newest" or current is None:
        return True
    if score is None:
        return False
    held = current.get("value")
    if held is None:  # the root holds an unscored checkpoint (no score existed yet)
        return True
    value, higher = score
    return value > held if higher else value < held


def root_record(rule: RootRule, tag: str, score: tuple[float, bool] | None, base_model: str) -> dict[str, Any]:
    return {
        "checkpoint": tag,
        "rule": str(rule),
        "metric": rule.metric,
        "value": None if score is None else score[0],
        "base_model": base_model,
    }


def _unet_source(folder: Path) -> Path:
    for name in _UNET_FOLDERS:
        if (folder / name).is_dir():
            return folder / name
    raise ValueError(f"hub_root: {folder} holds no unet/ or lora/ weights")


def root_files(folder: Path, work: Path, save_base: Callable[[Path], None], with_base: bool) -> dict[str, Path]:
    """The files of the root pipeline for checkpoint `folder` (repo path -> local file), built in `work`: the
    UNet always, the base model's other parts when `with_base` (or when the UNet is a LoRA to fuse into them)."""
    base = work / "base"
    source = _unet_source(folder)
    lora = source.name.startswith("lora")
    if (with_base or lora) and not (base / "model_index.json").is_file():
        tmp = work / ".base-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_base(tmp)
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    files: dict[str, Path] = {}
    if with_base:
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            name = str(path.relative_to(base))
            if not name.startswith("unet/"):
                files[name] = path
    if lora:
        from sdtune.models.components import fused_unet, load_components

        fused = work / "unet"
        shutil.rmtree(fused, ignore_errors=True)
        fused_unet(load_components(str(base)), source).save_pretrained(fused, safe_serialization=True)
        source = fused
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        files[f"unet/{path.relative_to(source)}"] = path
    return files


def root_card_section(record: dict[str, Any], repo: str) -> str:
    how = (
        "the newest checkpoint"
        if record["rule"] == "newest"
        else f"the best checkpoint by `{record['metric']}`"
        + (f" ({record['value']:.4g})" if record["value"] is not None else " (none is scored yet: the first one)")
    )
    return "\n".join(
        [
            "## The model at the root",
            "",
            f"The repository root is a complete diffusers pipeline of {how}: `{record['checkpoint']}`.",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{repo}")',
            "```",
            "",
        ]
    )
