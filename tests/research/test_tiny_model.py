"""`sdtune tiny-model` end to end at toy size: every stage runs (data, VAE, latent shards, the UNet through
`sdtune fit`, the checker heads through their config, assembly, figures, card); the folder it writes loads
in sdtune and in plain diffusers; a second run finds every stage done and only re-evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdtune.command import main
from sdtune.eval.checker import Checker
from sdtune.models.components import load_components
from tests.helpers.runs import REPO

pytestmark = pytest.mark.slow

TOY = {
    "num_shapes": "60",
    "digits_per_class": "6",
    "vae_steps": "10",
    "unet_epochs": "1",
    "checker_images": "90",
    "checker_epochs": "1",
    "eval_seeds": "1",
}


def run_recipe(out: Path, work: Path) -> int:
    args = ["tiny-model", "--out", str(out), "--work", str(work)]
    args += ["--unet_config", str(REPO / "configs/tiny_model/unet.yaml")]
    args += ["--checker_config", str(REPO / "configs/tiny_model/checker.yaml")]
    for key, value in TOY.items():
        args += [f"--{key}", value]
    return main(args)


def test_tiny_model_recipe_runs_every_stage_and_resumes_by_stage(tmp_path: Path) -> None:
    out, work = tmp_path / "model", tmp_path / "work"
    assert run_recipe(out, work) == 0
    stages = json.loads((out / "figures.json").read_text())["stages"]
    assert list(stages) == ["data", "vae", "init", "latents", "unet", "checker", "assemble"]
    assert stages["data"]["digits"]["pretrain"] == 60 and stages["data"]["samples"] == 120
    assert stages["latents"]["latents"] == 120 and stages["unet"]["steps"] == 4  # 120 latents, batch 32, wrap
    assert set(stages["checker"]) - {"seconds"} == {"shape", "color", "digit"}
    # What ships: a diffusers pipeline (the UNet in fp16), the checker, grids, figures and the card.
    assert next((out / "unet").glob("*.safetensors")).stat().st_size < 13 * 2**20
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "checker", "README.md", "samples_digits.png"}
    parts = load_components(str(out))
    assert parts.unet.dtype == torch.float32 and parts.vae.config.scaling_factor != 1.0
    pipeline = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert set(Checker.load(out / "checker").heads) == {"shape", "color", "digit"}
    figures = json.loads((out / "figures.json").read_text())["results"]
    assert set(figures["text_to_image"]) == {"held_out_pairs", "seen_pairs", "digits", "new_concept"}
    assert figures["text_to_image"]["held_out_pairs"]["count"] == 10  # 10 prompts x 1 seed
    card = (out / "README.md").read_text()
    assert "`unet/diffusion_pytorch_model.safetensors`" in card and "held-out" in card

    # Every stage is recorded: a rerun trains nothing and rewrites the same weights' card.
    records = {p.name: p.stat().st_mtime_ns for p in (work / "stages").glob("*.json")}
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert run_recipe(out, work) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "stages").glob("*.json")} == records
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_tiny_model_refuses_a_missing_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tiny-model", "--work", str(tmp_path), "--unet_config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "--unet_config" in err and "nope.yaml not found" in err and "Traceback" not in err
