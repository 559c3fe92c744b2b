"""Checkpoints written off the training thread: what they hold, in which dtype, and what a failed write leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from sdtune.checkpoint.layout import find_latest_checkpoint, list_checkpoints, verify_checkpoint
from sdtune.checkpoint.publish import PUBLISH_LOG
from sdtune.checkpoint.state_file import load_state
from tests.helpers.runs import mount_namespaces_work, quickstart_callbacks, run_with_mounts, train_config


def ema_shadow(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_state(checkpoint / "training_state.safetensors")
    (ema,) = [v for k, v in state["callbacks"].items() if k.startswith("EMA")]
    return ema["shadow"]


def assert_ema_only_bf16_export(checkpoint: Path) -> None:
    """No `unet/`; `unet_ema/` in bf16 holds the training state's fp32 EMA weights (not the trained ones) and loads
    in diffusers."""
    assert not (checkpoint / "unet").exists() and (checkpoint / "unet_ema").is_dir()
    assert json.loads((checkpoint / "manifest.json").read_text())["ema"] is True
    with safe_open(str(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        exported = {name: f.get_tensor(name) for name in f.keys()}
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    shadow = ema_shadow(checkpoint)  # the fp32 EMA weights the training state keeps for an exact resume
    assert len(shadow) == len(exported)
    for name, value in shadow.items():
        assert torch.equal(exported[name.removeprefix("unet.")], value.to(torch.bfloat16)), name
    trained = load_state(checkpoint / "training_state.safetensors")["state_dict"]
    assert any(not torch.equal(trained[n], shadow[n]) for n in shadow), "EMA equals the trained weights: no check"
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet_ema", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.skipif(not mount_namespaces_work(), reason="needs root to mount a small tmpfs in a namespace")
def test_a_disk_that_fills_up_fails_the_next_write_and_keeps_the_checkpoint_before_it(tmp_path, synth_shards):
    """Checkpoints every 4 steps, EMA weights only, in bf16; the disk fills up after the first: the second write
    fails in the background, the run stops with one line, and the first checkpoint is complete and usable."""
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    filler = {
        "class_path": "tests.helpers.probes.DiskFiller",
        "init_args": {"at_step": 5, "wait_for": "epoch=0000-step=000004"},
    }
    exports = {"export_dtype": "bfloat16", "export_ema_only": True}
    callbacks = [*quickstart_callbacks(every_n_epochs=0, every_n_train_steps=4, **exports), filler]
    config = train_config(run_dir, synth_shards, callbacks=callbacks, max_steps=12, max_epochs=-1)
    result = run_with_mounts(config, {run_dir: "200m"}, copy_out=(run_dir, copy))
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert "writing checkpoint epoch=0000-step=000008 failed" in last_line and "No space left" in last_line
    assert "--resume auto" in last_line
    checkpoints = copy / "checkpoints"
    latest = find_latest_checkpoint(checkpoints)
    assert latest is not None and latest.step == 4 and verify_checkpoint(latest.path) is None
    assert [ref.step for ref in list_checkpoints(checkpoints)] == [4]  # nothing half-written looks like one
    assert not list(checkpoints.glob(".tmp-*")), "the failed write's temp folder was left behind"
    assert_ema_only_bf16_export(latest.path)
    records = [json.loads(line) for line in (checkpoints / PUBLISH_LOG).read_text().splitlines()]
    (written,) = [r for r in records if r["event"] == "checkpoint"]
    assert written["tag"] == "epoch=0000-step=000004" and written["write_s"] > 0 and written["bytes"] > 0
    assert 0 <= written["blocked_s"]
