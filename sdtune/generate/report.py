"""`sdtune generate report`: one self-contained page (PNGs inlined, no scripts, no external requests) on guided
generation for a pair of samples and a target.

    sdtune generate report --a a.png --b b.png --target b.png --out runs/generate_report \\
        [--classifier runs/noise_aware_cnn/classifier --ood_fit data/digits/latents] [--benchmark BENCHMARK_JSON]

Sections: the interpolation strip (naive decode, U-Net-refined, guided), the trajectory of the clean estimate,
distance to the target and realism against the strength and against the guidance scale (the OOD score and the
Frechet distance of the classifier's features to the real latents', with --classifier and --ood_fit; the
discriminator's p(real), with --discriminator; the checker's agreement with the target's class), the samplers
side by side (distance, OOD score, FD, p(real), images/s), and the synthetic-training table of a latent
benchmark run with generator rows. Every number comes with its settings: a tiny-pretrained run measures the
loop, not SD.
"""

from __future__ import annotations

import argparse
import html
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from sdtune.eval.checker import Checker, checker_folder
from sdtune.eval.features import CheckerFeatures
from sdtune.eval.metrics import frechet_distance
from sdtune.generate.guidance import METRICS, Metric, Target
from sdtune.generate.inputs import add_model_options, add_sample_options, load_image, load_model
from sdtune.generate.interpolate import RefineSettings, encode, mix, refine, to_images
from sdtune.generate.schedulers import SCHEDULERS
from sdtune.latent.benchmark import table_rows
from sdtune.latent.html import STYLE, figure_html, table_html
from sdtune.latent.plots import figure_png, image_png
from sdtune.models.components import TINY_PRETRAINED, SDComponents, vae_scale_factor
from sdtune.models.sampling import labelled_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STRENGTHS = (0.3, 0.5, 0.7, 0.9)
SCALES = (0.0, 0.1, 0.3, 0.6)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdtune generate report", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_sample_options(p, target_required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (report.html, report.json)")
    add_model_options(p)
    p.add_argument("--metric", default="pixel", choices=METRICS, help="the distance guidance descends")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="interpolation weights")
    p.add_argument("--seeds", type=int, default=4, help="noise seeds per alpha in the curves")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--prompt", default="", help="the prompt the UNet is conditioned on")
    p.add_argument("--classifier", type=Path, default=None, help="noise-aware classifier (for the OOD score)")
    p.add_argument("--ood_fit", default=None, help="latent shards to fit the OOD score on (and the FD's reference)")
    p.add_argument("--discriminator", type=Path, default=None, help="a real-vs-generated discriminator "
                   "(sdtune generate discriminator): its mean p(real) is the realism curve")  # fmt: skip
    p.add_argument("--benchmark", type=Path, default=None, help="benchmark.json of a latent benchmark with "
                   "generator rows (the synthetic-training table)")  # fmt: skip
    return p


class _Study:
    """The measurements: refine a batch (alphas x seeds) under settings; score distance, OOD and the checker."""

    def __init__(self, parts: SDComponents, options: argparse.Namespace) -> None:
        self.parts, self.options = parts, options
        size = parts.unet.config.sample_size * vae_scale_factor(parts.vae)
        a, b = load_image(options.a, size, "--a"), load_image(options.b, size, "--b")
        goal = load_image(options.target, size, "--target")
        self.alphas = [float(x) for x in options.alphas.split(",")]
        z = encode(parts.vae, torch.cat([a, b]))
        self.mixed = mix(z[0], z[1], self.alphas)
        self.batch = self.mixed.repeat(options.seeds, 1, 1, 1)
        self.seeds = list(range(len(self.batch)))
        self.checker = Checker.load(checker_folder(TINY_PRETRAINED))
        self.metric = Metric(options.metric, parts.vae, CheckerFeatures(self.checker).embed)
        self.target = Target(
            encode(parts.vae, goal).repeat(len(self.batch), 1, 1, 1), goal.repeat(len(self.batch), 1, 1, 1)
        )
        self.target_classes = {k: int(v.argmax()) for k, v in self.checker.predict(goal).items()}
        self.ood: Any = None
        if options.classifier is not None and options.ood_fit:
            from sdtune.data.tables import read_table
            from sdtune.generate.guided import NoiseAwareClassifier, OODScore
            from sdtune.storage import Storage

            self.classifier = NoiseAwareClassifier.load(options.classifier)
            table = read_table(options.ood_fit, "--ood_fit", Storage())
            self.ood = OODScore.fit(self.classifier, table.inputs.float(), table.labels)
            with torch.no_grad():
                self.real_features = self.classifier.features(table.inputs.float()).double().numpy()
        self.discriminator: Any = None
        if options.discriminator is not None:
            from sdtune.generate.guided import NoiseAwareClassifier

            self.discriminator = NoiseAwareClassifier.load(options.discriminator)

    def measure(self, strength: float, scale: float, scheduler: str = "ddim") -> dict[str, float]:
        settings = RefineSettings(strength, self.options.steps, scheduler, self.options.prompt, 1.0, scale)
        started = time.perf_counter()
        out = refine(self.parts, self.batch, settings, self.seeds, self.metric, self.target)
        seconds = time.perf_counter() - started
        return self.score(out.latents) | {"images_per_s": len(self.batch) / seconds}

    @torch.no_grad()
    def score(self, latents: torch.Tensor) -> dict[str, float]:
        predicted = self.checker.predict_rendered(to_images(self.parts.vae, latents))
        same = np.mean([float((predicted[k].argmax(1) == v).float().mean()) for k, v in self.target_classes.items()])
        figures = {"distance": float(self.metric.distance(latents, self.target).mean()), "checker_agrees": float(same)}
        if self.ood is not None:
            figures["ood_score"] = float(np.mean(self.ood(self.classifier, latents)))
            features = self.classifier.features(latents).double().numpy()
            figures["fd"] = frechet_distance(features, self.real_features)
        if self.discriminator is not None:
            real = self.discriminator.label_of("real")
            p_real = self.discriminator(latents, torch.zeros(len(latents))).softmax(1)[:, real]
            figures["p_real"] = float(p_real.mean())
        return figures


def _curve(rows: list[dict[str, Any]], x: str, title: str) -> bytes:
    names = [k for k in ("distance", "ood_score", "fd", "p_real", "checker_agrees") if k in rows[0]]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        axis.plot([r[x] for r in rows], [r[name] for r in rows], marker="o")
        axis.set(xlabel=x.replace("_", " "), title=name.replace("_", " "))
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9, y=1.04)
    return figure_png(figure, dpi=100)


def report(options: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    parts = load_model(options.model, options.checkpoint)
    study = _Study(parts, options)
    one = list(range(len(study.alphas)))  # the first seed of each alpha, for the pictures
    plain = refine(parts, study.mixed, RefineSettings(0.6, options.steps, prompt=options.prompt), one)
    guided = refine(
        parts,
        study.mixed,
        RefineSettings(0.6, options.steps, prompt=options.prompt, guidance_scale=0.3),
        one,
        study.metric,
        Target(study.target.latents[: len(one)], study.target.pixels[: len(one)]),
    )
    strip = np.concatenate([to_images(parts.vae, x) for x in (study.mixed, plain.latents, guided.latents)])
    columns = [f"alpha {a:g}" for a in study.alphas]
    strip_png = image_png(
        labelled_grid(
            strip,
            ["naive decode", "refined (strength 0.6)", f"guided (0.3, {options.metric})"],
            columns,
            title="interpolation",
        )
    )
    steps = [to_images(parts.vae, x0) for x0 in guided.trajectory]
    tiles = np.stack([steps[s][i] for i in one for s in range(len(steps))])
    trajectory_png = image_png(labelled_grid(tiles, columns, [f"{s + 1}" for s in range(len(steps))],
                                             title="guided: the clean estimate at each step"))  # fmt: skip
    by_strength = [{"strength": s, **study.measure(s, 0.0)} for s in STRENGTHS]
    by_scale = [{"guidance_scale": g, **study.measure(0.6, g)} for g in SCALES]
    by_scheduler = [{"scheduler": name, **study.measure(0.6, 0.3, name)} for name in SCHEDULERS]
    record = {
        "settings": {"a": str(options.a), "b": str(options.b), "target": str(options.target), "model": options.model,
                     "metric": options.metric, "alphas": study.alphas, "seeds_per_alpha": options.seeds,
                     "steps": options.steps, "prompt": options.prompt, "images_per_point": len(study.batch),
                     "discriminator": str(options.discriminator) if options.discriminator else None},
        "naive": study.score(study.mixed.repeat(options.seeds, 1, 1, 1)),
        "by_strength": by_strength, "by_guidance_scale": by_scale, "by_scheduler": by_scheduler,
    }  # fmt: skip
    sched_rows = [["sampler", "distance", "ood score", "fd", "p(real)", "checker agrees", "images/s"]] + [
        [r["scheduler"], f"{r['distance']:.4f}", f"{r.get('ood_score', float('nan')):.2f}",
         f"{r.get('fd', float('nan')):.1f}", f"{r.get('p_real', float('nan')):.2f}", f"{r['checker_agrees']:.2f}",
         f"{r['images_per_s']:.2f}"] for r in by_scheduler
    ]  # fmt: skip
    s = record["settings"]
    meta = (f"{options.model}; metric {options.metric}; {s['images_per_point']} images per point ({len(study.alphas)} "
            f"alphas x {options.seeds} seeds); {options.steps} steps; prompt {options.prompt!r}. Realism: the OOD "
            "score (Mahalanobis, lower is more like the fitted real latents) and fd (Frechet distance of the "
            "classifier's clean-latent features to all --ood_fit latents'; with this few images per point it is "
            "biased upwards, compare points, not runs) when a classifier is given; p(real), the discriminator's "
            "mean probability that the latents are real, when one is given; 'checker agrees': how often "
            "tiny-pretrained's checker sees the target's shape/colour/digit.")  # fmt: skip
    parts_html = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sdtune generate report</title>",
        f"<style>{STYLE}</style></head><body><h1>Guided generation</h1><p class='meta'>{html.escape(meta)}</p>",
        "<section><h2>Interpolation: naive, refined, guided</h2>", figure_html("interpolation strip", strip_png),
        figure_html("trajectory", trajectory_png), "</section>",
        "<section><h2>Against strength (no guidance) and guidance scale (strength 0.6)</h2><div class='figures'>",
        figure_html("by strength", _curve(by_strength, "strength", "refinement strength")),
        figure_html("by guidance scale", _curve(by_scale, "guidance_scale", "guidance towards the target")),
        "</div></section><section><h2>Samplers (strength 0.6, guidance 0.3)</h2>", table_html(sched_rows), "</section>",
    ]  # fmt: skip
    if options.benchmark is not None:
        trained = table_rows(json.loads(options.benchmark.read_text())["rows"], "accuracy")
        parts_html += ["<section><h2>Training on generated data</h2><p>Held-out accuracy, mean ± std over seeds: real "
                       "only (none), real + generated, generated only, beside the latent augmentations.</p>",
                       table_html(trained), "</section>"]  # fmt: skip
    parts_html.append("</body></html>")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "report.html").write_text("\n".join(parts_html))
    (options.out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
