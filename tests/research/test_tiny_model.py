"""`sdtune tiny-model` end to end at toy size: every stage runs (data, VAE, latent shards, the UNet through
`sdtune fit`, the checker heads through their config, assembly, figures, card); the folder it writes loads
in sdtune and in plain diffusers; a second run finds every stage done and only re-evaluates; a run with
other settings in the same work folder is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdtune.command import main
from sdtune.eval.checker import Checker
from sdtune.models.components import load_components
from sdtune.research.tiny_model.figures import GUIDANCE_CANDIDATES
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


def run_recipe(out: Path, work: Path, *extra: str) -> int:
    args = ["tiny-model", "--out", str(out), "--work", str(work), *extra]
    args += ["--unet_config", str(REPO / "configs/tiny_model/unet.yaml")]
    args += ["--checker_config", str(REPO / "configs/tiny_model/checker.yaml")]
    for key, value in TOY.items():
        args += [f"--{key}", value]
    return main(args)


def test_tiny_model_recipe_runs_every_stage_and_resumes_by_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, work = tmp_path / "model", tmp_path / "work"
    assert run_recipe(out, work) == 0
    stages = json.loads((out / "figures.json").read_text())["stages"]
    assert list(stages) == ["data", "vae", "init", "latents", "unet", "checker", "assemble"]
    assert stages["data"]["digits"]["pretrain"] == 60 and stages["data"]["samples"] == 120
    assert stages["latents"]["latents"] == 120 and stages["unet"]["steps"] == 4  # 120 latents, batch 32, wrap
    assert set(stages["checker"]) - {"seconds", "inputs"} == {"shape", "color", "digit"}
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
    # The figures' guidance is the candidate that scored best on seen pairs, with seeds the figures do not use.
    selection = figures["guidance_selection"]
    assert list(selection["all"]) == [str(g) for g in GUIDANCE_CANDIDATES] and selection["seeds"] == [100]
    best = max(selection["all"].values())
    assert figures["sampler"]["guidance_scale"] == next(
        g for g in GUIDANCE_CANDIDATES if selection["all"][str(g)] == best
    )
    card = (out / "README.md").read_text()
    assert "`unet/diffusion_pytorch_model.safetensors`" in card and "held-out" in card

    # Every stage is recorded: a rerun trains nothing; to another --out it only re-assembles the same weights.
    records = {p.name: p.stat().st_mtime_ns for p in (work / "stages").glob("*.json")}
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    assert run_recipe(elsewhere, work) == 0
    rerun = {p.name: p.stat().st_mtime_ns for p in (work / "stages").glob("*.json")}
    assert {k for k in records if rerun[k] != records[k]} == {"assemble.json"}
    assert (elsewhere / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert json.loads((elsewhere / "figures.json").read_text())["stages"]["unet"] == stages["unet"]

    # Another setting in the same work folder is another recipe: refused in one line, nothing rebuilt.
    assert run_recipe(out, work, "--shape_jitter", "0.5") == 2
    err = capsys.readouterr().err
    assert "stage data" in err and "shape_jitter 0.15" in err and "shape_jitter 0.5" in err and "--work" in err
    assert "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in (work / "stages").glob("*.json")} == rerun


def test_tiny_model_refuses_a_missing_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tiny-model", "--work", str(tmp_path), "--unet_config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "--unet_config" in err and "nope.yaml not found" in err and "Traceback" not in err
