"""`sdtune generate interpolate`: two samples, their latent interpolation refined by the UNet, optionally pulled
towards a target; see sdtune.generate.interpolate.

    sdtune generate interpolate --a circle.png --b square.png --target square.png --metric pixel \\
        --guidance_scale 0.2 --strength 0.6 --scheduler ddim --out runs/interp

Writes strip.png (rows: naive decode of the mix, U-Net-refined, guided; columns: the alphas), trajectory.png
(the clean estimate at each step, per alpha), result.json (settings, each image's distance to the target, and
what the checker sees) and each image as PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune.eval.checker import Checker, checker_folder
from sdtune.eval.evaluate import parse_seeds
from sdtune.eval.features import CheckerFeatures
from sdtune.eval.targets import checkpoint_target
from sdtune.generate.guidance import METRICS, Metric, Target
from sdtune.generate.inputs import add_model_options, add_sample_options, load_image, load_model
from sdtune.generate.interpolate import RefineSettings, encode, mix, refine, to_images
from sdtune.generate.schedulers import SCHEDULERS
from sdtune.models.components import TINY_PRETRAINED, vae_scale_factor
from sdtune.models.sampling import encode_image, labelled_grid


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdtune generate interpolate",
        description="Interpolate two samples in latent space and refine each mix with the UNet, optionally guided "
        "towards a target sample",
        allow_abbrev=False,
    )
    add_sample_options(p, target_required=False)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_options(p)
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="interpolation weights (0: a, 1: b)")
    p.add_argument("--method", default="slerp", choices=["slerp", "linear"], help="latent interpolation")
    p.add_argument("--strength", type=float, default=0.6, help="noise level to refine from (0-1]")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (of the full schedule)")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler")
    p.add_argument("--prompt", default="", help="the prompt the UNet is conditioned on")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance of --prompt (1: none)")
    p.add_argument("--guidance_scale", type=float, default=0.0, help="pull towards --target (0: none)")
    p.add_argument("--metric", default="pixel", choices=METRICS, help="the distance guidance descends")
    p.add_argument("--seed", type=int, default=0, help="image i's noise seed is seed + i")
    p.add_argument("--checker", default=TINY_PRETRAINED, help="checker for the report ('none' to skip)")
    return p


def run(options: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(options.seed)
    try:
        alphas = [float(a) for a in options.alphas.split(",")]
    except ValueError as err:
        raise ValueError(f"--alphas: {options.alphas!r} is not a comma-separated list of numbers") from err
    settings = RefineSettings(
        options.strength, options.steps, options.scheduler, options.prompt, options.cfg_scale, options.guidance_scale
    )
    parts = load_model(options.model, options.checkpoint)
    size = parts.unet.config.sample_size * vae_scale_factor(parts.vae)
    a, b = load_image(options.a, size, "--a"), load_image(options.b, size, "--b")
    checker = Checker.load(checker_folder(options.checker)) if options.checker != "none" else None
    embed = CheckerFeatures(checker).embed if checker is not None else None
    metric, target = None, None
    if options.target is not None:
        metric = Metric(options.metric, parts.vae, embed)
        pixels = load_image(options.target, size, "--target")
        target = Target(encode(parts.vae, pixels).repeat(len(alphas), 1, 1, 1), pixels.repeat(len(alphas), 1, 1, 1))
    z = encode(parts.vae, torch.cat([a, b]))
    mixed = mix(z[0], z[1], alphas, options.method)
    seeds = [options.seed + i for i in range(len(alphas))]
    started = time.perf_counter()
    refined = refine(parts, mixed, dataclasses.replace(settings, guidance_scale=0.0), seeds)
    plain_s = time.perf_counter() - started
    rows = {"naive decode": mixed, f"refined (strength {settings.strength})": refined.latents}
    guided_s = None
    if target is not None and settings.guidance_scale > 0:
        started = time.perf_counter()
        guided = refine(parts, mixed, settings, seeds, metric, target)
        guided_s = time.perf_counter() - started
        rows[f"guided ({settings.guidance_scale}, {options.metric})"] = guided.latents
    else:
        guided = refined
    options.out.mkdir(parents=True, exist_ok=True)
    images = {name: to_images(parts.vae, latents) for name, latents in rows.items()}
    strip = np.concatenate(list(images.values()))
    labelled_grid(strip, list(images), [f"alpha {x:g}" for x in alphas], title="latent interpolation").save(
        options.out / "strip.png"
    )
    steps = [to_images(parts.vae, x0) for x0 in guided.trajectory]
    tiles = np.stack([steps[s][i] for i in range(len(alphas)) for s in range(len(steps))])
    labelled_grid(tiles, [f"alpha {x:g}" for x in alphas], [f"step {s + 1}" for s in range(len(steps))],
                  title="clean estimate at each step").save(options.out / "trajectory.png")  # fmt: skip
    record: dict[str, Any] = {
        "settings": {**settings.__dict__, "alphas": alphas, "method": options.method, "seed": options.seed,
                     "metric": options.metric if target is not None else None, "model": options.model,
                     "checkpoint": str(options.checkpoint) if options.checkpoint else None},
        "seconds": {"refine": round(plain_s, 3), "guided": None if guided_s is None else round(guided_s, 3)},
        "rows": {},
    }  # fmt: skip
    for row, (name, latents) in enumerate(rows.items()):
        entry: dict[str, Any] = {}
        if metric is not None and target is not None:
            with torch.no_grad():
                entry["distance"] = [round(float(d), 6) for d in metric.distance(latents, target)]
        if checker is not None:
            predicted = checker.predict_rendered(images[name])
            entry["checker"] = {
                k: [checker.heads[k].classes[int(i)] for i in v.argmax(1)] for k, v in predicted.items()
            }
        for i, image in enumerate(images[name]):
            (options.out / f"row{row}-alpha{i}.png").write_bytes(encode_image(image))
        record["rows"][name] = entry
    (options.out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def dataset_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdtune generate dataset",
        description="Labelled synthetic shards: refined interpolations of two training samples of one class, or "
        "classifier-guided text-to-image with an OOD filter (resumable; see sdtune.generate.dataset)",
        allow_abbrev=False,
    )
    p.add_argument("--source", required=True, help="labelled image shards (.cls), e.g. data/digits/shards")
    p.add_argument("--out", type=Path, required=True, help="output folder of the generated shards")
    p.add_argument("--per_class", type=int, required=True, help="samples to make per class")
    p.add_argument("--method", default="interpolate", choices=("interpolate", "guided"), help="how samples are made")
    p.add_argument("--classifier", default="", help="guided: a noise-aware Classifier's exported classifier/")
    p.add_argument("--classifier_scale", type=float, default=1.0, help="guided: classifier guidance (RMS step)")
    p.add_argument("--ood_percentile", type=float, default=None, help="guided: redraw samples whose OOD score is "
                   "above this percentile of the real training latents' own scores")  # fmt: skip
    p.add_argument("--max_attempts", type=int, default=4, help="guided: draws per sample before it is left out")
    p.add_argument("--samples_per_shard", type=int, default=64, help="samples per shard")
    p.add_argument("--alpha_range", default="0.25,0.75", help="mix weights are drawn uniformly from this range")
    p.add_argument("--prompt_template", default="", help="the UNet's prompt, e.g. 'a handwritten digit {label}'")
    p.add_argument("--strength", type=float, default=0.5, help="noise level to refine from (0-1]")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (of the full schedule)")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance of the prompt (1: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (pairs, alphas, noise)")
    p.add_argument("--val_fraction", type=float, default=0.2, help="held-out fraction never used as a source")
    p.add_argument("--split_seed", type=int, default=0, help="seed of that split (as data.split_seed)")
    p.add_argument("--max_train_per_class", type=int, default=None, help="draw sources only from the first N "
                   "training samples per class (as data.max_train_per_class)")  # fmt: skip
    add_model_options(p)
    p.add_argument("--max_shards", type=int, default=None, help="stop after this many new shards (rerun continues)")
    return p


def run_dataset(options: argparse.Namespace) -> Path:
    from sdtune.generate.dataset import DatasetSettings, generate_dataset

    try:
        low, high = (float(x) for x in options.alpha_range.split(","))
    except ValueError as err:
        raise ValueError(f"--alpha_range: {options.alpha_range!r} is not LOW,HIGH (e.g. 0.25,0.75)") from err
    identity = checkpoint_target(options.checkpoint).identity if options.checkpoint else None
    settings = DatasetSettings(
        options.source, options.per_class, options.samples_per_shard, low, high, options.prompt_template,
        options.strength, options.steps, options.scheduler, options.cfg_scale, options.seed, options.val_fraction,
        options.split_seed, options.max_train_per_class,
        model=options.model + (f" + checkpoint sha256 {identity}" if identity else ""), method=options.method,
        classifier=options.classifier, classifier_scale=options.classifier_scale,
        ood_percentile=options.ood_percentile, max_attempts=options.max_attempts,
    )  # fmt: skip
    torch.manual_seed(options.seed)
    return generate_dataset(load_model(options.model, options.checkpoint), settings, options.out, options.max_shards)


def guided_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdtune generate guided",
        description="Text-to-image steered by a noise-aware latent classifier (and an OOD score), each seed also "
        "rendered unguided; an OOD filter marks what to reject (see sdtune.generate.guided)",
        allow_abbrev=False,
    )
    p.add_argument("--classifier", type=Path, required=True, help="a noise-aware Classifier's exported classifier/")
    p.add_argument("--label", required=True, help="the class to steer towards (a class name of the classifier)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--classifier_scale", type=float, default=1.0, help="classifier guidance (RMS step per element)")
    p.add_argument("--prompt", default="", help="the prompt (classifier-free guidance --cfg_scale)")
    p.add_argument("--cfg_scale", type=float, default=3.0, help="classifier-free guidance of --prompt (1: none)")
    p.add_argument("--seeds", default="0-7", help="seeds: 0-7 or 0,1,5")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler")
    p.add_argument("--ood_fit", default=None, help="latent shards (real training data) to fit the OOD score on")
    p.add_argument("--ood_scale", type=float, default=0.0, help="guidance down the OOD score (0: filter only)")
    p.add_argument("--ood_threshold", type=float, default=None, help="reject above this OOD score (default: the "
                   "95th percentile of the fitted latents' own scores)")  # fmt: skip
    p.add_argument("--discriminator", type=Path, default=None, help="a real-vs-generated discriminator "
                   "(sdtune generate discriminator): its p(real) is recorded as realism")  # fmt: skip
    p.add_argument("--discriminator_scale", type=float, default=0.0, help="guidance towards p(real) (0: score only)")
    p.add_argument("--min_realism", type=float, default=None, help="reject samples with p(real) below this")
    add_model_options(p)
    p.add_argument("--checker", default=TINY_PRETRAINED, help="independent judge of the images ('none' to skip)")
    return p


def discriminator_parser() -> argparse.ArgumentParser:
    about = "Train a noise-aware real-vs-generated discriminator of latents"
    p = argparse.ArgumentParser(prog="sdtune generate discriminator", allow_abbrev=False, description=about)
    p.add_argument("--real", required=True, help="latent shards of real images")
    p.add_argument("--generated", required=True, help="latent shards of generated images (same VAE)")
    p.add_argument("--out", type=Path, required=True, help="output folder (classifier/, discriminator.json)")
    p.add_argument("--noise_aware", default=TINY_PRETRAINED, help="the model whose noise schedule it is trained on")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (batch 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    return p


def parse_seed_list(text: str) -> list[int]:
    """FIRST-LAST (inclusive), or a comma-separated list as `sdtune eval --seeds` takes."""
    if "-" not in text or "," in text:
        return parse_seeds(text)
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError as err:
        raise ValueError(f"--seeds: {text!r} is not FIRST-LAST or a comma-separated list") from err
    return list(range(first, last + 1))


def run_guided(options: argparse.Namespace) -> dict[str, Any]:
    from sdtune.data.tables import read_table
    from sdtune.generate.guidance import ClassifierPull, ScorePull
    from sdtune.generate.guided import NoiseAwareClassifier, OODScore, accepted
    from sdtune.storage import Storage

    seeds = parse_seed_list(options.seeds)
    classifier = NoiseAwareClassifier.load(options.classifier)
    label = classifier.label_of(options.label)
    parts = load_model(options.model, options.checkpoint)
    ood = None
    if options.ood_fit:
        table = read_table(options.ood_fit, "--ood_fit", Storage())
        if table.latent_settings is None:
            raise ValueError(f"--ood_fit: {options.ood_fit} holds images; give latent shards of the training data")
        ood = OODScore.fit(classifier, table.inputs.float(), table.labels)
    settings = RefineSettings(1.0, options.steps, options.scheduler, options.prompt, options.cfg_scale)
    shape = (len(seeds), parts.unet.config.in_channels, parts.unet.config.sample_size, parts.unet.config.sample_size)
    start = torch.zeros(shape)  # strength 1: pure noise, the start latents do not matter
    labels = torch.full((len(seeds),), label)
    terms: list[Any] = [ClassifierPull(classifier, labels, options.classifier_scale)]
    discriminator = NoiseAwareClassifier.load(options.discriminator) if options.discriminator else None
    if discriminator is not None and options.discriminator_scale > 0:
        real = torch.full((len(seeds),), discriminator.label_of("real"))
        terms.append(ClassifierPull(discriminator, real, options.discriminator_scale))
    if ood is not None and options.ood_scale > 0:
        terms.append(ScorePull(ood.term_score(classifier), options.ood_scale))
    started = time.perf_counter()
    plain = refine(parts, start, settings, seeds)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    guided = refine(parts, start, settings, seeds, terms=terms)
    guided_s = time.perf_counter() - started
    rows = {"unguided": plain.latents, "guided": guided.latents}
    checker = Checker.load(checker_folder(options.checker)) if options.checker != "none" else None
    threshold = None
    if ood is not None:
        threshold = options.ood_threshold if options.ood_threshold is not None else ood.threshold_at(95)
    record: dict[str, Any] = {
        "settings": {"label": options.label, "classifier_scale": options.classifier_scale, "prompt": options.prompt,
                     "cfg_scale": options.cfg_scale, "seeds": seeds, "steps": options.steps,
                     "scheduler": options.scheduler, "ood_scale": options.ood_scale, "ood_threshold": threshold,
                     "discriminator": str(options.discriminator) if options.discriminator else None,
                     "discriminator_scale": options.discriminator_scale, "min_realism": options.min_realism,
                     "classifier": str(options.classifier), "model": options.model},
        "seconds": {"unguided": round(plain_s, 3), "guided": round(guided_s, 3)},
        "rows": {},
    }  # fmt: skip
    options.out.mkdir(parents=True, exist_ok=True)
    images = {name: to_images(parts.vae, latents) for name, latents in rows.items()}
    for name, latents in rows.items():
        entry: dict[str, Any] = {}
        with torch.no_grad():
            t0 = torch.zeros(len(seeds))
            entry["classifier_p"] = [round(float(p), 4) for p in classifier(latents, t0).softmax(1)[:, label]]
        if checker is not None and options.label in checker.vocabulary.get("digit", []):
            probabilities = checker.predict_rendered(images[name])["digit"]
            index = checker.heads["digit"].classes.index(options.label)
            entry["checker_p"] = [round(float(p), 4) for p in probabilities[:, index]]
            entry["checker_hit"] = float((probabilities.argmax(1) == index).float().mean())
        if discriminator is not None:
            with torch.no_grad():
                realism = discriminator(latents, torch.zeros(len(seeds))).softmax(1)[:, discriminator.label_of("real")]
            entry["realism"] = [round(float(p), 4) for p in realism]
            if options.min_realism is not None:
                entry["realistic_enough"] = [bool(p >= options.min_realism) for p in realism]
        if ood is not None and threshold is not None:
            scores = ood(classifier, latents)
            entry["ood_score"] = [round(float(x), 4) for x in scores]
            entry["accepted"] = [bool(a) for a in accepted(scores, threshold)]
        record["rows"][name] = entry
    labelled_grid(np.concatenate(list(images.values())), list(images), [f"seed {s}" for s in seeds],
                  title=f"towards {options.label!r}, classifier scale {options.classifier_scale}").save(
        options.out / "guided.png"
    )  # fmt: skip
    (options.out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(args: list[str]) -> None:
    if args and args[0] == "discriminator":
        from sdtune.generate.discriminator import train_discriminator

        options = discriminator_parser().parse_args(args[1:])
        record = train_discriminator(options.real, options.generated, options.out, options.noise_aware,
                                     options.steps, options.seed)  # fmt: skip
        print(f"generate discriminator: held-out accuracy {record['heldout_accuracy']:.3f}; {options.out}")
        return
    if args and args[0] == "report":
        from sdtune.generate.report import parser as report_parser
        from sdtune.generate.report import report

        options = report_parser().parse_args(args[1:])
        record = report(options)
        count = record["settings"]["images_per_point"]
        print(f"generate report: {options.out / 'report.html'} ({count} images per point)")
        return
    if args and args[0] == "guided":
        record = run_guided(guided_parser().parse_args(args[1:]))
        rows = record["rows"]
        hits = ", ".join(f"{name}: checker {entry['checker_hit']:.2f}" for name, entry in rows.items()
                         if "checker_hit" in entry)  # fmt: skip
        print(f"generate guided: {hits or 'done'}; {record['settings']['label']!r}")
        return
    if args and args[0] == "dataset":
        out = run_dataset(dataset_parser().parse_args(args[1:]))
        done = "complete" if (out / "manifest.json").is_file() else "partial (rerun to continue)"
        print(f"generate dataset: {out} ({done})")
        return
    if not args or args[0] != "interpolate":
        raise SystemExit(
            "usage: sdtune generate interpolate|guided|dataset|discriminator|report ... (each takes --help)"
        )
    options = parser().parse_args(args[1:])
    record = run(options)
    rows = ", ".join(
        f"{name}: distance {np.mean(entry['distance']):.4f}" if "distance" in entry else name
        for name, entry in record["rows"].items()
    )
    print(f"generate interpolate: {rows}; {options.out / 'strip.png'}")
