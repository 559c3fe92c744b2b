"""The Hub model card (README.md) published with each checkpoint: what was trained, how, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

SCORES_FILE = "eval.json"  # written into a checkpoint by sdtune.eval.callback.Evaluate: {"metrics": {...}, ...}

# Hyperparameters shown in the card, in this order, when the run has them.
_SUMMARY_KEYS = (
    "train_mode", "lora_rank", "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer",
    "prediction_type", "min_snr_gamma", "noise_offset", "resolution", "batch_size", "random_crop", "flip_prob",
    "caption_dropout",
)  # fmt: skip


def read_scores(folder: Path) -> dict[str, float] | None:
    """The scalar scores of a checkpoint folder's eval.json, if it has one."""
    path = folder / SCORES_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text()).get("metrics", {})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _scores_section(scores: dict[str, float] | None, folder: str) -> list[str]:
    if not scores:
        return []
    rows = []
    for name, value in scores.items():
        if name.endswith(("_low", "_high")):
            continue
        low, high = scores.get(f"{name}_low"), scores.get(f"{name}_high")
        interval = f"{low:.4g} to {high:.4g}" if low is not None and high is not None else ""
        rows.append(f"| {name} | {value:.4g} | {interval} |")
    return ["## Scores", "", f"From `{folder}/{SCORES_FILE}` (sdtune's Evaluate callback).", "",
            "| metric | value | 95% interval |", "| --- | --- | --- |", *rows, ""]  # fmt: skip


def model_card(
    repo: str,
    tag: str,
    meta: dict[str, Any],
    hparams: dict[str, Any],
    precision: str,
    world_size: int,
    scores: dict[str, float] | None = None,
) -> str:
    """Markdown with YAML metadata; `meta` is the checkpoint manifest's metadata, `hparams` model + data."""
    base = str(meta.get("base_model") or "")
    lora = meta.get("train_mode") == "lora"
    front: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["stable-diffusion", "text-to-image", "diffusers", "sdtune", *(["lora"] if lora else [])],
    }
    if base.count("/") == 1 and not base.startswith((".", "/", "~")):
        front["base_model"] = base
    rows = [f"| {k} | `{hparams[k]}` |" for k in _SUMMARY_KEYS if k in hparams]
    rows += [f"| precision | `{precision}` |", f"| devices | {world_size} |"]
    rows.append(f"| config hash | `{str(meta.get('config_hash', ''))[:12]}` |")
    folder = f"checkpoints/{tag}"
    weights = "lora_ema" if lora and meta.get("ema") else "lora" if lora else "unet_ema" if meta.get("ema") else "unet"
    if lora:
        load = (
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
            f'pipe.load_lora_weights("{repo}", subfolder="{folder}/{weights}")'
        )
    else:
        load = (
            f'unet = UNet2DConditionModel.from_pretrained("{repo}", subfolder="{folder}/{weights}")\n'
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)'
        )
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False).strip(),
            "---",
            f"# {repo.split('/')[-1]}",
            "",
            f"A {'LoRA adapter' if lora else 'full UNet fine-tune'} of `{base}`, trained with sdtune.",
            f"Latest checkpoint: epoch {meta.get('epoch')}, step {meta.get('step')} (`{folder}/`).",
            "",
            "## Samples",
            "",
            f"![samples at step {meta.get('step')}]({folder}/samples.png)",
            "",
            "Fixed prompts and seeds, rendered with the EMA weights when EMA is on.",
            "",
            *_scores_section(scores, folder),
            "## Training",
            "",
            "| setting | value |",
            "| --- | --- |",
            *rows,
            "",
            "## Use",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline, UNet2DConditionModel",
            "",
            load,
            "```",
            "",
            "Each checkpoint folder holds the weights (safetensors), `samples.png`, `manifest.json` (files, sha256,",
            "epoch, step) and, unless only weights are published, `training_state.safetensors` for resuming.",
            "",
        ]
    )
