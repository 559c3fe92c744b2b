"""Dataset-size sweeps: one run per nested subset, steps scaled by a rule, one table and one plot.

    python -m data_tools subsets --source data/ds --out data/ds-sweep --sizes [30,100,300,1000]
    python -m sdtune.sweep plan --base_config configs/sd15_lora.yaml --subsets data/ds-sweep --out runs/sweep
    python -m sdtune.sweep run --plan runs/sweep/plan.json          # one run after another, here
    python -m sdtune.slurm render sweep_array configs/sd15_lora.yaml --plan runs/sweep/plan.json   # or a SLURM array
    sdtune eval runs/sweep/plan.json --base --prompts P.txt --out runs/sweep/eval   # optional: image quality
    python -m sdtune.sweep report --plan runs/sweep/plan.json       # report.md, report.csv, val_loss.png
                                                                    # (+ quality.png, quality.csv, matrix.png)

Step rule: steps = clamp(round(epochs x size / (batch_size x devices x num_nodes)), min_steps, max_steps).
Every run validates on the same held-out set (subsets' `val/`) with fixed noise and timesteps at its last
step, so `val/loss` compares across sizes.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import auto_cli

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = "sdtune.callbacks.throughput.Throughput"


def read_plan(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"--plan: {path} does not exist; write it with `python -m sdtune.sweep plan`")
    return json.loads(path.read_text())


def steps_for(size: int, global_batch: int, epochs: float, min_steps: int, max_steps: int) -> int:
    return max(min_steps, min(max_steps, round(epochs * size / global_batch)))


def plan(
    base_config: Path,
    subsets: Path,
    out: Path,
    sizes: list[int] | None = None,
    epochs: float = 10.0,
    min_steps: int = 20,
    max_steps: int = 20_000,
    seeds: list[int] | None = None,
) -> Path:
    """Write one training config per subset size (and seed) and `plan.json`.

    Args:
        base_config: The training config every run starts from (model, data settings, callbacks).
        subsets: The folder written by `python -m data_tools subsets`.
        out: Sweep folder: configs/, runs/, plan.json and the report.
        sizes: Sizes to run (default: all in the subsets folder).
        epochs: Passes over each subset (the step rule).
        min_steps: At least this many steps per run.
        max_steps: At most this many steps per run.
        seeds: Train each size once per seed (seed_everything and the model's noise seed), for error bars over
            runs; default: once, with the base config's seeds.
    """
    info_path = subsets / "subsets.json"
    if not info_path.is_file():
        raise ValueError(f"--subsets: {subsets} has no subsets.json; make it with `python -m data_tools subsets`")
    info = json.loads(info_path.read_text())
    sizes = sorted(sizes or info["sizes"])
    unknown = sorted(set(sizes) - set(info["sizes"]))
    if unknown:
        raise ValueError(f"--sizes: {unknown} not in {subsets} (it has {info['sizes']})")
    if epochs <= 0 or not 1 <= min_steps <= max_steps:
        raise ValueError("--epochs must be > 0 and 1 <= --min_steps <= --max_steps")
    base = yaml.safe_load(base_config.read_text())
    trainer = base.setdefault("trainer", {})
    data = base["data"]["init_args"]
    devices = trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes", 1))
    global_batch = int(data.get("batch_size", 4)) * world
    out = out.resolve()
    runs = []
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"--seeds: give distinct seeds, e.g. [0,1,2]; got {seeds}")
    for size, seed in [(size, seed) for size in sizes for seed in (seeds or [None])]:
        name = f"size-{size:06d}" + (f"-seed-{seed}" if seed is not None else "")
        steps = steps_for(size, global_batch, epochs, min_steps, max_steps)
        run_config = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
        if seed is not None:
            run_config["seed_everything"] = seed
            run_config["model"].setdefault("init_args", {})["seed"] = seed
        run_config["data"]["init_args"].update(
            shards=str((subsets / f"size-{size:06d}").resolve()), val_shards=str((subsets / "val").resolve())
        )
        loggers = run_config["trainer"].get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:  # each run logs into its own folder
            if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
                logger["init_args"]["save_dir"] = str(out / "runs" / name)
        callbacks = run_config["trainer"].get("callbacks") or []
        for callback in callbacks:  # a sample grid and a checkpoint of the final weights, mid-epoch or not
            if callback.get("class_path", "").endswith((".SampleGrid", ".PeriodicCheckpoint")):
                callback.setdefault("init_args", {})["every_n_train_steps"] = steps
        if not any(c.get("class_path") == THROUGHPUT for c in callbacks):
            callbacks.append({"class_path": THROUGHPUT, "init_args": {"warmup_steps": min(5, steps // 4)}})
        run_config["trainer"].update(
            callbacks=callbacks,
            max_steps=steps,
            max_epochs=None,
            default_root_dir=str(out / "runs" / name),
            # Validate once, after the last step (counted across epochs).
            val_check_interval=steps,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
        )
        path = out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"# sweep run {name}: {size} images, {steps} steps{'' if seed is None else f', seed {seed}'} "
            f"(from {base_config})\n" + yaml.safe_dump(run_config)
        )
        runs.append(
            {"name": name, "size": size, "seed": seed, "steps": steps, "config": str(path),
             "run_dir": str(out / "runs" / name)}
        )  # fmt: skip
    plan_path = out / "plan.json"
    rule = {"epochs": epochs, "min_steps": min_steps, "max_steps": max_steps, "global_batch": global_batch}
    plan_path.write_text(
        json.dumps({"base_config": str(base_config), "subsets": str(subsets), "rule": rule, "runs": runs}, indent=2)
    )
    print(f"wrote {plan_path}: " + ", ".join(f"{r['size']} images -> {r['steps']} steps" for r in runs))
    return plan_path


def run(plan: Path, index: int | None = None) -> None:
    """Train the plan's runs one after another (or only run `index`, as a SLURM array task does).

    Args:
        plan: plan.json from `python -m sdtune.sweep plan`.
        index: Only this run (0-based); a finished run is skipped, an interrupted one resumes.
    """
    runs = read_plan(plan)["runs"]
    chosen = runs if index is None else [runs[index]]
    for entry in chosen:
        if (Path(entry["run_dir"]) / "run_summary.json").is_file():
            print(f"{entry['name']}: done already")
            continue
        print(f"{entry['name']}: {entry['size']} images, {entry['steps']} steps", flush=True)
        command = [sys.executable, str(REPO / "train.py"), "fit", "--config", entry["config"], "--resume", "auto"]
        result = subprocess.run(command, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(
                f"{entry['name']} failed (exit {result.returncode}); fix it and rerun: finished runs are kept"
            )


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(entry["run_dir"])
    summary_path = run_dir / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    grids = sorted((run_dir / "samples").glob("*.png"))
    metrics = summary["metrics"] if summary else {}
    return {
        "run": entry["name"],
        "size": entry["size"],
        "seed": entry.get("seed"),
        "steps": summary["steps"] if summary else None,
        "wall_s": round(summary["wall_s"], 1) if summary else None,
        "images_per_s": round(summary["images_per_s"], 2) if summary else None,
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "samples": str(grids[-1]) if grids else "",
        "status": "done" if summary else "missing",
    }


def report(plan: Path, eval_json: Path | None = None) -> Path:
    """Collect the runs into report.md (table + plot + sample grids), report.csv and val_loss.png; with an
    evaluation of the runs (`sdtune eval PLAN --out SWEEP/eval`), also quality.png, quality.csv and matrix.png.

    Args:
        plan: plan.json from `python -m sdtune.sweep plan`.
        eval_json: eval.json of `sdtune eval` on the plan (default: eval/eval.json beside the plan).
    """
    import matplotlib

    from sdtune.sweep_quality import quality_section, size_points

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan_runs = read_plan(plan)["runs"]
    rows = [_row(entry) for entry in plan_runs]
    out = plan.parent
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    losses = {r["run"]: {"val_loss": r["val_loss"]} for r in rows if r["val_loss"] is not None}
    points = size_points(plan_runs, losses, "val_loss")  # error bars: the std over a size's runs, when several
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.errorbar(
        [p.size for p in points],
        [p.value for p in points],
        yerr=[[p.value - p.low for p in points], [p.high - p.value for p in points]],
        marker="o",
        capsize=3,
    )
    axis.set(xscale="log", xlabel="training images", ylabel="held-out loss (fixed noise)", title="Dataset-size sweep")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "val_loss.png", dpi=120)
    plt.close(figure)
    lines = [
        "# Dataset-size sweep",
        "",
        "![held-out loss by dataset size](val_loss.png)",
        "",
        "| images | seed | steps | wall time (s) | images/s | held-out loss | train loss | samples | status |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        link = f"[grid]({Path(r['samples']).relative_to(out)})" if r["samples"] else ""
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else ""
        train = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else ""
        lines.append(
            f"| {r['size']} | {'' if r['seed'] is None else r['seed']} | {r['steps'] or ''} | {r['wall_s'] or ''} "
            f"| {r['images_per_s'] or ''} | {val} | {train} | {link} | {r['status']} |"
        )
    lines += quality_section(plan_runs, eval_json or out / "eval" / "eval.json", out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def main() -> None:
    auto_cli([plan, run, report], as_positional=False, allow_abbrev=False)


if __name__ == "__main__":
    main()
