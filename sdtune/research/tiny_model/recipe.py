"""`sdtune tiny-model` (= `make tiny-model`): re-train `tiny-pretrained` from scratch on a 2-core CPU.

Stages, each skipped when `<work>/stages/<name>.json` says it finished (a killed run resumes where it was;
the UNet stage resumes inside its training run with `--resume auto`):

1. data      the pretraining images: coloured shapes (5 shapes, 8 colours, 3 sizes, 8 backgrounds) without
             the held-out (shape, colour) pairs and without pink, plus sklearn's digits 0-1599 captioned
             "a handwritten digit N"; held-out images (other seeds, digits 1600-1796) for the figures
2. vae       the KL autoencoder (`vae.py`), on the pretraining images and 625 pink shapes (the VAE sees
             every colour, as SD's did; only the UNet never sees pink)
3. init      a diffusers folder: that VAE, a random UNet, a frozen random CLIP text encoder, the tokenizer
4. latents   image shards -> latent shards with that VAE (`data_tools encode_latents`)
5. unet      `sdtune fit --config configs/tiny_model/unet.yaml` on the latent shards (sdtune's own path)
6. checker   shape, colour (pink included) and digit classifiers on real images (`Classifier`, a config)
7. assemble  the output folder: the pipeline (UNet in fp16), `checker/`, `samples_*.png`
8. figures   reconstruction PSNR/SSIM, the checker's score on held-out prompts, the model card (README.md)
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from data_tools.digits import digits
from data_tools.encode_latents import encode_latents
from data_tools.make_shards import make_shards
from data_tools.synth import BASE_COLORS, COLORS, SHAPES, SIZES, synth
from sdtune.checkpoint.layout import find_latest_checkpoint
from sdtune.eval.checker import ATTRIBUTES
from sdtune.fileio import sha256_file
from sdtune.models import tiny
from sdtune.models.components import SDComponents, build_pipeline, load_components, tiny_pretrained_folder
from sdtune.research.tiny_model import figures
from sdtune.research.tiny_model.vae import VAETraining, load_images, train_vae

log = logging.getLogger(__name__)

# (shape, colour) pairs never seen in pretraining: the text-to-image figures ask for them.
HELD_OUT_PAIRS = ("circle:green", "square:purple", "triangle:orange", "diamond:red", "cross:blue")
NEW_CONCEPT = "pink"  # a colour kept out of pretraining: the quickstart teaches it
HELD_OUT_DIGITS_FROM = 1600  # sklearn's digits with this index or higher are in no training set
VAE_ONLY = Path("data") / "vae_only"  # under the work folder: images only the VAE trains on


def _stage(
    work: Path, name: str, inputs: dict[str, Any], run: Callable[[], dict[str, Any]], redo_on_change: bool = False
) -> dict[str, Any]:
    """Run a stage unless its record exists; record what it returns (with its wall time) and the `inputs` it ran
    with. A record made with other inputs is refused (its outputs, and every later stage's, are of another
    recipe), or, for a cheap stage that only repackages earlier ones (`redo_on_change`), run again."""
    record = work / "stages" / f"{name}.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("inputs") == inputs:
            log.info("tiny-model: stage %s done before (%s)", name, record)
            return done
        if not redo_on_change:
            before = done.get("inputs", {})
            changed = sorted(k for k in {**before, **inputs} if before.get(k) != inputs.get(k))
            then = ", ".join(f"{k} {before.get(k)}" for k in changed) if "inputs" in done else "unrecorded settings"
            now = ", ".join(f"{k} {inputs.get(k)}" for k in changed) or "these"
            raise ValueError(
                f"tiny-model: stage {name} in {work} was run with {then}, this run asks {now}; give another --work, "
                f"or delete {record} and the later stages' records to redo it"
            )
    log.info("tiny-model: stage %s", name)
    started = time.monotonic()
    result = {**run(), "inputs": inputs, "seconds": 0.0}
    result["seconds"] = round(time.monotonic() - started, 1)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _config_digest(config: Path) -> str:
    """A stage's config, as an input of its record: an edited config is another recipe."""
    return sha256_file(config)[:16]


def _split_digits(work: Path, per_class: int | None) -> dict[str, Any]:
    """sklearn's digits 0-1599 (the first `per_class` of each class, when given) into the pretraining set,
    1600-1796 held out."""
    everything = digits(work / "data" / "all_digits", size=64)
    counts = {"pretrain": 0, "heldout": 0}
    kept: dict[str, int] = {}
    for path in sorted(everything.rglob("*.png")):
        part = "pretrain" if int(path.stem) < HELD_OUT_DIGITS_FROM else "heldout"
        label = path.parent.name
        if part == "pretrain" and per_class is not None:
            kept[label] = kept.get(label, 0) + 1
            if kept[label] > per_class:
                continue
        target = work / "data" / part / "digits" / label
        target.mkdir(parents=True, exist_ok=True)
        for sidecar in (path, path.with_suffix(".txt")):
            sidecar.replace(target / sidecar.name)
        counts[part] += 1
    shutil.rmtree(everything)
    return counts


def build_data(work: Path, num_shapes: int, digits_per_class: int | None, seed: int, jitter: float) -> dict[str, Any]:
    pretrain = work / "data" / "pretrain"
    for leftover in (work / "data", work / "shards"):
        shutil.rmtree(leftover, ignore_errors=True)
    synth(
        pretrain / "shapes",
        num_images=num_shapes,
        seed=seed,
        shapes=list(SHAPES),
        colors=list(BASE_COLORS),
        sizes=list(SIZES),
        exclude=list(HELD_OUT_PAIRS),
        jitter=jitter,
    )
    # The held-out shapes (the VAE's figures) and the VAE's pink shapes go anywhere they fit: the codec is general.
    synth(work / "data" / "heldout" / "shapes", num_images=300, seed=seed + 1, shapes=list(SHAPES), sizes=list(SIZES))
    # The VAE is a general image codec (SD's saw every colour): it also learns pink, which the UNet never sees.
    # Trained without it, it decoded pink (255, 120, 200) as a pale (212, 184, 203), and no fine-tune of the
    # UNet could draw the quickstart's new colour.
    vae_only = num_shapes // 8
    synth(work / VAE_ONLY / "shapes", num_images=vae_only, seed=seed + 2, shapes=list(SHAPES), colors=[NEW_CONCEPT],
          sizes=list(SIZES))  # fmt: skip
    digit_counts = _split_digits(work, digits_per_class)
    manifest = make_shards(str(pretrain), work / "shards", resolution=64, samples_per_shard=256)
    return {
        "shapes": num_shapes,
        "jitter": jitter,
        "vae_only_pink_shapes": vae_only,
        "digits": digit_counts,
        "shards": len(manifest.shards),
        "samples": manifest.num_samples,
    }


def build_vae(work: Path, steps: int, seed: int) -> dict[str, Any]:
    images = torch.cat([load_images(work / "data" / "pretrain"), load_images(work / VAE_ONLY)])
    vae = train_vae(images, VAETraining(steps=steps, seed=seed))
    vae.save_pretrained(work / "vae", safe_serialization=True)
    return {"steps": steps, "images": len(images), "scaling_factor": vae.config.scaling_factor}


def build_init(work: Path, seed: int) -> dict[str, Any]:
    tokenizer = tiny.tiny_tokenizer(tiny.PRETRAINED_WORDS)
    vae = AutoencoderKL.from_pretrained(work / "vae", use_safetensors=True)
    unet = tiny.tiny_pretrained_unet(seed)
    text_encoder = tiny.tiny_pretrained_text_encoder(tokenizer)
    parts = SDComponents(unet, vae, text_encoder, tokenizer, tiny.tiny_pretrained_scheduler())
    parts.save_pretrained(work / "init")
    return {"unet_parameters": sum(p.numel() for p in unet.parameters()), "vocabulary": len(tokenizer)}


def _fit(config: Path, overrides: dict[str, str]) -> None:
    """`sdtune fit --config <config> --resume auto` with `overrides`, in a child process (its own logging and
    Lightning state); its output goes to this process's output."""
    command = [sys.executable, "-m", "sdtune", "fit", "--config", str(config), "--resume", "auto"]
    for key, value in overrides.items():
        command += [f"--{key}", value]
    log.info("tiny-model: %s", " ".join(command))
    code = subprocess.run(command).returncode
    if code != 0:
        raise ValueError(f"tiny-model: `{' '.join(command)}` exited with code {code}; its error is printed above")


def build_unet(work: Path, config: Path, epochs: int) -> dict[str, Any]:
    run = work / "unet"
    _fit(
        config,
        {
            "model.init_args.pretrained": str(work / "init"),
            "data.init_args.shards": str(work / "latents"),
            "trainer.default_root_dir": str(run),
            "trainer.logger.init_args.save_dir": str(run),
            "trainer.max_epochs": str(epochs),
        },
    )
    newest = find_latest_checkpoint(run / "checkpoints")
    if newest is None or newest.epoch != epochs - 1:
        # A preempted run (SIGTERM, SLURM requeue) saves and exits cleanly before its last epoch.
        raise ValueError(
            f"tiny-model: the UNet run in {run} stopped before epoch {epochs} (newest checkpoint: "
            f"{newest.path.name if newest else 'none'}); run the same command again to resume it"
        )
    return {
        "checkpoint": str(newest.path),
        "epochs": epochs,
        "steps": newest.step,
        "recipe": unet_recipe(config),
        **figures.loss_curve(run),
    }


def unet_recipe(config: Path) -> dict[str, Any]:
    """The UNet config's training settings, for the card."""
    settings = yaml.safe_load(config.read_text())
    model, data, trainer = (
        settings[k]["init_args"] if k != "trainer" else settings[k] for k in ("model", "data", "trainer")
    )
    ema = next(
        (c["init_args"]["decay"] for c in trainer.get("callbacks", []) if c["class_path"].endswith(".EMA")), None
    )
    return {
        "batch_size": data["batch_size"],
        "learning_rate": model["learning_rate"],
        "lr_scheduler": model["lr_scheduler"],
        "lr_warmup_steps": model["lr_warmup_steps"],
        "min_snr_gamma": model.get("min_snr_gamma"),
        "min_snr_floor": model.get("min_snr_floor"),
        "caption_dropout": data.get("caption_dropout"),
        "gradient_clip_val": trainer.get("gradient_clip_val"),
        "ema_decay": ema,
    }


def build_checker(work: Path, config: Path, num_images: int, epochs: int, seed: int) -> dict[str, Any]:
    """One head per attribute, trained on real images: shapes and colours (pink included) drawn for it, and
    the pretraining digits."""
    results = {}
    for index, attribute in enumerate(ATTRIBUTES):
        root = work / "checker" / attribute
        if attribute == "digit":
            images = work / "data" / "pretrain" / "digits"
        else:
            images = root / "images"
            shutil.rmtree(images, ignore_errors=True)
            synth(
                images,
                num_images=num_images,
                seed=seed + 10 + index,
                shapes=list(SHAPES),
                colors=list(COLORS),
                sizes=list(SIZES),
                class_folders=True,
                class_of=attribute,
            )
        make_shards(str(images), root / "shards", resolution=64, samples_per_shard=1000, class_folders=True)
        _fit(
            config,
            {
                "data.init_args.shards": str(root / "shards"),
                "trainer.default_root_dir": str(root / "run"),
                "trainer.max_epochs": str(epochs),
            },
        )
        metrics = json.loads((root / "run" / "metrics.json").read_text())
        results[attribute] = {"val_accuracy": round(metrics["accuracy"], 4), "classes": metrics["classes"]}
    return results


def assemble(work: Path, out: Path, unet_checkpoint: Path) -> dict[str, Any]:
    """The shipped folder, written beside `out` and swapped in: the pipeline with the EMA UNet in fp16 (the VAE
    and text encoder stay fp32: they are small, and the VAE's figures are its fp32 ones), and `checker/`."""
    parts = load_components(str(work / "init"))
    unet = UNet2DConditionModel.from_pretrained(unet_checkpoint / "unet_ema", use_safetensors=True)
    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config)
    staging = out.parent / f".{out.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline = build_pipeline(unet.to(torch.float16), parts.vae, parts.text_encoder, parts.tokenizer, scheduler)
    pipeline.save_pretrained(staging, safe_serialization=True)
    for attribute in ATTRIBUTES:
        head = work / "checker" / attribute / "run"
        shutil.copytree(head / "classifier", staging / "checker" / attribute)
        shutil.copyfile(head / "metrics.json", staging / "checker" / attribute / "metrics.json")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return {"folder": str(out)}


def tiny_model(
    out: Path | None = None,
    work: Path = Path("runs/tiny_model"),
    num_shapes: int = 5000,
    shape_jitter: float = 0.15,
    digits_per_class: int | None = None,
    vae_steps: int = 3000,
    unet_epochs: int = 14,
    unet_config: Path = Path("configs/tiny_model/unet.yaml"),
    checker_config: Path = Path("configs/tiny_model/checker.yaml"),
    checker_images: int = 3000,
    checker_epochs: int = 8,
    eval_seeds: int = 4,
    seed: int = 0,
) -> Path:
    """Train tiny-pretrained from scratch (VAE, UNet, checker), evaluate it and write its model card.

    Args:
        out: The model folder written (default: `sdtune/models/tiny_pretrained`, the one that ships).
        work: Working folder: data, shards, latents, training runs, stage records (resumable).
        num_shapes: Synthetic shape images for pretraining.
        shape_jitter: How far a pretraining shape's centre may move (`synth --jitter`: 0 centred, 1 anywhere).
        digits_per_class: Keep at most this many of the pretraining digits per class (default: all of 0-1599).
        vae_steps: VAE optimizer steps (batch 16, 32x32 crops).
        unet_epochs: UNet epochs over the latent shards (batch 32).
        unet_config: The UNet's training config (paths and epochs are filled in).
        checker_config: The checker heads' training config.
        checker_images: Images drawn per checker head (shape, colour).
        checker_epochs: Epochs per checker head.
        eval_seeds: Seeds per prompt in the text-to-image figures.
        seed: Seed of the data, the initialisations and the training runs' noise.
    """
    out = out or tiny_pretrained_folder()
    for option, config in (("unet_config", unet_config), ("checker_config", checker_config)):
        if not config.is_file():
            raise ValueError(
                f"tiny-model --{option}: {config} not found; run from the repository root or give the config's path"
            )
    started = time.monotonic()
    record: dict[str, Any] = {}
    record["data"] = _stage(
        work,
        "data",
        {"num_shapes": num_shapes, "shape_jitter": shape_jitter, "digits_per_class": digits_per_class, "seed": seed},
        lambda: build_data(work, num_shapes, digits_per_class, seed, shape_jitter),
    )
    record["vae"] = _stage(
        work, "vae", {"vae_steps": vae_steps, "seed": seed}, lambda: build_vae(work, vae_steps, seed)
    )
    record["init"] = _stage(work, "init", {"seed": seed}, lambda: build_init(work, seed))
    record["latents"] = _stage(
        work,
        "latents",
        {},
        lambda: {
            "latents": encode_latents(str(work / "shards"), str(work / "latents"), vae=str(work / "init")).num_samples
        },
    )
    record["unet"] = _stage(
        work,
        "unet",
        {"unet_epochs": unet_epochs, "unet_config": _config_digest(unet_config)},
        lambda: build_unet(work, unet_config, unet_epochs),
    )
    record["checker"] = _stage(
        work,
        "checker",
        {
            "checker_images": checker_images,
            "checker_epochs": checker_epochs,
            "checker_config": _config_digest(checker_config),
            "seed": seed,
        },
        lambda: build_checker(work, checker_config, checker_images, checker_epochs, seed),
    )
    record["assemble"] = _stage(
        work,
        "assemble",
        {"out": str(out), "unet": record["unet"]["checkpoint"]},
        lambda: assemble(work, out, Path(record["unet"]["checkpoint"])),
        redo_on_change=True,
    )
    settings = {
        "num_shapes": num_shapes,
        "shape_jitter": shape_jitter,
        "digits_per_class": digits_per_class,
        "vae_steps": vae_steps,
        "unet_epochs": unet_epochs,
        "checker_images": checker_images,
        "checker_epochs": checker_epochs,
        "eval_seeds": eval_seeds,
        "seed": seed,
        "held_out_pairs": list(HELD_OUT_PAIRS),
        "new_concept": NEW_CONCEPT,
    }
    evaluated = time.monotonic()
    results = figures.evaluate(out, work, eval_seeds, HELD_OUT_PAIRS, NEW_CONCEPT)
    stage_seconds = {name: stage["seconds"] for name, stage in record.items()}
    stage_seconds["figures"] = round(time.monotonic() - evaluated, 1)
    # The sum of the stages' own times: a resumed run's wall time would leave out the stages it found done.
    figures.write_card(out, settings, record, results, stage_seconds, sum(stage_seconds.values()))
    log.info("tiny-model: %s written (%.0f s)", out, time.monotonic() - started)
    return out
