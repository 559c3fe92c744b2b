"""`sdtune eval`: render fixed prompts x seeds for every checkpoint (and the base model) and score them.

    sdtune eval runs/quickstart --prompts prompts.txt --seeds 0,1,2 --base --out runs/quickstart/eval \\
        [--real HELD_OUT_IMAGES] [--train TRAINING_IMAGES] [--features checker|HUB_ID|FOLDER] [--clip HUB_ID|FOLDER]

Per checkpoint: the checker's prompt accuracy (tiny-pretrained's checker, or none), FD and KID against the
held-out real images in the extractor's feature space, CLIP score, and memorisation (each image's cosine
similarity to its nearest training image). Writes eval.json, eval.csv and eval.html into --out; images are
cached in --out/cache (see sdtune.eval.render).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtune.eval.heldout import HeldoutCache
from sdtune.eval.page import write_page
from sdtune.eval.render import ImageCache, Renderer, RenderStats, Sampler
from sdtune.eval.scorer import HIGHER_IS_BETTER, Scorer, ScoreSettings
from sdtune.eval.targets import Target, resolve_targets
from sdtune.models.sampling import prompt_major
from sdtune.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    prompts: list[str]
    seeds: list[int]
    sampler: Sampler
    scores: ScoreSettings
    val_shards: str | None = None  # held-out shards for the denoising loss (the sweep's val/loss)
    val_batches: int = 16


@dataclass
class TargetResult:
    target: Target
    images: np.ndarray  # (P * S, H, W, 3), prompt-major
    metrics: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict[str, Any]] = field(default_factory=list)  # the closest (generated, training) pairs
    files: list[str] = field(default_factory=list)  # the cached PNGs, relative to the output folder, prompt-major


def parse_seeds(seeds: str) -> list[int]:
    try:
        values = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds: {seeds!r} is not a comma-separated list of integers (e.g. 0,1,2)") from err
    if not values:
        raise ValueError("--seeds: give at least one seed (e.g. 0,1,2)")
    return list(dict.fromkeys(values))


def ranking(results: list[TargetResult], by: str) -> list[str]:
    """Labels ordered best first by metric `by`; ties keep the earlier checkpoint first."""
    scored = [r for r in results if by in r.metrics]
    ordered = sorted(scored, key=lambda r: -r.metrics[by] if HIGHER_IS_BETTER[by] else r.metrics[by])
    return [r.target.label for r in ordered]


def best_by_metric(results: list[TargetResult]) -> dict[str, str]:
    return {name: order[0] for name in HIGHER_IS_BETTER if (order := ranking(results, name))}


def _write_csv(path: Path, results: list[TargetResult]) -> None:
    names = sorted({k for r in results for k in r.metrics})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "step", *names])
        for r in results:
            writer.writerow([r.target.label, r.target.step, *(r.metrics.get(n, "") for n in names)])


def evaluate(
    checkpoints: list[str],
    out: Path,
    settings: EvalSettings,
    base: bool = False,
    use_ema: bool = True,
    batch_size: int = 16,
    rank_by: str | None = None,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Render, score and write eval.json, eval.csv and eval.html into `out`; returns eval.json's content."""
    storage = storage or Storage()
    out.mkdir(parents=True, exist_ok=True)
    targets = resolve_targets(checkpoints, out / "downloads", storage, base=base, use_ema=use_ema)
    renderer = Renderer(ImageCache(out / "cache"), settings.sampler, batch_size)
    stats = RenderStats()
    heldout = (
        HeldoutCache(out / "cache" / "heldout.json", settings.val_shards, settings.val_batches)
        if settings.val_shards
        else None
    )
    results = []
    for target in targets:
        per_target = RenderStats()
        images = renderer.images(target, settings.prompts, settings.seeds, per_target)
        stats.add(per_target)
        result = TargetResult(target, images)
        result.files = [str(path.relative_to(out)) for path in renderer.paths(target, settings.prompts, settings.seeds)]
        result.metrics.update(rendered=per_target.rendered, cached=per_target.cached)
        if heldout is not None:
            base_parts = renderer.base(target.base_model)
            result.metrics["val_loss"] = heldout.loss(target, base_parts, images.shape[1])
        results.append(result)
    scorer = Scorer(settings.scores, results[0].images.shape[1], storage)
    prompts, seeds = prompt_major(settings.prompts, settings.seeds)
    for result in results:
        scores, result.pairs = scorer.score(result.images, prompts, seeds)
        result.metrics.update(scores)
    order_by = rank_by or next(
        (m for m in ("fd", "checker_all", "clip_score") if any(m in r.metrics for r in results)), None
    )
    if order_by is not None and order_by not in HIGHER_IS_BETTER:
        raise ValueError(f"--rank_by: {order_by!r} is not one of {sorted(HIGHER_IS_BETTER)}")
    record = {
        "settings": {
            "prompts": settings.prompts,
            "seeds": settings.seeds,
            "sampler": asdict(settings.sampler),
            **asdict(settings.scores),
            **scorer.describe(),
        },
        "render": {
            "rendered": stats.rendered,
            "cached": stats.cached,
            "seconds": round(stats.seconds, 2),
            "images_per_second": round(stats.images_per_second, 3),
        },
        "checkpoints": [
            {
                "label": r.target.label,
                "step": r.target.step,
                "identity": r.target.identity,
                "weights": str(r.target.weights) if r.target.weights else None,
                "metrics": r.metrics,
                "closest_pairs": r.pairs,
                "images": r.files,
            }
            for r in results
        ],  # fmt: skip
        "best": best_by_metric(results),
        "higher_is_better": HIGHER_IS_BETTER,
        "ranking": {"by": order_by, "order": ranking(results, order_by) if order_by else []},
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    _write_csv(out / "eval.csv", results)
    write_page(out / "eval.html", record, {r.target.label: r.images for r in results}, scorer.train)
    log.info(
        "eval: %d checkpoint(s), %d image(s) rendered, %d from the cache -> %s",
        len(results), stats.rendered, stats.cached, out / "eval.html",
    )  # fmt: skip
    return record
