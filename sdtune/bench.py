"""Measure training throughput, framework overhead and data-pipeline speed for a config.

    python -m sdtune.bench --config configs/quickstart.yaml [--mode all|train|overhead|data|checkpoint]

train:    Lightning fit on the config's real data: images/s, step time split into data wait and compute,
          peak memory (RSS on CPU, CUDA max allocated on GPU).
overhead: the same model and the same cached batches, through Lightning and through a bare PyTorch
          loop (forward, backward, AdamW, LR schedule): framework overhead as a ratio of step times.
data:     the data pipeline alone (images/s per DataLoader worker) against plain PIL decoding of the
          same tar members in one process.
checkpoint: a full fine-tune of a preset (default sd15-random: SD 1.5's size) with EMA and 8-bit AdamW state,
          checkpointed after every step: seconds training was blocked per checkpoint against the checkpoint's
          total time (blocked + background write), its size per file, with the write in the background and
          inline. Needs ~18 GB of host memory at SD 1.5 size.
The recipe table of a GPU (throughput, MFU, memory per recipe) is `sdtune gpu-check` (sdtune/gpu_check.py).
"""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import resource
import statistics
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import auto_cli
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader

from sdtune.cli import SDTuneCLI


class StepTimer(Callback):
    """Per-step wall time, split into the wait before the step (data) and the step itself (compute)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.data_wait: list[float] = []
        self.compute: list[float] = []
        self._last_end: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()
        if self._last_end is not None and trainer.global_step >= self.warmup:
            self.data_wait.append(self._start - self._last_end)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._last_end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.compute.append(self._last_end - self._start)

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_config(config: Path, shards: str | None) -> tuple[L.LightningModule, L.LightningDataModule, dict]:
    args = ["--config", str(config), "--trainer.logger", "false"]
    if shards:
        args += ["--data.init_args.shards", shards]
    cli = SDTuneCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    trainer_config = cli.config["trainer"]
    return cli.model, cli.datamodule, {"precision": trainer_config["precision"], "accelerator": "auto", "devices": 1}


def quiet_trainer(trainer_kwargs: dict, max_steps: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        **trainer_kwargs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )


def bench_train(
    model: L.LightningModule, datamodule: L.LightningDataModule, trainer_kwargs: dict, steps: int, warmup: int
) -> dict[str, float]:
    timer = StepTimer(warmup)
    quiet_trainer(trainer_kwargs, warmup + steps, [timer]).fit(model, datamodule=datamodule)
    step = statistics.mean(timer.compute) + statistics.mean(timer.data_wait)
    return {
        "images_per_s": datamodule.batch_size / step,
        "step_ms": 1000 * step,
        "data_wait_ms": 1000 * statistics.mean(timer.data_wait),
        "compute_ms": 1000 * statistics.mean(timer.compute),
        "peak_memory_mb": peak_memory_mb(),
    }


def _cached_batches(datamodule: L.LightningDataModule, count: int) -> list[dict]:
    """`count` batches, cycling over one epoch if the epoch is shorter."""
    datamodule.setup("fit")
    epoch = [{k: v for k, v in b.items() if k in ("pixel_values", "caption")} for b in datamodule.train_dataloader()]
    return [epoch[i % len(epoch)] for i in range(count)]


def bare_loop_step_times(model: L.LightningModule, batches: list[dict], warmup: int, precision: str) -> list[float]:
    """The same model, loss, optimizer and precision as Lightning's, in a plain PyTorch loop."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.unet.train()
    autocast = torch.bfloat16 if str(precision).startswith("bf16") else None  # as Lightning's bf16-mixed
    if autocast is not None:  # the frozen parts in bf16, as SDFineTune.on_fit_start does under Lightning
        model.vae.to(autocast)
        model.text_encoder.to(autocast)
    optimizers = model.configure_optimizers_for(len(batches))
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    times = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(step)
        batch = {"pixel_values": batch["pixel_values"].to(device), "caption": batch["caption"]}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model.compute_loss(batch, generator)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_overhead(
    model: L.LightningModule, datamodule: L.LightningDataModule, trainer_kwargs: dict, steps: int, warmup: int
) -> dict[str, float]:
    batches = _cached_batches(datamodule, warmup + steps)
    bare_model = copy.deepcopy(model)
    # Bare, Lightning, bare again: the two bare runs bracket the Lightning one against drift of the machine.
    precision = trainer_kwargs["precision"]
    bare_before = statistics.median(bare_loop_step_times(bare_model, batches, warmup, precision))
    timer = StepTimer(warmup)
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    quiet_trainer(trainer_kwargs, warmup + steps, [timer]).fit(model, train_dataloaders=loader)
    bare_after = statistics.median(bare_loop_step_times(bare_model, batches, warmup, precision))
    lightning_steps = [c + w for c, w in zip(timer.compute, timer.data_wait, strict=False)]
    bare = (bare_before + bare_after) / 2
    ratio = statistics.median(lightning_steps) / bare
    return {
        "bare_step_ms_before": 1000 * bare_before,
        "bare_step_ms_after": 1000 * bare_after,
        "lightning_step_ms": 1000 * statistics.median(lightning_steps),
        "overhead_ratio": ratio,
    }


def _pil_decode_rate(urls: list[str], resolution: int) -> float:
    """Plain PIL: read each image member, decode, resize + center crop, to an array; one process."""
    count, start = 0, time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    scale = resolution / min(image.size)
                    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                    np.asarray(image.crop((0, 0, resolution, resolution)))
                    count += 1
    return count / (time.perf_counter() - start)


def bench_data(datamodule: L.LightningDataModule) -> dict[str, float]:
    datamodule.setup("fit")
    stream = datamodule.train_stream
    # Timed from the first batch on, so that worker start-up (process spawn, imports) is not counted.
    num_images, start = 0, 0.0
    for index, batch in enumerate(datamodule.train_dataloader()):
        if index == 0:
            start = time.perf_counter()
        else:
            num_images += len(batch["caption"])
    elapsed = time.perf_counter() - start
    workers = max(1, datamodule.num_workers)
    pil = _pil_decode_rate(stream.shard_urls, stream.transform.resolution)
    per_worker = num_images / elapsed / workers
    return {
        "pipeline_images_per_s": num_images / elapsed,
        "num_workers": workers,
        "pipeline_images_per_s_per_worker": per_worker,
        "plain_pil_images_per_s": pil,
        "per_worker_vs_pil": per_worker / pil,
    }


def bench_checkpoint(preset: str, saves: int, export_dtype: str, background: bool) -> dict[str, Any]:
    """Fit `saves` steps of `preset` (fp32, 8-bit AdamW, EMA) on 64 px cached latents, checkpointing every step."""
    import tempfile

    from sdtune.callbacks.ema import EMA
    from sdtune.checkpoint.callback import PeriodicCheckpoint
    from sdtune.checkpoint.publish import PUBLISH_LOG
    from sdtune.models.sd_finetune import SDFineTune

    model = SDFineTune(pretrained=preset, optimizer="adamw8bit")
    channels = model.unet.config.in_channels
    batch = [{"latents": torch.randn(channels, 8, 8), "caption": "a photo"} for _ in range(saves)]
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-ckpt-") as root:
        checkpoint = PeriodicCheckpoint(
            every_n_train_steps=1, keep_last=2, export_dtype=export_dtype, background_write=background
        )
        trainer = L.Trainer(
            accelerator="auto",
            devices=1,
            precision="32-true",
            max_steps=saves,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[EMA(), checkpoint],
            default_root_dir=root,
        )
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=DataLoader(batch, batch_size=1))
        fit_s = time.perf_counter() - start
        log_path = Path(root) / "checkpoints" / PUBLISH_LOG
        records = [r for r in map(json.loads, log_path.read_text().splitlines()) if r["event"] == "checkpoint"]
        newest = sorted((Path(root) / "checkpoints").glob("epoch=*"))[-1]
        sizes: dict[str, int] = {}
        for path in newest.rglob("*"):
            if path.is_file():
                top = path.relative_to(newest).parts[0]
                sizes[top] = sizes.get(top, 0) + path.stat().st_size
    blocked = [r["blocked_s"] for r in records]
    # Inline, the write is part of the blocked time; in the background it follows the snapshot.
    total = [r["blocked_s"] + (r["write_s"] if background else 0.0) for r in records]
    return {
        "preset": preset,
        "background_write": background,
        "export_dtype": export_dtype,
        "checkpoints": len(records),
        "blocked_s_median": statistics.median(blocked),
        "total_s_median": statistics.median(total),
        "blocked_vs_total": statistics.median(blocked) / statistics.median(total),
        "checkpoint_gb": sum(sizes.values()) / 1e9,
        "gb_per_entry": {name: round(size / 1e9, 3) for name, size in sorted(sizes.items())},
        "fit_s": fit_s,
        "peak_rss_gb": peak_memory_mb() / 1024,
    }


def main(
    config: Path = Path("configs/quickstart.yaml"),
    mode: str = "all",
    steps: int = 20,
    warmup: int = 5,
    shards: str | None = None,
    preset: str = "sd15-random",
    saves: int = 3,
    export_dtype: str = "bfloat16",
    out: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmarks and print one JSON report.

    Args:
        config: Training config (model and data).
        mode: all, train, overhead, data or checkpoint ("all" runs all but checkpoint).
        steps: Timed steps per measurement.
        warmup: Untimed steps first.
        shards: Use these shards instead of the config's.
        preset: Model of the checkpoint benchmark (sd15-random: SD 1.5's size, random weights; tiny).
        saves: Checkpoints taken per run of the checkpoint benchmark.
        export_dtype: Exported weights' dtype in the checkpoint benchmark (sd15_full.yaml trains in bf16-mixed).
        out: Also write the report here (JSON).
    """
    valid = {"all", "train", "overhead", "data", "checkpoint"}
    if mode not in valid:
        raise ValueError(f"--mode: {mode!r} is not one of {sorted(valid)}")
    report: dict[str, Any] = {"config": str(config), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if mode in ("all", "data"):
        report["data"] = bench_data(load_config(config, shards)[1])
    if mode in ("all", "overhead"):
        model, datamodule, trainer_kwargs = load_config(config, shards)
        report["overhead"] = bench_overhead(model, datamodule, trainer_kwargs, steps, warmup)
    if mode in ("all", "train"):
        model, datamodule, trainer_kwargs = load_config(config, shards)
        report["train"] = bench_train(model, datamodule, trainer_kwargs, steps, warmup)
    if mode == "checkpoint":
        runs = []
        for background in (True, False):  # each in a fresh process: at SD 1.5 size two runs do not fit in RAM
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs.append(pool.submit(bench_checkpoint, preset, saves, export_dtype, background).result())
        report["checkpoint"] = runs
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    auto_cli(main, as_positional=False, allow_abbrev=False)
