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
from tests.helpers.runs import mount_namespaces_work, quickstart_callbacks, run_train, run_with_mounts, train_config


def ema_shadow(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_state(checkpoint / "training_state.safetensors")
    (ema,) = [v for k, v in state["callbacks"].items() if k.startswith("EMA")]
    return ema["shadow"]


@pytest.mark.slow
def test_ema_only_export_in_bf16_holds_the_ema_weights_and_loads_in_diffusers(tmp_path, synth_shards):
    callbacks = quickstart_callbacks(
        every_n_epochs=0, every_n_train_steps=4, export_dtype="bfloat16", export_ema_only=True
    )
    config = train_config(tmp_path / "run", synth_shards, callbacks=callbacks, max_steps=8, max_epochs=-1)
    run_train(config)
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [ref.step for ref in checkpoints] == [8, 4]
    for ref in checkpoints:
        assert verify_checkpoint(ref.path) is None  # sha256 taken while writing matches the bytes on disk
        assert not (ref.path / "unet").exists() and (ref.path / "unet_ema").is_dir()
        assert json.loads((ref.path / "manifest.json").read_text())["ema"] is True
    newest = checkpoints[0].path
    weights = newest / "unet_ema" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        exported = {name: f.get_tensor(name) for name in f.keys()}
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    shadow = ema_shadow(newest)  # the fp32 EMA weights the training state keeps for an exact resume
    assert len(shadow) == len(exported)
    for name, value in shadow.items():
        assert torch.equal(exported[name.removeprefix("unet.")], value.to(torch.bfloat16)), name
    trained = load_state(newest / "training_state.safetensors")["state_dict"]
    assert any(not torch.equal(trained[n], shadow[n]) for n in shadow), "EMA equals the trained weights: no check"
    unet = UNet2DConditionModel.from_pretrained(newest / "unet_ema", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    records = [json.loads(line) for line in (tmp_path / "run" / "checkpoints" / PUBLISH_LOG).read_text().splitlines()]
    written = [r for r in records if r["event"] == "checkpoint"]
    assert [r["tag"] for r in written] == ["epoch=0000-step=000004", "epoch=0000-step=000008"]
    assert all(r["blocked_s"] >= 0 and r["write_s"] > 0 and r["bytes"] > 0 for r in written)


@pytest.mark.slow
@pytest.mark.skipif(not mount_namespaces_work(), reason="needs root to mount a small tmpfs in a namespace")
def test_a_disk_that_fills_up_fails_the_next_write_and_keeps_the_checkpoint_before_it(tmp_path, synth_shards):
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    filler = {
        "class_path": "tests.helpers.probes.DiskFiller",
        "init_args": {"at_step": 5, "wait_for": "epoch=0000-step=000004"},
    }
    callbacks = [*quickstart_callbacks(every_n_epochs=0, every_n_train_steps=4), filler]
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
