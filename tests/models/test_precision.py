"""The GPU code paths on CPU: bf16-mixed with the frozen parts in bf16 (training step and sample grid alike),
bitsandbytes' 8-bit AdamW (and its exact resume), and a UNet loaded from a folder training in train mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdtune.checkpoint.layout import TRAINING_STATE, find_latest_checkpoint, list_checkpoints
from sdtune.checkpoint.state_file import load_state
from sdtune.models import SDFineTune
from sdtune.models.components import load_components
from tests.helpers.runs import kill_when, quickstart_callbacks, run_train, train_config

EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}


def test_a_unet_loaded_from_a_folder_trains_in_train_mode(tmp_path: Path) -> None:
    parts = load_components("tiny")
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(parts, name).save_pretrained(tmp_path / name)
    parts.noise_scheduler.save_pretrained(tmp_path / "scheduler")
    model = SDFineTune(pretrained=str(tmp_path))
    assert all(module.training for module in model.unet.modules()), "from_pretrained returned eval mode"
    assert not any(m.training for m in model.vae.modules()) and not model.text_encoder.training


@pytest.mark.slow
def test_bf16_mixed_runs_the_frozen_parts_in_bf16_and_renders_the_grid(tmp_path: Path, synth_shards: Path) -> None:
    run_dir = tmp_path / "run"
    probe = {"class_path": "tests.helpers.probes.DtypeProbe", "init_args": {"out_dir": str(run_dir / "probe")}}
    config = train_config(
        run_dir, synth_shards, callbacks=[*quickstart_callbacks(), probe], max_epochs=1, precision="bf16-mixed"
    )
    run_train(config)
    dtypes = json.loads((run_dir / "probe" / "dtypes.json").read_text())
    # The encoder ran in the training step, the decoder only in the sample grid (the pipeline).
    assert dtypes == {"text_encoder": ["bfloat16"], "vae_encoder": ["bfloat16"], "vae_decoder": ["bfloat16"]}
    checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 16
    grid = Image.open(checkpoint.path / "samples.png")
    assert grid.size == (260 + 4 * 128, 34 + 3 * 128)  # labelled: 3 prompts x 4 seeds, 64 px tiles shown at 128
    assert len(set(grid.getdata())) > 100, "the grid is not blank"


@pytest.mark.slow
def test_adamw8bit_is_bitsandbytes_and_resumes_exactly_after_a_kill(tmp_path: Path, synth_shards: Path) -> None:
    checkpoints = {
        "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
        "init_args": {"every_n_epochs": 1, "every_n_train_steps": 5, "keep_last": 10},
    }
    model = {"optimizer": "adamw8bit"}

    def config(run_dir: Path) -> Path:
        return train_config(run_dir, synth_shards, callbacks=[EMA, checkpoints], model=model, max_steps=20)

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train(config(reference))
    state = load_state(find_latest_checkpoint(reference / "checkpoints").path / TRAINING_STATE)
    # bitsandbytes keeps 8-bit moments (uint8 + qmaps + absmax) for tensors of 4096+ elements, fp32 below.
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state["optimizer_states"][0]["state"].values()]
    eight_bit = [q for q in quantized if "state1" in q and str(q["state1"].dtype) == "torch.uint8"]
    assert len(eight_bit) > 50 and {"qmap1", "absmax1", "state2"} <= set(eight_bit[0]), len(eight_bit)
    resumed_config = config(resumed)
    kill_when(resumed_config, lambda: any((resumed / "checkpoints").glob("epoch=*-step=000010/manifest.json")))
    assert max(ref.step for ref in list_checkpoints(resumed / "checkpoints")) < 20
    run_train(resumed_config, "--resume", "auto")
    assert (resumed / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()
    final = find_latest_checkpoint(reference / "checkpoints").path.name
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        assert (resumed / "checkpoints" / final / name).read_bytes() == (
            reference / "checkpoints" / final / name
        ).read_bytes()
