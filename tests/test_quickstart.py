"""The quickstart config end to end: checkpoints, manifests, sample grids, wandb offline; exported weights
load with plain diffusers and compute exactly what the training module computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from sdtune.checkpoint.layout import find_latest_checkpoint, list_checkpoints, verify_checkpoint
from sdtune.checkpoint.state_file import load_state
from sdtune.models import SDFineTune
from sdtune.models.components import load_components
from tests.helpers.runs import QUICKSTART, run_train

pytestmark = pytest.mark.slow


def quickstart_config(tmp_path: Path, shards: Path, checker: bool = True, **model: object) -> tuple[Path, Path]:
    config = yaml.safe_load(QUICKSTART.read_text())
    run_dir = tmp_path / "run"
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    config["trainer"]["enable_progress_bar"] = False
    if not checker:
        config["trainer"]["callbacks"] = [
            c for c in config["trainer"]["callbacks"] if "CheckerScore" not in c["class_path"]
        ]
    config["data"]["init_args"]["shards"] = str(shards)
    config["model"]["init_args"].update(model)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def unet_inputs(unet: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 32, 32), generator=generator)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    return sample, torch.tensor([10, 500]), text


def test_quickstart_fine_tunes_tiny_pretrained_on_pink_with_checker_scores_grids_and_loadable_weights(
    tmp_path: Path, pink_shards: Path
) -> None:
    """`make quickstart` as a user runs it: tiny-pretrained fine-tuned on 64 pink shapes, the colour it never saw."""
    config, run_dir = quickstart_config(tmp_path, pink_shards)
    settings = yaml.safe_load(config.read_text())
    epochs, steps_per_epoch = settings["trainer"]["max_epochs"], 64 // settings["data"]["init_args"]["batch_size"]
    result = run_train(config, "--resume", "auto")

    refs = list_checkpoints(run_dir / "checkpoints")
    assert [r.path.name for r in refs] == [
        f"epoch={epochs - 1:04d}-step={epochs * steps_per_epoch:06d}",
        f"epoch={epochs - 2:04d}-step={(epochs - 1) * steps_per_epoch:06d}",
    ]
    grid_prompts = next(c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("SampleGrid"))
    rows, cols = len(grid_prompts["init_args"]["prompts"]), len(grid_prompts["init_args"]["seeds"])
    for ref in refs:
        assert verify_checkpoint(ref.path) is None
        manifest = json.loads((ref.path / "manifest.json").read_text())
        assert manifest["step"] == ref.step and manifest["base_model"] == "tiny-pretrained" and manifest["ema"] is True
        assert {
            "training_state.safetensors",
            "samples.png",
            "unet/diffusion_pytorch_model.safetensors",
            "unet_ema/diffusion_pytorch_model.safetensors",
        } <= set(manifest["files"])
        assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest["files"])
        grid = Image.open(ref.path / "samples.png")
        assert grid.size == (260 + cols * 128, 34 + rows * 128)  # labelled: prompts left, seeds on top, 2x tiles
    assert len(list((run_dir / "samples").glob("*.png"))) == epochs
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run folder"

    # The checker judged pink before (the base model never saw it) and after the fine-tune, on the same
    # prompts and seeds: the fine-tune teaches it (0.00 -> 0.85 with `make quickstart`; the floor is the issue's
    # 50%, which leaves room for another CPU's rounding).
    score = json.loads((run_dir / "checker_score.json").read_text())
    assert score["before"]["step"] == 0 and score["after"]["step"] == epochs * steps_per_epoch
    assert score["before"]["count"] == score["after"]["count"] == 20 and score["before"]["color"] <= 0.2, score
    assert score["after"]["color"] >= 0.5, score
    assert "checker score (20 images: 5 prompts x 4 seeds): before training" in result.stdout

    # The exported unet/ loads with plain diffusers and matches the weights the training state holds.
    newest = find_latest_checkpoint(run_dir / "checkpoints")
    exported = UNet2DConditionModel.from_pretrained(newest.path / "unet").eval()
    state = load_state(newest.training_state)
    module = SDFineTune(pretrained="tiny-pretrained")
    module.load_state_dict(state["state_dict"], strict=False)
    module.unet.eval()
    with torch.no_grad():
        expected = module.unet(*unet_inputs(module.unet)).sample
        actual = exported(*unet_inputs(exported)).sample
    assert torch.equal(actual, expected)
    base = SDFineTune(pretrained="tiny-pretrained").unet.conv_in.weight
    assert not torch.equal(module.unet.conv_in.weight, base)


def test_lora_run_exports_an_adapter_diffusers_loads(tmp_path: Path, synth_shards: Path) -> None:
    config, run_dir = quickstart_config(
        tmp_path, synth_shards, checker=False, pretrained="tiny", train_mode="lora", lora_rank=4, learning_rate=1e-3
    )
    run_train(config, "--trainer.max_epochs", "1")
    ref = find_latest_checkpoint(run_dir / "checkpoints")
    assert (ref.path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (ref.path / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()
    state = load_state(ref.training_state)
    assert state["state_dict"] and all("lora" in k for k in state["state_dict"]), "only LoRA weights are stored"

    base_tmp = tmp_path / "base"
    load_components("tiny").save_pretrained(base_tmp)
    pipeline = StableDiffusionPipeline.from_pretrained(base_tmp, safety_checker=None, requires_safety_checker=False)
    sample, timesteps, text = unet_inputs(pipeline.unet)
    with torch.no_grad():
        before = pipeline.unet(sample, timesteps, text).sample
        pipeline.load_lora_weights(ref.path / "lora")
        after = pipeline.unet(sample, timesteps, text).sample
        trained = SDFineTune(pretrained="tiny", train_mode="lora", lora_rank=4)
        trained.load_state_dict(state["state_dict"], strict=False)
        trained.unet.eval()
        expected = trained.unet(sample, timesteps, text).sample
    assert not torch.allclose(before, after), "the adapter changes the UNet"
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
