"""The GPU check: the recipe table of one CUDA machine, each recipe trained through `train.py` in its own process.

    sdtune gpu-check --out runs/gpu-check                 # CUDA: sd15-random at 512 px (about 8 min on one H100)
    sdtune gpu-check --out /tmp/gpu-check --dry_run true  # CPU: the tiny preset at 64 px, 2 processes (CI runs it)

Rows (all bf16-mixed): full fine-tune (AdamW), full + 8-bit AdamW + gradient checkpointing, full compiled in
channels-last layout, LoRA, full from cached latents, DDP and FSDP2 on every GPU present, and a checkpoint
save + resume. A row that fails (out of memory, say) is reported as failed and the others still run. Prints a
markdown table (images/s, MFU against the GPU's dense bf16 peak looked up by name, peak memory, seconds
training was blocked per checkpoint) and writes it with the raw figures to `--out`. Needs only what
`pip install` brings: no downloads, no weights.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# Dense bf16 tensor peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name in this order.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("A6000", 155.0),
    ("RTX 5090", 209.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("A10", 125.0),
    ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


@dataclass
class Row:
    name: str
    model: dict[str, Any] = field(default_factory=dict)  # model.init_args overrides
    trainer: dict[str, Any] = field(default_factory=dict)  # trainer overrides
    data: dict[str, Any] = field(default_factory=dict)  # data.init_args overrides
    latents: bool = False  # train from cached latent shards
    all_devices: bool = False  # every GPU (2 CPU processes in the dry run)
    checkpoint: bool = False  # save twice, then resume from the last save
    train_flops_factor: float = 3.0  # forward + backward (weights and inputs) in forward passes


ROWS = [
    Row("full, AdamW", {"optimizer": "adamw"}),
    Row("full, 8-bit AdamW, grad. checkpointing", {"optimizer": "adamw8bit", "gradient_checkpointing": True}),
    Row("full, compiled, channels-last", {"optimizer": "adamw", "compile_unet": True, "channels_last": True}),
    Row("LoRA r16", {"train_mode": "lora", "lora_rank": 16, "learning_rate": 1e-4}, train_flops_factor=2.0),
    Row(
        "full, cached latents", {"optimizer": "adamw8bit"}, data={"flip_prob": 0.0, "random_crop": False}, latents=True
    ),
    Row("DDP, all devices", {"optimizer": "adamw8bit"}, {"strategy": "ddp"}, all_devices=True),
    Row("FSDP2, all devices", {"optimizer": "adamw"}, {"strategy": "fsdp"}, all_devices=True),
    Row("checkpoint save + resume", {"optimizer": "adamw8bit"}, checkpoint=True),
]


@dataclass(frozen=True)
class Settings:
    preset: str
    resolution: int
    batch_size: int
    steps: int
    warmup: int
    precision: str
    accelerator: str
    devices_all: int
    num_workers: int
    row_timeout: float
    compile_options: dict[str, Any] = field(default_factory=dict)


def unet_forward_flops(preset: str, resolution: int) -> float:
    """FLOPs of one UNet forward pass for one image, counted on the meta device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdtune.models.components import preset_builders, vae_scale_factor

    build_unet, build_vae, _ = preset_builders(preset)
    with torch.device("meta"):
        config = build_unet().config
        unet = UNet2DConditionModel.from_config(config)
        side = resolution // vae_scale_factor(build_vae())
        latents = torch.randn(1, config.in_channels, side, side)
        text = torch.randn(1, 77, config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(latents, torch.tensor([500]), text)
    return float(counter.get_total_flops())


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    with log.open("w") as out:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.monotonic() - start


def prepare_data(work: Path, settings: Settings, count: int) -> tuple[Path, Path]:
    """Synthetic captioned images -> image shards -> latent shards (with the preset's VAE)."""
    data = [sys.executable, "-m", "data_tools"]
    steps = [
        [*data, "synth", "--out", str(work / "images"), "--num_images", str(count), "--size", str(settings.resolution)],
        [*data, "make_shards", "--source", str(work / "images"), "--out", str(work / "shards")]
        + ["--resolution", str(settings.resolution), "--samples_per_shard", str(max(1, count // 8))],
        [*data, "encode_latents", "--source", str(work / "shards"), "--out", str(work / "latents")]
        + ["--vae", settings.preset, "--vae_subfolder", "vae", "--dtype", "float32"],
    ]
    for i, command in enumerate(steps):
        code, _ = run(command, work / f"data-{i}.log", settings.row_timeout)
        if code != 0:
            raise RuntimeError(f"preparing data failed: see {work / f'data-{i}.log'}")
    return work / "shards", work / "latents"


def row_config(row: Row, settings: Settings, shards: Path, root: Path, max_steps: int) -> Path:
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"].update({"pretrained": settings.preset, "learning_rate": 1e-5, **row.model})
    if row.model.get("compile_unet"):
        config["model"]["init_args"]["compile_options"] = settings.compile_options
    config["data"]["init_args"].update(
        shards=str(shards), resolution=settings.resolution, batch_size=settings.batch_size, val_shards=None
    )
    config["data"]["init_args"]["num_workers"] = settings.num_workers
    config["data"]["init_args"].update(row.data)
    callbacks: list[dict[str, Any]] = [
        {"class_path": "sdtune.callbacks.throughput.Throughput", "init_args": {"warmup_steps": settings.warmup}}
    ]
    if row.checkpoint:
        callbacks += [
            {"class_path": "sdtune.callbacks.ema.EMA"},
            {
                "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
                "init_args": {"every_n_epochs": 0, "every_n_train_steps": max(1, settings.steps // 2), "keep_last": 2},
            },
        ]
    config["trainer"].update(
        default_root_dir=str(root),
        accelerator=settings.accelerator,
        devices=settings.devices_all if row.all_devices else 1,
        precision=settings.precision,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        deterministic=False,  # measure the speed users get (the quickstart's exact-resume setting costs time)
        limit_val_batches=0,
        **row.trainer,
    )
    path = root.parent / f"{root.name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _failure(log: Path, code: int) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "out of memory" in text.lower():
        return "OOM"
    if code == 124:
        return "timed out"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"failed ({lines[-1][:120] if lines else code})"


def run_row(row: Row, settings: Settings, shards: Path, latents: Path, work: Path) -> dict[str, Any]:
    root = work / row.name.replace(" ", "_").replace(",", "").replace(".", "").replace("+", "and")
    train = [sys.executable, "train.py", "fit", "--config"]
    data = latents if row.latents else shards
    total = settings.warmup + settings.steps
    result: dict[str, Any] = {"row": row.name}
    config = row_config(row, settings, data, root, total)
    code, seconds = run([*train, str(config)], root / "fit.log", settings.row_timeout)
    result["wall_s"] = round(seconds, 1)
    if code != 0:
        return result | {"status": _failure(root / "fit.log", code)}
    summary = json.loads((root / "run_summary.json").read_text())
    result |= {
        "status": "ok",
        "images_per_s": summary["images_per_s"],
        "peak_mem_gib": summary.get("peak_mem_gib"),
        "world_size": summary["world_size"],
        "loss": summary["metrics"].get("train/loss"),
    }
    if row.checkpoint:
        records = [json.loads(line) for line in (root / "checkpoints" / "publish_log.jsonl").read_text().splitlines()]
        blocked = [r["blocked_s"] for r in records if r["event"] == "checkpoint"]
        written = [r["write_s"] for r in records if r["event"] == "checkpoint"]
        result |= {"checkpoint_blocked_s": statistics.median(blocked), "checkpoint_write_s": statistics.median(written)}
        config = row_config(row, settings, data, root, total + max(1, settings.steps // 2))
        code, _ = run([*train, str(config), "--resume", "auto"], root / "resume.log", settings.row_timeout)
        resumed = code == 0 and "Restoring states from the checkpoint" in (root / "resume.log").read_text()
        result["resumed"] = "ok" if resumed else _failure(root / "resume.log", code)
        if not resumed:
            result["status"] = "resume " + result["resumed"]
    return result


def table(results: list[dict[str, Any]], device: str, peak: float | None, flops: float, settings: Settings) -> str:
    lines = [
        f"GPU check on {device}: `{settings.preset}` at {settings.resolution} px, batch {settings.batch_size} per "
        f"device, {settings.precision}, {settings.steps} timed steps after {settings.warmup}",
        "",
        "| recipe | devices | images/s | MFU | peak memory (GiB) | checkpoint blocked / written (s) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = next(row for row in ROWS if row.name == r["row"])
        speed = r.get("images_per_s")
        mfu = (
            f"{speed * flops * row.train_flops_factor / (peak * 1e12):.1%}"
            if speed and peak and not row.model.get("gradient_checkpointing")
            else "n/a"
        )
        checkpoint = (
            f"{r['checkpoint_blocked_s']:.2f} / {r['checkpoint_write_s']:.2f}" if "checkpoint_blocked_s" in r else ""
        )
        memory = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "n/a"
        lines.append(
            f"| {r['row']} | {r.get('world_size', '')} | {f'{speed:.2f}' if speed else ''} | {mfu} | {memory} | "
            f"{checkpoint} | {r['status']} |"
        )
    return "\n".join(lines)


def main(
    out: Path,
    dry_run: bool = False,
    steps: int = 20,
    warmup: int = 5,
    batch_size: int = 4,
    only: list[str] | None = None,
    row_timeout: float = 240.0,
) -> list[dict[str, Any]]:
    """Train each recipe in its own process and print the recipe table.

    Args:
        out: Folder for the table (`gpu_check.md`), the figures (`gpu_check.json`) and each row's logs.
        dry_run: CPU, the tiny preset at 64 px, 2 processes for DDP/FSDP: checks the script itself (CI).
        steps: Timed steps per row.
        warmup: Steps before the clock starts (compilation, autotuning, first reads).
        batch_size: Images per device and step.
        only: Run only the rows whose names contain one of these words.
        row_timeout: Seconds before a row is given up.
    """
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        raise ValueError("gpu-check: no CUDA device here; run with --dry_run true to check the script on CPU")
    settings = Settings(
        preset="tiny" if dry_run else "sd15-random",
        resolution=64 if dry_run else 512,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        precision="bf16-mixed",  # on CPU too: the dry run runs the code a GPU runs (the tiny preset is fast in bf16)
        accelerator="cuda" if cuda and not dry_run else "cpu",
        devices_all=2 if dry_run else max(1, torch.cuda.device_count()),
        num_workers=1 if dry_run else 4,
        row_timeout=row_timeout,
        # inductor's C++ build of even the tiny UNet takes minutes on a small CPU: the dry run checks the
        # compiled path (graphs traced forward and backward, weights renamed nowhere) with aot_eager.
        compile_options={"backend": "aot_eager"} if dry_run else {},
    )
    device = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(0)
    peak = None if dry_run else peak_tflops(device)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    count = settings.batch_size * settings.devices_all * (settings.warmup + settings.steps) // 2
    shards, latents = prepare_data(work, settings, max(32, count))
    flops = unet_forward_flops(settings.preset, settings.resolution)
    rows = [row for row in ROWS if not only or any(word.lower() in row.name.lower() for word in only)]
    results = []
    for row in rows:
        results.append(run_row(row, settings, shards, latents, work))
        print(json.dumps(results[-1]), flush=True)
    text = table(results, device, peak, flops, settings)
    print(text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "peak_tflops": peak, "rows": results}, indent=2))
    failed = [r["row"] for r in results if r["status"] != "ok"]
    if dry_run and failed:  # on CPU every row must work: a failure there is a bug in the script or sdtune
        raise RuntimeError(f"gpu-check dry run: rows {failed} failed; their logs are under {work}")
    return results
