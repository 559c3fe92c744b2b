"""FSDP2 on 2 CPU processes (gloo) through Lightning's launcher: EMA sharded like the weights, gradient clipping,
sample grids, both checkpoint state modes killed mid-epoch and resumed to the same run, exports that plain
diffusers loads, no pickle anywhere, pruning and publishing to the local S3 server."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from sdtune.checkpoint.layout import TRAINING_STATE, list_checkpoints
from sdtune.checkpoint.remote import StorageRemote
from sdtune.checkpoint.state_file import load_state
from sdtune.fsdp import rank_file
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings
from tests.helpers.assertions import assert_same_run
from tests.helpers.kills import Kill, kill_condition
from tests.helpers.runs import kill_when, run_train, train_config, with_settings

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
FINAL_STEP = 16  # 2 epochs of 8 steps: 64 samples / (2 ranks x batch 4)
RESUMED_FROM = 6  # the checkpoint every 6 steps, mid-epoch 0, is the newest when the kill lands at step 10
EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}
GRID = {
    "class_path": "sdtune.callbacks.sample_grid.SampleGrid",
    "init_args": {"prompts": ["a red circle"], "seeds": [0, 1], "num_inference_steps": 4},
}


def fsdp_config(run_dir: Path, shards: Path, mode: str, remote: str | None = None, **s3: object) -> Path:
    checkpoint = {"every_n_epochs": 1, "every_n_train_steps": 6, "keep_last": 2} | (
        {"remote": remote} if remote else {}
    )
    callbacks = [EMA, GRID, {"class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint", "init_args": checkpoint}]
    config = train_config(
        run_dir,
        shards,
        callbacks=callbacks,
        data={"num_workers": 1},
        accelerator="cpu",
        devices=2,
        strategy="fsdp",
        max_epochs=2,
        gradient_clip_val=1.0,
    )
    return with_settings(config, distributed={"fsdp_state_dict": mode}, **({"s3": s3} if s3 else {}))


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory, synth_shards: Path) -> Path:
    """An uninterrupted 2-rank FSDP run (state mode full; the mode changes how state is saved, not training)."""
    run_dir = tmp_path_factory.mktemp("fsdp-reference") / "run"
    run_train(fsdp_config(run_dir, synth_shards, "full"))
    return run_dir


def gathered_unet(checkpoint: Path, mode: str) -> dict[str, torch.Tensor]:
    """The UNet weights in the training state: full tensors, or each rank's dim-0 shard put back together."""
    files = (
        [checkpoint / TRAINING_STATE] if mode == "full" else [rank_file(checkpoint / TRAINING_STATE, r) for r in (0, 1)]
    )
    states = [load_state(path)["state_dict"] for path in files]
    return {k.removeprefix("unet."): torch.cat([s[k] for s in states]) for k in states[0] if k.startswith("unet.")}


def assert_no_pickle(root: Path) -> None:
    """Every file is safetensors, JSON, JSON lines or PNG: nothing that torch.load or pickle would read."""
    for path in (p for p in root.rglob("*") if p.is_file()):
        assert not zipfile.is_zipfile(path), path
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt"):
                pass
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        else:
            assert path.suffix == ".png" and path.read_bytes()[:4] == b"\x89PNG", path


@pytest.mark.parametrize("mode", ["full", "sharded"])
def test_killed_mid_epoch_then_resumed_is_the_same_run(
    mode: str, tmp_path: Path, synth_shards: Path, fsdp_reference: Path, s3_server: str, s3_bucket: str
) -> None:
    run_dir = tmp_path / "run"
    remote = f"s3://{s3_bucket}/runs/fsdp/checkpoints"
    config = fsdp_config(run_dir, synth_shards, mode, remote, endpoint_url=s3_server)
    kill_when(config, kill_condition(Kill("step", 10), run_dir))
    result = run_train(config, "--resume", "auto")
    assert f"epoch=0000-step={RESUMED_FROM:06d}" in result.stderr and "Traceback" not in result.stderr

    # Per-step losses after the resume, and the final weights and EMA weights, equal the uninterrupted run's.
    assert_same_run(fsdp_reference, run_dir, RESUMED_FROM, FINAL_STEP)

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [c.step for c in checkpoints] == [16, 12], "keep_last 2 prunes the older ones"
    final = checkpoints[0].path
    assert (final / "samples.png").is_file()
    if mode == "sharded":
        assert rank_file(final / TRAINING_STATE, 1).name in json.loads((final / "manifest.json").read_text())["files"]
    assert_no_pickle(run_dir / "checkpoints")

    # The exported UNet loads in plain diffusers and equals the weights gathered from the training state.
    exported = UNet2DConditionModel.from_pretrained(final / "unet").state_dict()
    gathered = gathered_unet(final, mode)
    assert set(exported) == set(gathered) and all(exported[k].equal(gathered[k]) for k in gathered)

    # Every checkpoint was published whole (the rank files too); the remote keeps its newest 3.
    storage = Storage(S3Settings(endpoint_url=s3_server))
    published = StorageRemote(remote, keep_last=3, storage=storage)
    assert published.complete_tags() == [c.path.name for c in checkpoints] + ["epoch=0000-step=000008"]
    names = set(storage.walk(remote))
    assert f"{final.name}/{rank_file(Path(TRAINING_STATE), 1)}" in names or mode == "full"
    assert not any("rank-" in n for n in names) or mode == "sharded"
