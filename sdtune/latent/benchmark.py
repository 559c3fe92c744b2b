"""Benchmark: classifier x latent augmentation over several seeds, latents vs pixels, on a fixed split.

    python -m sdtune.latent.benchmark --latents data/digits/latents --images data/digits/shards \\
        --out runs/latent_benchmark --seeds [0,1,2]

Every cell trains one classifier (Lightning nets in-process, sklearn baselines) on the real training
split plus the augmentation's synthetic samples (or, for `synthetic_only`, on synthetic samples alone)
and scores it on the same held-out real images. Pixel classifiers see augmentations decoded by the VAE.
Writes `benchmark.md` (mean +- std of held-out accuracy and macro-F1), `benchmark.csv` and `benchmark.json`.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from sdtune.latent import classifier_nets
from sdtune.latent.augment import SMOTE, Compose, Extrapolate, GaussianNoise, Interpolate, LatentAugmentation
from sdtune.latent.classification_data import ClassificationDataModule
from sdtune.latent.classifier import Classifier
from sdtune.latent.sklearn_baselines import BASELINES, fit_and_score
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings

log = logging.getLogger(__name__)

# name -> (augmentations, synthetic only)
AUGMENTATIONS: dict[str, tuple[Callable[[], list[LatentAugmentation]], bool]] = {
    "none": (list, False),
    "gaussian": (lambda: [GaussianNoise(ratio=0.1)], False),
    "lerp": (lambda: [Interpolate(mode="linear")], False),
    "slerp": (lambda: [Interpolate(mode="spherical")], False),
    "extrapolate": (lambda: [Extrapolate(strength=0.3)], False),
    "smote": (lambda: [SMOTE(oversample=2.0)], False),
    "synthetic_only": (lambda: [Compose([Interpolate(mode="spherical", copies=2), GaussianNoise(ratio=0.05)])], True),
}


def generator_rows(generated: list[str] | str | None, option: str = "--generated") -> dict[str, str]:
    """A generator's shards per row name: each NAME=PATH (a bare PATH is named `generated`) gives the rows NAME
    (real + generated) and NAME_only (generated only); "{seed}" in a PATH is each benchmark seed's own set."""
    entries = [generated] if isinstance(generated, str) else list(generated or [])
    rows: dict[str, str] = {}
    for entry in entries:
        name, _, path = entry.partition("=")
        if not name.isidentifier() or not path:  # a bare path (which may hold "=" further on)
            name, path = "generated", entry
        if {name, f"{name}_only"} & set(AUGMENTATIONS) or name in rows:
            raise ValueError(f"benchmark {option}: {entry!r}: give NAME=PATH with a new name (a word, not an "
                             "augmentation's) per generator")  # fmt: skip
        rows[name], rows[f"{name}_only"] = path, path
    return rows


@dataclass(frozen=True)
class Entry:
    """A classifier of the benchmark: its input ("latents" or "pixels") and network (None: sklearn)."""

    input: str
    net: Callable[..., torch.nn.Module] | None = None
    sklearn: str | None = None


CLASSIFIERS: dict[str, Entry] = {
    "linear": Entry("latents", classifier_nets.LinearProbe),
    "mlp": Entry("latents", functools.partial(classifier_nets.MLP, hidden=(256,))),
    "cnn": Entry("latents", functools.partial(classifier_nets.ConvNet, widths=(32, 64))),
    "attention": Entry("latents", functools.partial(classifier_nets.PatchTransformer, patch_size=4, dim=64, depth=2)),
    "pixel_cnn": Entry("pixels", functools.partial(classifier_nets.ConvNet, widths=(16, 32, 64))),
    **{name: Entry("latents", sklearn=name) for name in BASELINES},
}


def _run_cell(entry: Entry, data: ClassificationDataModule, seed: int, steps: int) -> dict:
    L.seed_everything(seed, verbose=False)
    if entry.sklearn is not None:
        data.setup("fit")
        inputs, labels = data.training_set()
        assert data.val is not None
        return fit_and_score(
            entry.sklearn, (inputs, labels), (data.val.inputs, data.val.labels), data.num_classes, seed
        )
    model = Classifier(net=entry.net, learning_rate=2e-3)
    # The same number of steps with and without augmentation: a larger training set must not mean more updates.
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    assert data.val is not None
    return model.evaluate(data.val.inputs, data.val.labels)


def benchmark(
    latents: str,
    images: str | None = None,
    out: Path = Path("runs/latent_benchmark"),
    classifiers: tuple[str, ...] = ("linear", "mlp", "cnn", "attention", "pixel_cnn", "logreg"),
    augmentations: tuple[str, ...] = tuple(AUGMENTATIONS),
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = 120,
    max_train_per_class: int | None = 30,
    pixel_size: int = 32,
    val_fraction: float = 0.2,
    generated: list[str] | str | None = None,
    generated_latents: list[str] | str | None = None,
    s3: S3Settings | None = None,
) -> list[dict]:
    """Train every classifier with every augmentation for every seed; write the tables.

    Args:
        latents: Labelled latent shards (data_tools encode_latents).
        images: The image shards the latents came from (needed for pixel classifiers).
        out: Output folder.
        classifiers: Any of linear, mlp, cnn, attention, pixel_cnn, logreg, random_forest, svm.
        augmentations: Any of none, gaussian, lerp, slerp, extrapolate, smote, synthetic_only (and with
            --generated, generated and generated_only).
        seeds: One run per seed (network init, batch order, augmentation draws).
        steps: Optimizer steps per Lightning classifier (batch 64), the same with and without augmentation.
        max_train_per_class: Real training samples per class (few samples is where augmentation should
            matter); null keeps the whole training split. The held-out split is always complete.
        pixel_size: Side of the images the pixel classifiers see.
        val_fraction: Held-out fraction per class.
        generated: Generators' image shards (`sdtune generate dataset`, made with the same
            --max_train_per_class), each NAME=PATH (a bare PATH is named `generated`): adds the rows NAME
            (real + generated) and NAME_only. "{seed}" in a PATH takes each seed's own generated set.
        generated_latents: Those shards encoded by the VAE of --latents (data_tools encode_latents), for the
            latent classifiers, with the same names.
        s3: Settings for s3:// shards (endpoint, retries), as in a training config's `s3:` section.
    """
    made_images = generator_rows(generated)
    made_latents = generator_rows(generated_latents, "--generated_latents")
    augmentations = (*augmentations, *(g for g in made_images if g not in augmentations))
    known = {**AUGMENTATIONS, **made_images}
    unknown = [c for c in classifiers if c not in CLASSIFIERS] + [a for a in augmentations if a not in known]
    if unknown:
        raise ValueError(f"benchmark: unknown classifier/augmentation {unknown}; see --help for the names")
    if len(seeds) < 1 or steps < 1:
        raise ValueError("benchmark: give at least one seed and one step")
    if any(CLASSIFIERS[c].input == "pixels" for c in classifiers) and not images:
        raise ValueError("benchmark --images: pixel classifiers need the image shards the latents were made from")
    missing = [g for g in made_images if g not in made_latents]
    if missing and any(CLASSIFIERS[c].input == "latents" for c in classifiers):
        raise ValueError(f"benchmark --generated_latents: latent classifiers need the generated shards of {missing} "
                         "encoded (python -m data_tools encode_latents --source GENERATED --vae ...)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    storage = Storage(s3)
    rows = []
    for name in classifiers:
        entry = CLASSIFIERS[name]
        for augmentation in augmentations:
            make_transforms, synthetic_only = AUGMENTATIONS.get(augmentation, (list, augmentation.endswith("_only")))
            made = (made_latents if entry.input == "latents" else made_images).get(augmentation)
            for seed in seeds:
                data = ClassificationDataModule(
                    shards=latents if entry.input == "latents" else str(images),
                    latents=latents if entry.input == "pixels" else None,
                    val_fraction=val_fraction,
                    image_size=pixel_size if entry.input == "pixels" else None,
                    augment=make_transforms(),
                    synthetic_only=bool(synthetic_only),
                    generated=made.replace("{seed}", str(seed)) if made else None,
                    max_train_per_class=max_train_per_class,
                    seed=seed,
                )
                data.use_storage(storage)
                start = time.perf_counter()
                metrics = _run_cell(entry, data, seed, steps)
                row = {
                    "classifier": name,
                    "input": entry.input,
                    "augmentation": augmentation,
                    "seed": seed,
                    "accuracy": metrics["accuracy"],
                    "macro_f1": metrics["macro_f1"],
                    "num_train_real": len(data.train or []),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                rows.append(row)
                log.info("benchmark %s", row)
    write_tables(rows, out, {"seeds": list(seeds), "steps": steps, "max_train_per_class": max_train_per_class})
    return rows


def summarise(rows: list[dict], metric: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(classifier, augmentation) -> (mean, std, number of seeds) of `metric`."""
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        cells.setdefault((row["classifier"], row["augmentation"]), []).append(row[metric])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in cells.items()}


def table_rows(rows: list[dict], metric: str) -> list[list[str]]:
    """A header and one row per classifier: its input, then `mean ± std` of `metric` per augmentation."""
    table = summarise(rows, metric)
    augmentations = list(dict.fromkeys(r["augmentation"] for r in rows))
    inputs = {r["classifier"]: r["input"] for r in rows}
    body = [
        [name, inputs[name], *(f"{table[(name, a)][0]:.3f} ± {table[(name, a)][1]:.3f}" for a in augmentations)]
        for name in dict.fromkeys(r["classifier"] for r in rows)
    ]
    return [["classifier", "input", *augmentations], *body]


def write_tables(rows: list[dict], out: Path, settings: dict) -> Path:
    lines = [
        "# Latent classification benchmark",
        "",
        f"Held-out scores, mean ± std over seeds {settings['seeds']} ({settings['steps']} steps of 64, "
        f"{settings['max_train_per_class']} real training samples per class; fixed held-out split).",
        "",
    ]
    for metric in ("accuracy", "macro_f1"):
        header, *body = table_rows(rows, metric)
        lines += [f"## {metric}", "", "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    (out / "benchmark.md").write_text("\n".join(lines))
    with (out / "benchmark.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "benchmark.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return out / "benchmark.md"


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from sdtune.logs import setup_logging

    setup_logging()
    auto_cli(benchmark, as_positional=False, allow_abbrev=False)
