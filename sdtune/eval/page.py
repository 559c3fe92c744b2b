"""eval.html: one self-contained page (PNGs inlined) to compare checkpoints.

Per prompt a grid with the checkpoints as columns (the base model first) and the seeds as rows; metric curves
over steps; a table of every checkpoint's scores with the best one per metric marked; the closest
(generated, training image) pairs of the checkpoint that copies most.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

from sdtune.checkpoint.layout import parse_tag
from sdtune.latent.html import STYLE, figure_html, table_html
from sdtune.latent.plots import figure_png, image_png
from sdtune.models.sampling import labelled_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from sdtune.eval.image_sets import ImageSet

Images = dict[str, np.ndarray]  # checkpoint label -> its images (prompts x seeds, prompt-major)

_CURVES = (
    ("checker_all", "checker: prompt followed (all attributes)"),
    ("fd", "FD to held-out images (lower is better)"),
    ("kid", "KID to held-out images (lower is better)"),
    ("clip_score", "CLIP score"),
    ("nn_similarity", "similarity to nearest training image"),
    ("val_loss", "held-out denoising loss (lower is better)"),
)


def _short(label: str) -> str:
    """A column title: "base" or "step 88"."""
    tag = parse_tag(label)
    return f"step {tag[0]}" if tag else label


def _curves(record: dict[str, Any]) -> list[tuple[str, bytes]]:
    figures = []
    rows = record["checkpoints"]
    for name, title in _CURVES:
        scored = [r for r in rows if name in r["metrics"]]
        if not scored:
            continue
        figure, axis = plt.subplots(figsize=(4.2, 2.8))
        steps = [r["step"] for r in scored]
        axis.plot(steps, [r["metrics"][name] for r in scored], marker="o")
        if all(f"{name}_low" in r["metrics"] for r in scored):
            low = [r["metrics"][f"{name}_low"] for r in scored]
            axis.fill_between(steps, low, [r["metrics"][f"{name}_high"] for r in scored], alpha=0.2,
                              label="95% bootstrap over images")  # fmt: skip
            axis.legend(fontsize=7)
        axis.set(xlabel="training step (0 = base model)", title=title)
        axis.title.set_fontsize(9)
        figures.append((title, figure_png(figure, dpi=100)))
    return figures


def _score_table(record: dict[str, Any]) -> list[list[str]]:
    names = [n for n in ("checker_all", "checker_shape", "checker_color", "checker_digit", "fd", "fd_infinity", "kid",
                         "clip_score", "nn_similarity", "memorised_fraction", "val_loss", "rendered", "cached")
             if any(n in r["metrics"] for r in record["checkpoints"])]  # fmt: skip
    best = record["best"]
    rows = [["checkpoint", "step", *names]]
    for r in record["checkpoints"]:
        cells = []
        for n in names:
            value = r["metrics"].get(n)
            text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
            cells.append(text + (" (best)" if best.get(n) == r["label"] else ""))
        rows.append([r["label"], str(r["step"]), *cells])
    return rows


def _grids(images: Images, prompts: list[str], seeds: list[int]) -> list[tuple[str, bytes]]:
    columns = [_short(label) for label in images]
    figures = []
    for p, prompt in enumerate(prompts):
        # rows: seeds; columns: checkpoints
        tiles = [rendered[p * len(seeds) + s] for s in range(len(seeds)) for rendered in images.values()]
        grid = labelled_grid(np.stack(tiles), [f"seed {s}" for s in seeds], columns, title=prompt)
        figures.append((prompt, image_png(grid)))
    return figures


def _pairs(record: dict[str, Any], images: Images, train: ImageSet | None) -> list[tuple[str, bytes]]:
    scored = [c for c in record["checkpoints"] if "nn_similarity" in c["metrics"] and c["closest_pairs"]]
    if train is None or not scored:
        return []
    copier = max(scored, key=lambda c: c["metrics"]["nn_similarity"])
    tiles = []
    for pair in copier["closest_pairs"]:
        tiles += [images[copier["label"]][pair["image"]], train.images[pair["train_index"]]]
    labels = [f"{pair['similarity']:.3f} {pair['prompt'][:24]}" for pair in copier["closest_pairs"]]
    grid = labelled_grid(np.stack(tiles), labels, ["generated", "nearest training image"], title=copier["label"])
    return [(f"closest pairs of {copier['label']}", image_png(grid))]


def render_page(record: dict[str, Any], images: Images, train: ImageSet | None) -> str:
    s = record["settings"]
    sampler = s["sampler"]
    ranking = record["ranking"]
    meta = (
        f"{len(images)} checkpoint(s) x {len(s['prompts'])} prompt(s) x {len(s['seeds'])} seed(s); DDIM "
        f"{sampler['steps']} steps, guidance {sampler['guidance_scale']}, precision {sampler['precision']}; "
        f"features: {s['features_name'] or 'none'}; CLIP: {s['clip'] or 'none'}; checker: {s['checker'] or 'none'}; "
        f"held-out images: {s['real_count'] or 'none'}; training images: {s['train_count'] or 'none'}. "
        f"Rendered {record['render']['rendered']}, from the cache {record['render']['cached']}."
    )
    order = " > ".join(html.escape(x) for x in ranking["order"]) or "(no metric to rank by)"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sdtune eval</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Which checkpoint is better?</h1>",
        f'<p class="meta">{html.escape(meta)}</p>',
        f"<section><h2>Ranking by {html.escape(str(ranking['by']))}</h2><p>{order}</p>",
        table_html(_score_table(record)),
        "<p>FD and KID are measured in the feature space named above; with a few hundred images FD is biased "
        "upwards (fd_infinity extrapolates it), so compare FDs only between sets of equal size. The checker is "
        "tiny-pretrained's shape/colour/digit classifier: the fraction of images showing what the prompt asked "
        "for.</p></section>",
        "<section><h2>Scores over training</h2><div class='figures'>",
        "".join(figure_html(c, png) for c, png in _curves(record)),
        "</div></section><section><h2>Images: checkpoints side by side</h2>",
        "<p>One grid per prompt: checkpoints as columns (the base model first), seeds as rows.</p>",
        "<div class='figures'>",
        "".join(figure_html(c, png) for c, png in _grids(images, s["prompts"], s["seeds"])),
        "</div></section>",
    ]
    pairs = _pairs(record, images, train)
    if pairs:
        parts += [
            "<section><h2>Memorisation: closest pairs</h2><p>The generated images most similar (cosine, in the "
            "feature space) to a training image, for the checkpoint with the highest mean similarity.</p>",
            "".join(figure_html(c, png) for c, png in pairs),
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: Path, record: dict[str, Any], images: Images, train: ImageSet | None) -> Path:
    path.write_text(render_page(record, images, train))
    return path
