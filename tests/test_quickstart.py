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


def quickstart_config(tmp_path: Path, shards: Path, **model: object) -> tuple[Path, Path]:
    config = yaml.safe_load(QUICKSTART.read_text())
    run_dir = tmp_path / "run"
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    config["trainer"]["max_epochs"] = 2
    config["trainer"]["enable_progress_bar"] = False
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


def test_quickstart_writes_checkpoints_grids_and_loadable_weights(tmp_path: Path, synth_shards: Path) -> None:
    config, run_dir = quickstart_config(tmp_path, synth_shards)
    run_train(config, "--resume", "auto")

    refs = list_checkpoints(run_dir / "checkpoints")
    assert [r.path.name for r in refs] == ["epoch=0001-step=000032", "epoch=0000-step=000016"]
    for ref in refs:
        assert verify_checkpoint(ref.path) is None
        manifest = json.loads((ref.path / "manifest.json").read_text())
        assert manifest["step"] == ref.step and manifest["base_model"] == "tiny" and manifest["ema"] is True
        assert {
            "training_state.safetensors",
            "samples.png",
            "unet/diffusion_pytorch_model.safetensors",
            "unet_ema/diffusion_pytorch_model.safetensors",
        } <= set(manifest["files"])
        assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest["files"])
        grid = Image.open(ref.path / "samples.png")
        assert grid.size == (3 * 64, 2 * 64)  # 3 seeds x 2 prompts at 64 px
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "epoch=0000-step=000016.png",
        "epoch=0001-step=000032.png",
    ]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run folder"

    # The exported unet/ loads with plain diffusers and matches the weights the training state holds.
    newest = find_latest_checkpoint(run_dir / "checkpoints")
    exported = UNet2DConditionModel.from_pretrained(newest.path / "unet").eval()
    state = load_state(newest.training_state)
    module = SDFineTune(pretrained="tiny")
    module.load_state_dict(state["state_dict"], strict=False)
    module.unet.eval()
    with torch.no_grad():
        expected = module.unet(*unet_inputs(module.unet)).sample
        actual = exported(*unet_inputs(exported)).sample
    assert torch.equal(actual, expected)
    assert not torch.equal(module.unet.conv_in.weight, SDFineTune(pretrained="tiny").unet.conv_in.weight)


def test_lora_run_exports_an_adapter_diffusers_loads(tmp_path: Path, synth_shards: Path) -> None:
    config, run_dir = quickstart_config(tmp_path, synth_shards, train_mode="lora", lora_rank=4, learning_rate=1e-3)
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
