"""Every YAML in configs/ parses through the real CLI; each starts with the command that runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from data_tools.remote import upload
from sdtune.checkpoint.layout import TRAINING_STATE, list_checkpoints, verify_checkpoint
from sdtune.checkpoint.state_file import load_state
from sdtune.cli import main
from sdtune.storage.settings import S3Settings
from tests.helpers.runs import REPO, run_train

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "sd15_full.yaml", "sd15_lora.yaml", "sd21_vpred.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# python train.py fit --config configs/" + config.name), first_line
    # --print_config parses and type-checks the whole config (class paths, init args) without building models.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "sdtune.models.SDFineTune" in printed
    assert "sdtune.checkpoint.callback.PeriodicCheckpoint" in printed


def test_bad_option_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.learnin_rate", "1e-4", "--print_config"])
    assert exit_info.value.code != 0
    assert "learnin_rate" in capsys.readouterr().err


def test_vastai_script_checks_credentials_before_doing_anything(tmp_path: Path) -> None:
    import subprocess

    script = REPO / "scripts" / "vastai_onstart.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "SDTUNE_CONFIG": "configs/sd15_lora_r2.yaml", "SDTUNE_WORKDIR": str(tmp_path / "w")}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "AWS_ACCESS_KEY_ID is not set" in result.stderr
    assert not (tmp_path / "w").exists()


# ---- every SD config, shrunk to the tiny model, trains and renders with its own settings ------------------------
SD_CONFIGS = ["sd15_full.yaml", "sd15_lora.yaml", "sd21_vpred.yaml", "sd15_lora_r2.yaml"]


def shrunk(name: str, run_dir: Path, shards: str, s3_endpoint: str, bucket: str) -> Path:
    """`configs/<name>` on the tiny preset, 64 px, 2 steps, a 1x1 grid and a checkpoint after step 2; precision,
    optimizer, EMA, gradient checkpointing, clipping, LoRA and prediction settings stay as the config has them."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", max_steps=2, max_epochs=1, default_root_dir=str(run_dir), logger=False)
    trainer.update(enable_progress_bar=False, log_every_n_steps=1)
    for callback in trainer["callbacks"]:
        args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("SampleGrid"):
            args.update(prompts=args["prompts"][:1], seeds=[0], num_inference_steps=2, every_n_train_steps=2)
        if callback["class_path"].endswith("PeriodicCheckpoint"):
            args["every_n_train_steps"] = 2
            if args.get("remote"):
                args["remote"] = f"s3://{bucket}/runs/{name}/checkpoints"
    config["model"]["init_args"].update(pretrained="tiny", revision=None)
    config["data"]["init_args"].update(shards=shards, resolution=64, batch_size=2, num_workers=1, val_shards=None)
    config["s3"] = config.get("s3") or {}
    config["s3"]["endpoint_url"] = s3_endpoint
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def assert_trained_with_the_configs_settings(name: str, run_dir: Path, optimizer: str | None = None) -> None:
    original = yaml.safe_load((REPO / "configs" / name).read_text())
    optimizer = optimizer or original["model"]["init_args"]["optimizer"]
    (checkpoint,) = list_checkpoints(run_dir / "checkpoints")
    assert checkpoint.step == 2 and verify_checkpoint(checkpoint.path) is None
    assert (checkpoint.path / "samples.png").is_file(), "the grid rendered"
    state = load_state(checkpoint.path / TRAINING_STATE)
    leaves = dict(_leaves(state["optimizer_states"][0]["state"]))
    quantized = [name for name, value in leaves.items() if getattr(value, "dtype", None) == torch.uint8]
    weights = "lora" if original["model"]["init_args"].get("train_mode") == "lora" else "unet"
    if optimizer == "adamw8bit":  # bitsandbytes' optimizer, on CPU too
        assert any("__bnb_optimizer_quant_state__" in name for name in leaves), sorted(leaves)[:10]
        # 8-bit moments with block maxima for tensors of >= 4096 elements; bitsandbytes keeps smaller ones (all
        # of the tiny model's LoRA weights) in 32 bits
        assert bool(quantized) == (weights == "unet") and any(n.endswith("absmax1") for n in leaves) == bool(quantized)
    else:
        assert not quantized
    assert {p.name for p in checkpoint.path.iterdir()} >= {weights, f"{weights}_ema"}


def _leaves(tree: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}/{key}")]
    if isinstance(tree, list | tuple):
        return [leaf for index, value in enumerate(tree) for leaf in _leaves(value, f"{prefix}/{index}")]
    return [(prefix, tree)]


def config_shards(name: str, synth_shards: Path, s3_server: str, s3_bucket: str) -> str:
    """The synthetic shards; for sd15_lora_r2, whose shards stream from R2, uploaded to the local S3 server."""
    if name != "sd15_lora_r2.yaml":
        return str(synth_shards)
    url = f"s3://{s3_bucket}/datasets/synth"
    upload(synth_shards, url, s3=S3Settings(endpoint_url=s3_server))
    return url


@pytest.mark.slow
@pytest.mark.parametrize("name", SD_CONFIGS)
def test_every_sd_config_shrunk_trains_and_renders_on_one_process(
    name: str, tmp_path: Path, synth_shards: Path, s3_server: str, s3_bucket: str
) -> None:
    shards = config_shards(name, synth_shards, s3_server, s3_bucket)
    run_dir = tmp_path / "run"
    main(["fit", "--config", str(shrunk(name, run_dir, shards, s3_server, s3_bucket))])
    assert_trained_with_the_configs_settings(name, run_dir)


# On 2 ranks: the LoRA config that streams from R2, and sd15_full under FSDP2. A full fine-tune under DDP with 8-bit
# AdamW is the GPU check dry run's DDP row (tests/test_gpu_check.py); each config's settings train on 1 process above.
DDP_CONFIGS = ["sd15_lora_r2.yaml"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    ("name", "strategy", "optimizer"),
    [(name, "ddp", "adamw8bit") for name in DDP_CONFIGS] + [("sd15_full.yaml", "fsdp", "adamw")],
    ids=[name.removesuffix(".yaml") for name in DDP_CONFIGS] + ["sd15_full-fsdp2-adamw"],
)
def test_every_sd_config_shrunk_on_two_processes(
    name: str, strategy: str, optimizer: str, tmp_path: Path, synth_shards: Path, s3_server: str, s3_bucket: str
) -> None:
    """Each config as it is on 2 ranks (DDP: 8-bit AdamW allows no FSDP); and sd15_full with trainer.strategy: fsdp
    and AdamW under bf16-mixed: the UNet is sharded (DTensors), its gradients are fp32 and reduced in fp32."""
    run_dir = tmp_path / "run"
    config = shrunk(name, run_dir, config_shards(name, synth_shards, s3_server, s3_bucket), s3_server, s3_bucket)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"].append(
        {"class_path": "tests.helpers.probes.GradientProbe", "init_args": {"out_dir": str(run_dir / "probe")}}
    )
    config.write_text(yaml.safe_dump(data))
    extra = ["--trainer.devices", "2", "--trainer.strategy", strategy, "--model.init_args.optimizer", optimizer]
    run_train(config, *extra)
    assert_trained_with_the_configs_settings(name, run_dir, optimizer)
    for rank in (0, 1):
        record = json.loads((run_dir / "probe" / f"gradients-rank{rank}.json").read_text())
        assert record["grad_dtypes"] == ["float32"], record
        if strategy == "fsdp":
            assert record["param_types"] == ["DTensor"] and record["reduce_dtype"] == "float32", record
        else:
            assert record["param_types"] == ["Parameter"] and record["optimizer"] == "AdamW8bit", record
