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

from sdtune.eval import metrics
from sdtune.eval.checker import Checker
from sdtune.eval.checker_score import checker_folder
from sdtune.eval.features import ClipModel, Features, load_features
from sdtune.eval.image_sets import ImageSet, read_image_set
from sdtune.eval.render import ImageCache, Renderer, RenderStats, Sampler
from sdtune.eval.targets import Target, resolve_targets
from sdtune.storage import Storage

log = logging.getLogger(__name__)

# Metric name -> True when higher is better.
HIGHER_IS_BETTER = {"checker_all": True, "clip_score": True, "fd": False, "kid": False, "nn_similarity": False}


@dataclass
class EvalSettings:
    prompts: list[str]
    seeds: list[int]
    sampler: Sampler
    features: str | None = None
    clip: str | None = None
    checker: str | None = None
    real: str | None = None
    train: str | None = None
    memorisation_threshold: float = 0.95
    max_images: int = 2000


@dataclass
class TargetResult:
    target: Target
    images: np.ndarray  # (P * S, H, W, 3), prompt-major
    metrics: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict[str, Any]] = field(default_factory=list)  # the closest (generated, training) pairs


def parse_seeds(seeds: str) -> list[int]:
    try:
        values = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds: {seeds!r} is not a comma-separated list of integers (e.g. 0,1,2)") from err
    if not values:
        raise ValueError("--seeds: give at least one seed (e.g. 0,1,2)")
    return list(dict.fromkeys(values))


def _scalar_metrics(
    result: TargetResult,
    settings: EvalSettings,
    checker: Checker | None,
    features: Features | None,
    real: np.ndarray | None,
    train: tuple[np.ndarray, ImageSet] | None,
    clip: ClipModel | None,
) -> None:
    prompts = [p for p in settings.prompts for _ in settings.seeds]
    out = result.metrics
    if checker is not None:
        summary = checker.score_rendered(result.images, prompts).summary()
        out.update({f"checker_{k}": v for k, v in summary.items() if k != "count"})
    generated = features(result.images) if features is not None else None
    if generated is not None and real is not None:
        fd = metrics.fd_interval(generated, real)
        kid = metrics.kernel_inception_distance(generated, real)
        out.update(
            fd=fd.value, fd_low=fd.low, fd_high=fd.high, fd_infinity=fd.infinity, fd_bias_per_n=fd.bias_per_n,
            kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size,
        )  # fmt: skip
    if generated is not None and train is not None:
        train_features, train_set = train
        similarity, index = metrics.nearest(generated, train_features)
        out.update(
            nn_similarity=float(similarity.mean()),
            nn_similarity_max=float(similarity.max()),
            memorised_fraction=float((similarity >= settings.memorisation_threshold).mean()),
        )
        for i in np.argsort(-similarity)[:4]:
            result.pairs.append(
                {"image": int(i), "prompt": prompts[i], "seed": settings.seeds[i % len(settings.seeds)],
                 "train": train_set.names[index[i]], "train_index": int(index[i]), "similarity": float(similarity[i])}
            )  # fmt: skip
    if clip is not None:
        image_embeds, text_embeds = clip.embed(result.images, prompts)
        scores = metrics.clip_score(image_embeds, text_embeds)
        out.update(clip_score=float(scores.mean()), clip_score_std=float(scores.std()))


def best_by_metric(results: list[TargetResult]) -> dict[str, str]:
    best = {}
    for name, higher in HIGHER_IS_BETTER.items():
        scored = [(r.metrics[name], r.target.label) for r in results if name in r.metrics]
        if scored:
            best[name] = (max if higher else min)(scored)[1]
    return best


def ranking(results: list[TargetResult], by: str) -> list[str]:
    scored = [r for r in results if by in r.metrics]
    return [r.target.label for r in sorted(scored, key=lambda r: r.metrics[by], reverse=HIGHER_IS_BETTER[by])]


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
    from sdtune.eval.page import write_page

    storage = storage or Storage()
    out.mkdir(parents=True, exist_ok=True)
    targets = resolve_targets(checkpoints, out / "downloads", storage, base=base, use_ema=use_ema)
    renderer = Renderer(ImageCache(out / "cache"), settings.sampler, batch_size)
    stats = RenderStats()
    results = []
    for target in targets:
        per_target = RenderStats()
        images = renderer.images(target, settings.prompts, settings.seeds, per_target)
        stats.rendered, stats.cached, stats.seconds = (
            stats.rendered + per_target.rendered, stats.cached + per_target.cached, stats.seconds + per_target.seconds
        )  # fmt: skip
        result = TargetResult(target, images)
        result.metrics.update(rendered=per_target.rendered, cached=per_target.cached)
        results.append(result)
    size = results[0].images.shape[1]
    checker = Checker.load(checker_folder(settings.checker)) if settings.checker else None
    features = load_features(settings.features, checker) if settings.features else None
    real = read_image_set(settings.real, "--real", storage, size, settings.max_images) if settings.real else None
    train_set = (
        read_image_set(settings.train, "--train", storage, size, settings.max_images) if settings.train else None
    )
    if (real is not None or train_set is not None) and features is None:
        raise ValueError("--real and --train need --features (checker, or a vision model's Hub id or folder)")
    real_features = features(real.images) if real is not None and features is not None else None
    train = (features(train_set.images), train_set) if train_set is not None and features is not None else None
    clip = ClipModel(settings.clip) if settings.clip else None
    for result in results:
        _scalar_metrics(result, settings, checker, features, real_features, train, clip)
    order_by = rank_by or next(
        (m for m in ("fd", "checker_all", "clip_score") if any(m in r.metrics for r in results)), None
    )
    if order_by is not None and order_by not in HIGHER_IS_BETTER:
        raise ValueError(f"--rank_by: {order_by!r} is not one of {sorted(HIGHER_IS_BETTER)}")
    record = {
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k != "sampler"},
            "sampler": asdict(settings.sampler),
            "real_count": None if real is None else len(real.images),
            "train_count": None if train_set is None else len(train_set.images),
            "features_name": getattr(features, "name", None),
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
            }
            for r in results
        ],  # fmt: skip
        "best": best_by_metric(results),
        "ranking": {"by": order_by, "order": ranking(results, order_by) if order_by else []},
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    _write_csv(out / "eval.csv", results)
    write_page(out / "eval.html", record, results, settings, train_set)
    log.info(
        "eval: %d checkpoint(s), %d image(s) rendered, %d from the cache -> %s",
        len(results), stats.rendered, stats.cached, out / "eval.html",
    )  # fmt: skip
    return record
