"""`sdtune generate dataset`: labelled synthetic shards from real ones, by refined interpolation within a class.

    sdtune generate dataset --source data/digits/shards --out data/digits/generated --per_class 50 \\
        --prompt_template "a handwritten digit {label}" --strength 0.5

For class c, sample j: two distinct training samples of class c (never a held-out one: the split is the
classification DataModule's, `--val_fraction` and `--split_seed`; with `--max_train_per_class`, only from the
real subset a data-scarcity run trains on), a mix weight alpha in `--alpha_range`, and a
noise seed, all drawn from (seed, c, j); their latents are mixed (slerp) and refined by the UNet
(sdtune.generate.interpolate). Each sample is a function of its own (seed, c, j), so the shards do not depend on
how the run was cut.

Each shard holds `<key>.jpg`, `<key>.cls` (the class index, as the source), `<key>.txt` (the prompt) and
`<key>.json` (provenance: method, source keys, alpha, seed, strength, scheduler, steps, model and weights
sha256). As encode_latents: `generation.json` (the settings) is written first and a rerun with other settings is
refused; `progress.json` lists finished shards, so a killed run loses at most the shard it was writing; the
manifest (with the source's classes) is written last, and the classification DataModule and make_shards' tools
read the result. Tar headers carry a fixed mtime: a rerun writes identical bytes.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from sdtune.data.manifest import DatasetManifest, ShardEntry
from sdtune.data.tables import cap_per_class, heldout_split, read_table
from sdtune.fileio import sha256_file
from sdtune.generate.interpolate import RefineSettings, encode, mix, refine, to_images
from sdtune.models.components import SDComponents
from sdtune.models.sampling import to_pil
from sdtune.storage import Storage

log = logging.getLogger(__name__)
SETTINGS_NAME = "generation.json"
PROGRESS_NAME = "progress.json"


@dataclass(frozen=True)
class DatasetSettings:
    source: str
    per_class: int
    samples_per_shard: int = 64
    alpha_low: float = 0.25
    alpha_high: float = 0.75
    prompt_template: str = ""
    strength: float = 0.5
    steps: int = 25
    scheduler: str = "ddim"
    cfg_scale: float = 1.0
    seed: int = 0
    val_fraction: float = 0.2
    split_seed: int = 0
    max_train_per_class: int | None = None  # draw sources only from these (data.max_train_per_class's subset)
    jpeg_quality: int = 95
    model: str = ""  # the model's name and weights identity (a checkpoint's sha256)

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.samples_per_shard < 1:
            raise ValueError("--per_class and --samples_per_shard must be >= 1")
        if not 0.0 <= self.alpha_low <= self.alpha_high <= 1.0:
            raise ValueError(f"--alpha_range: need 0 <= low <= high <= 1, got {self.alpha_low},{self.alpha_high}")

    def refine_settings(self) -> RefineSettings:
        return RefineSettings(self.strength, self.steps, self.scheduler, "", self.cfg_scale)


@dataclass(frozen=True)
class PlannedSample:
    key: str
    label: int
    sources: tuple[int, int]  # row indices in the source table
    alpha: float
    noise_seed: int


def plan_samples(
    labels: list[int], train: list[int], classes: list[str], settings: DatasetSettings
) -> list[PlannedSample]:
    """Every sample to make, class by class; each drawn from (seed, class, index) alone."""
    planned = []
    for label, name in enumerate(classes):
        members = [i for i in train if labels[i] == label]
        if len(members) < 2:
            raise ValueError(f"--source: class {name!r} has {len(members)} training sample(s); interpolation needs 2")
        safe = "".join(c if c.isalnum() else "_" for c in name)
        for index in range(settings.per_class):
            sequence = np.random.SeedSequence([settings.seed, label, index])
            rng = np.random.default_rng(sequence)
            first, second = rng.choice(len(members), 2, replace=False)
            alpha = float(rng.uniform(settings.alpha_low, settings.alpha_high))
            noise_seed = int(sequence.generate_state(1)[0] % 2**31)
            planned.append(PlannedSample(f"{safe}-{index:06d}", label, (members[first], members[second]), alpha,
                                         noise_seed))  # fmt: skip
    return planned


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class _ShardMaker:
    def __init__(self, parts: SDComponents, table: Any, settings: DatasetSettings) -> None:
        self.parts, self.table, self.settings = parts, table, settings

    @torch.no_grad()
    def make(self, samples: list[PlannedSample], path: Path) -> int:
        s, table = self.settings, self.table
        device = next(self.parts.unet.parameters()).device
        firsts = encode(self.parts.vae, table.inputs[[p.sources[0] for p in samples]].to(device))
        seconds = encode(self.parts.vae, table.inputs[[p.sources[1] for p in samples]].to(device))
        mixed = torch.cat([mix(a, b, [p.alpha]) for a, b, p in zip(firsts, seconds, samples, strict=True)])
        prompts = [s.prompt_template.format(label=table.classes[p.label]) for p in samples]
        refined = refine(self.parts, mixed, s.refine_settings(), [p.noise_seed for p in samples], prompts=prompts)
        images = to_images(self.parts.vae, refined.latents)
        with path.open("wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
            for planned, image, prompt in zip(samples, images, prompts, strict=True):
                provenance = {
                    "method": "interpolate", "source_keys": [table.keys[i] for i in planned.sources],
                    "class": table.classes[planned.label], "alpha": planned.alpha, "seed": planned.noise_seed,
                    "strength": s.strength, "steps": s.steps, "scheduler": s.scheduler, "cfg_scale": s.cfg_scale,
                    "prompt": prompt, "model": s.model,
                }  # fmt: skip
                writer.write({
                    "__key__": planned.key, "jpg": _jpeg(image, s.jpeg_quality), "cls": str(planned.label).encode(),
                    "txt": prompt.encode(), "json": json.dumps(provenance, sort_keys=True).encode(),
                })  # fmt: skip
        return len(samples)


def generate_dataset(parts: SDComponents, settings: DatasetSettings, out: Path, max_shards: int | None = None) -> Path:
    """Write the generated shards, their progress and (once all are done) the manifest into `out`; resumable.
    `max_shards` stops after that many new shards (a bounded run; the rerun continues)."""
    storage = Storage()
    table = read_table(settings.source, "--source", storage)
    train, _ = heldout_split(table.keys, table.labels, settings.val_fraction, settings.split_seed)
    train = cap_per_class(train, table.labels, settings.max_train_per_class)
    planned = plan_samples(table.labels.tolist(), train, table.classes, settings)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SETTINGS_NAME
    if recorded.is_file() and json.loads(recorded.read_text()) != asdict(settings):
        raise ValueError(
            f"generate dataset --out: {out} holds shards made with other settings (see {recorded}); use another "
            "--out, or delete it to start again"
        )
    recorded.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    progress_path = out / PROGRESS_NAME
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"done": {}}
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    maker = _ShardMaker(parts, table, settings)
    size = settings.samples_per_shard
    names = [f"shard-{k:06d}.tar" for k in range(-(-len(planned) // size))]
    made = 0
    for k, name in enumerate(names):
        if name in progress["done"]:
            continue
        if max_shards is not None and made == max_shards:
            break
        count = maker.make(planned[k * size : (k + 1) * size], staging / name)
        (staging / name).replace(out / name)
        progress["done"][name] = asdict(ShardEntry(name, count, sha256_file(out / name), (out / name).stat().st_size))
        tmp = staging / PROGRESS_NAME
        tmp.write_text(json.dumps(progress, indent=2) + "\n")
        tmp.replace(progress_path)  # the shard counts as done only from here on
        made += 1
        log.info("generate dataset: %s (%d samples; %d of %d shards)", name, count, len(progress["done"]), len(names))
    shutil.rmtree(staging, ignore_errors=True)
    if len(progress["done"]) == len(names):
        manifest = DatasetManifest(
            shards=[ShardEntry(**progress["done"][n]) for n in names],
            resolution=int(table.inputs.shape[-1]),
            skipped={},
            classes=table.classes,
        )
        manifest.write(out)
    return out
