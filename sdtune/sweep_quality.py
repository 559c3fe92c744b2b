"""The sweep report's quality half: `sdtune eval`'s scores of each run's final checkpoint against dataset size.

    sdtune eval runs/sweep/plan.json --base --prompts prompts.txt --seeds 0,1,2 --real data/ds-sweep/val \\
        --train data/ds-sweep/size-050000 --val_shards data/ds-sweep/val --out runs/sweep/eval
    sdtune sweep report --plan runs/sweep/plan.json        # reads runs/sweep/eval/eval.json when it is there

Writes quality.png (each metric against size, log x; error bars: the spread over runs where a size was trained
with several seeds, else the 95% bootstrap interval over the generated images; the base model as a dashed line),
quality.csv (one row per run) and matrix.png (prompts x sizes, the first seed's image, the base model first).
This module reads eval.json only: the core never imports the evaluation code.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtune.models.sampling import labelled_grid

# (metric, axis title); plotted when eval.json has them.
METRICS = (
    ("checker_all", "checker: prompt followed"),
    ("checker_color", "checker: colour followed"),
    ("checker_shape", "checker: shape followed"),
    ("checker_digit", "checker: digit followed"),
    ("fd", "FD to held-out images"),
    ("kid", "KID to held-out images"),
    ("clip_score", "CLIP score"),
    ("nn_similarity", "similarity to nearest training image"),
    ("memorised_fraction", "fraction of near-copies"),
    ("val_loss", "held-out denoising loss"),
)
MATRIX_PROMPTS = 6


@dataclass
class SizePoint:
    size: int
    runs: list[str]
    value: float
    low: float  # error bar bottom
    high: float
    spread: str  # "runs" (std over runs), "bootstrap" (one run's 95% interval) or "none"


def read_eval(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if "checkpoints" not in record:
        raise ValueError(f"{path} is not an eval.json written by `sdtune eval`")
    return record


def _interval(metrics: dict[str, float], name: str) -> tuple[float, float]:
    value = metrics[name]
    if f"{name}_low" in metrics and f"{name}_high" in metrics:
        return metrics[f"{name}_low"], metrics[f"{name}_high"]
    if f"{name}_std" in metrics:  # KID: its std over subsets
        return value - metrics[f"{name}_std"], value + metrics[f"{name}_std"]
    return value, value


def size_points(runs: list[dict[str, Any]], scored: dict[str, dict[str, float]], name: str) -> list[SizePoint]:
    """One point per dataset size: the mean over its runs that have metric `name`."""
    points = []
    for size in sorted({r["size"] for r in runs}):
        names = [r["name"] for r in runs if r["size"] == size and name in scored.get(r["name"], {})]
        if not names:
            continue
        values = np.array([scored[n][name] for n in names])
        if len(names) > 1:
            std = float(values.std(ddof=1))
            points.append(
                SizePoint(size, names, float(values.mean()), values.mean() - std, values.mean() + std, "runs")
            )
        else:
            low, high = _interval(scored[names[0]], name)
            points.append(SizePoint(size, names, float(values[0]), low, high, "bootstrap" if high > low else "none"))
    return points


def plot_quality(runs: list[dict[str, Any]], record: dict[str, Any], path: Path) -> dict[str, list[SizePoint]]:
    """quality.png: one panel per metric found; returns each plotted metric's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {c["label"]: c["metrics"] for c in record["checkpoints"]}
    base = scored.get("base", {})
    panels = [(name, title, size_points(runs, scored, name)) for name, title in METRICS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return {}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, (name, title, points) in zip(axes.flat, panels, strict=False):
        x = [p.size for p in points]
        y = [p.value for p in points]
        below = [p.value - p.low for p in points]
        above = [p.high - p.value for p in points]
        axis.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, label="final checkpoint")
        for p in points:  # every run, where a size has several
            if len(p.runs) > 1:
                axis.scatter([p.size] * len(p.runs), [scored[n][name] for n in p.runs], s=8, color="grey", zorder=3)
        if name in base:
            axis.axhline(base[name], linestyle="--", color="tab:red", label="base model")
        axis.set(xscale="log", xlabel="training images", title=title)
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return {name: points for name, _, points in panels}


def write_quality_csv(runs: list[dict[str, Any]], record: dict[str, Any], path: Path) -> None:
    scored = {c["label"]: c["metrics"] for c in record["checkpoints"]}
    names = [n for n, _ in METRICS if any(n in m for m in scored.values())]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "size", "seed", *names])
        if "base" in scored:
            writer.writerow(["base", 0, "", *(scored["base"].get(n, "") for n in names)])
        for run in runs:
            if run["name"] in scored:
                metrics = scored[run["name"]]
                writer.writerow([run["name"], run["size"], run.get("seed", ""), *(metrics.get(n, "") for n in names)])


def write_matrix(runs: list[dict[str, Any]], record: dict[str, Any], eval_dir: Path, path: Path) -> bool:
    """matrix.png: prompts as rows, the base model and each size (its first run) as columns, first seed."""
    by_label = {c["label"]: c for c in record["checkpoints"] if c.get("images")}
    columns: list[tuple[str, dict[str, Any]]] = [("base model", by_label["base"])] if "base" in by_label else []
    for size in sorted({r["size"] for r in runs}):
        first = next((by_label[r["name"]] for r in runs if r["size"] == size and r["name"] in by_label), None)
        if first is not None:
            columns.append((f"{size} images", first))
    prompts = record["settings"]["prompts"][:MATRIX_PROMPTS]
    if not columns or not prompts:
        return False
    seeds = len(record["settings"]["seeds"])
    tiles = []
    for p in range(len(prompts)):
        for _, checkpoint in columns:
            with Image.open(eval_dir / checkpoint["images"][p * seeds]) as image:
                tiles.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    title = f"seed {record['settings']['seeds'][0]}: the same prompt and noise for every model"
    labelled_grid(np.stack(tiles), prompts, [c[0] for c in columns], title=title).save(path)
    return True


def quality_section(plan_runs: list[dict[str, Any]], eval_path: Path, out: Path) -> list[str]:
    """report.md lines for the quality half (empty when there is no eval.json), writing its figures into `out`."""
    record = read_eval(eval_path)
    if record is None:
        return [
            "",
            f"No image-quality scores: `{eval_path}` does not exist. Run `sdtune eval {out / 'plan.json'} --base "
            f"--prompts FILE --out {eval_path.parent}` (see `sdtune eval --help`) and report again.",
        ]
    plotted = plot_quality(plan_runs, record, out / "quality.png")
    write_quality_csv(plan_runs, record, out / "quality.csv")
    has_matrix = write_matrix(plan_runs, record, eval_path.parent, out / "matrix.png")
    settings = record["settings"]
    lines = [
        "",
        "## Image quality against dataset size",
        "",
        f"From `{eval_path}`: {len(settings['prompts'])} prompt(s) x {len(settings['seeds'])} seed(s), "
        f"features {settings.get('features_name') or 'none'}, checker {settings.get('checker') or 'none'}. "
        "Error bars: the standard deviation over a size's runs when it was trained with several seeds, otherwise the "
        "95% bootstrap interval over the generated images (KID: its std over subsets).",
        "",
    ]
    if plotted:
        lines += ["![quality by dataset size](quality.png)", ""]
    scored = {c["label"]: c["metrics"] for c in record["checkpoints"]}
    header = ["images", "runs", *plotted]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    if "base" in scored:
        lines.append("| base model | | " + " | ".join(_cell(scored["base"], n) for n in plotted) + " |")
    for size in sorted({r["size"] for r in plan_runs}):
        cells = []
        for points in plotted.values():
            point = next((p for p in points if p.size == size), None)
            cells.append("" if point is None else f"{point.value:.4g} [{point.low:.4g}, {point.high:.4g}]")
        count = sum(r["size"] == size and r["name"] in scored for r in plan_runs)
        lines.append(f"| {size} | {count} | " + " | ".join(cells) + " |")
    if has_matrix:
        lines += ["", "### Images: prompts x dataset sizes", "", "![image matrix](matrix.png)"]
    return lines


def _cell(metrics: dict[str, float], name: str) -> str:
    if name not in metrics:
        return ""
    low, high = _interval(metrics, name)
    return f"{metrics[name]:.4g} [{low:.4g}, {high:.4g}]"
