"""`sdtune generate dataset`: labelled synthetic shards, by refined interpolation within a class or by
classifier-guided text-to-image with an out-of-distribution filter.

    sdtune generate dataset --source data/digits/shards --out data/digits/generated --per_class 50 \\
        --prompt_template "a handwritten digit {label}" --strength 0.5
    sdtune generate dataset --method guided --classifier runs/noise_aware_cnn/classifier --classifier_scale 1.0 \\
        --ood_percentile 95 --source data/digits/latents --out data/digits/guided --per_class 50 \\
        --prompt_template "a handwritten digit {label}" --cfg_scale 3

`interpolate` (the default): for class c, sample j: two distinct training samples of class c (never a held-out
one: the split is the classification DataModule's, `--val_fraction` and `--split_seed`; with
`--max_train_per_class`, only from the real subset a data-scarcity run trains on), a mix weight alpha in
`--alpha_range`, and a noise seed, all drawn from (seed, c, j); their latents are mixed (slerp) and refined by the
UNet (sdtune.generate.interpolate).

`guided`: sample j of class c starts from pure noise (seed drawn from (seed, c, j)) and is steered towards c by a
noise-aware latent classifier (sdtune.generate.guided) on top of the prompt's classifier-free guidance. With
`--ood_percentile P`, an OOD score is fitted on the training split's latents (the same subset as above) and a
sample scoring above its P-th percentile is drawn again with the attempt's own seed (seed, c, j, attempt), up to
`--max_attempts`; a sample rejected every time is left out and counted (`skipped.ood_rejected` in the manifest).

Each sample is a function of its own (seed, c, j), so the shards do not depend on how the run was cut.

Each shard holds `<key>.jpg`, `<key>.cls` (the class index, as the source), `<key>.txt` (the prompt) and
`<key>.json` (provenance: method, source keys, alpha, seed, strength, scheduler, steps, model and weights
sha256). As encode_latents: `generation.json` (the settings) is written first and a rerun with other settings is
refused; `progress.json` lists finished shards, so a killed run loses at most the shard it was writing; the
manifest (with the source's classes) is written last, and the classification DataModule and make_shards' tools
read the result. Tar headers carry a fixed mtime: a rerun writes identical bytes.
"""

from __future__ import annotations

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
from sdtune.generate.guidance import ClassifierPull
from sdtune.generate.guided import NoiseAwareClassifier, OODScore
from sdtune.generate.interpolate import RefineSettings, encode, mix, refine, to_images
from sdtune.models.components import SDComponents, vae_scale_factor
from sdtune.models.sampling import encode_image
from sdtune.storage import Storage

log = logging.getLogger(__name__)
METHODS = ("interpolate", "guided")
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
    method: str = "interpolate"  # or "guided"
    classifier: str = ""  # guided: a noise-aware Classifier's exported classifier/
    classifier_scale: float = 1.0
    ood_percentile: float | None = None  # guided: reject above this percentile of the real latents' OOD scores
    max_attempts: int = 4

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.samples_per_shard < 1 or self.max_attempts < 1:
            raise ValueError("--per_class, --samples_per_shard and --max_attempts must be >= 1")
        if not 0.0 <= self.alpha_low <= self.alpha_high <= 1.0:
            raise ValueError(f"--alpha_range: need 0 <= low <= high <= 1, got {self.alpha_low},{self.alpha_high}")
        if self.method not in METHODS:
            raise ValueError(f"--method: {self.method!r} is not one of {list(METHODS)}")
        if self.method == "guided" and not self.classifier:
            raise ValueError("--classifier: --method guided needs a noise-aware classifier (its classifier/ folder)")
        if self.ood_percentile is not None and (self.method != "guided" or not 0 < self.ood_percentile <= 100):
            raise ValueError("--ood_percentile: a percentile in (0, 100], with --method guided")

    def refine_settings(self) -> RefineSettings:
        strength = 1.0 if self.method == "guided" else self.strength  # guided: from pure noise
        return RefineSettings(strength, self.steps, self.scheduler, "", self.cfg_scale)


@dataclass(frozen=True)
class PlannedSample:
    key: str
    label: int
    index: int  # j: the sample's number within its class
    sources: tuple[int, ...]  # row indices in the source table (interpolate: two; guided: none)
    alpha: float | None
    noise_seed: int


def attempt_seed(settings: DatasetSettings, planned: PlannedSample, attempt: int) -> int:
    """The noise seed of a guided sample's `attempt` (0: the planned one), from (seed, class, index, attempt)."""
    if attempt == 0:
        return planned.noise_seed
    sequence = np.random.SeedSequence([settings.seed, planned.label, planned.index, attempt])
    return int(sequence.generate_state(1)[0] % 2**31)


def plan_samples(
    labels: list[int], train: list[int], classes: list[str], settings: DatasetSettings
) -> list[PlannedSample]:
    """Every sample to make, class by class; each drawn from (seed, class, index) alone."""
    planned = []
    for label, name in enumerate(classes):
        members = [i for i in train if labels[i] == label]
        if settings.method == "interpolate" and len(members) < 2:
            raise ValueError(f"--source: class {name!r} has {len(members)} training sample(s); interpolation needs 2")
        safe = "".join(c if c.isalnum() else "_" for c in name)
        for index in range(settings.per_class):
            sequence = np.random.SeedSequence([settings.seed, label, index])
            noise_seed = int(sequence.generate_state(1)[0] % 2**31)
            if settings.method == "guided":
                planned.append(PlannedSample(f"{safe}-{index:06d}", label, index, (), None, noise_seed))
                continue
            rng = np.random.default_rng(sequence)
            first, second = rng.choice(len(members), 2, replace=False)
            alpha = float(rng.uniform(settings.alpha_low, settings.alpha_high))
            planned.append(PlannedSample(f"{safe}-{index:06d}", label, index, (members[first], members[second]),
                                         alpha, noise_seed))  # fmt: skip
    return planned


class _ShardMaker:
    def __init__(self, parts: SDComponents, table: Any, train: list[int], settings: DatasetSettings) -> None:
        self.parts, self.table, self.settings = parts, table, settings
        self.classifier: NoiseAwareClassifier | None = None
        self.ood: OODScore | None = None
        self.threshold: float | None = None
        self.rejected = 0
        if settings.method == "guided":
            self.classifier = NoiseAwareClassifier.load(Path(settings.classifier))
            if [str(c) for c in self.classifier.classes] != [str(c) for c in table.classes]:
                raise ValueError(
                    f"--classifier: its classes {self.classifier.classes} are not the source's {table.classes}"
                )
            if settings.ood_percentile is not None:
                self.ood = OODScore.fit(self.classifier, self._latents(train), table.labels[train])
                self.threshold = self.ood.threshold_at(settings.ood_percentile)

    @torch.no_grad()
    def _latents(self, rows: list[int]) -> torch.Tensor:
        """The source's latents at `rows` (encoded by the model's VAE where the source holds images)."""
        inputs = self.table.inputs[rows].float()
        if self.table.latent_settings is not None:
            return inputs
        device = next(self.parts.vae.parameters()).device
        return torch.cat([encode(self.parts.vae, x.to(device)).cpu() for x in inputs.split(64)])

    def prompts(self, samples: list[PlannedSample]) -> list[str]:
        return [self.settings.prompt_template.format(label=self.table.classes[p.label]) for p in samples]

    def interpolated(self, samples: list[PlannedSample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        s, table = self.settings, self.table
        device = next(self.parts.unet.parameters()).device
        firsts = self._latents([p.sources[0] for p in samples]).to(device)
        seconds = self._latents([p.sources[1] for p in samples]).to(device)
        mixed = torch.cat([mix(a, b, [p.alpha or 0.0]) for a, b, p in zip(firsts, seconds, samples, strict=True)])
        refined = refine(self.parts, mixed, s.refine_settings(), [p.noise_seed for p in samples],
                         prompts=self.prompts(samples))  # fmt: skip
        extra = [{"source_keys": [table.keys[i] for i in p.sources], "alpha": p.alpha, "seed": p.noise_seed,
                  "strength": s.strength} for p in samples]  # fmt: skip
        return refined.latents, extra

    def guided(self, samples: list[PlannedSample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Guided samples; where the OOD filter rejects one, its next attempt's seed, up to max_attempts.
        Rejected every time: its entry is None (left out)."""
        s, unet = self.settings, self.parts.unet
        assert self.classifier is not None
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = torch.zeros(len(samples), *shape)
        extra: list[dict[str, Any] | None] = [None] * len(samples)
        prompts = self.prompts(samples)
        pending = list(range(len(samples)))
        for attempt in range(s.max_attempts):
            seeds = [attempt_seed(s, samples[i], attempt) for i in pending]
            labels = torch.tensor([samples[i].label for i in pending])
            terms: list[Any] = [ClassifierPull(self.classifier, labels, s.classifier_scale)]
            out = refine(self.parts, torch.zeros(len(pending), *shape), s.refine_settings(), seeds,
                         prompts=[prompts[i] for i in pending], terms=terms).latents.cpu()  # fmt: skip
            scores = self.ood(self.classifier, out) if self.ood is not None else None
            still = []
            for k, i in enumerate(pending):
                if scores is not None and self.threshold is not None and scores[k] > self.threshold:
                    still.append(i)
                    continue
                latents[i] = out[k]
                extra[i] = {"seed": seeds[k], "attempt": attempt, "classifier_scale": s.classifier_scale,
                            "ood_score": None if scores is None else round(float(scores[k]), 4),
                            "ood_threshold": self.threshold}  # fmt: skip
            pending = still
            if not pending:
                break
        self.rejected += len(pending)
        return latents, extra  # type: ignore[return-value]

    @torch.no_grad()
    def make(self, samples: list[PlannedSample], path: Path) -> int:
        s, table = self.settings, self.table
        latents, extra = (self.guided if s.method == "guided" else self.interpolated)(samples)
        images = to_images(self.parts.vae, latents.to(next(self.parts.vae.parameters()).device))
        written = 0
        with path.open("wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
            for planned, image, prompt, more in zip(samples, images, self.prompts(samples), extra, strict=True):
                if more is None:
                    continue
                provenance = {
                    "method": s.method, "class": table.classes[planned.label], "steps": s.steps,
                    "scheduler": s.scheduler, "cfg_scale": s.cfg_scale, "prompt": prompt, "model": s.model, **more,
                }  # fmt: skip
                jpeg = encode_image(image, "JPEG", quality=s.jpeg_quality)
                writer.write({
                    "__key__": planned.key, "jpg": jpeg, "cls": str(planned.label).encode(), "txt": prompt.encode(),
                    "json": json.dumps(provenance, sort_keys=True).encode(),
                })  # fmt: skip
                written += 1
        return written


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
    maker = _ShardMaker(parts, table, train, settings)
    size = settings.samples_per_shard
    names = [f"shard-{k:06d}.tar" for k in range(-(-len(planned) // size))]
    made = 0
    for k, name in enumerate(names):
        if name in progress["done"]:
            continue
        if max_shards is not None and made == max_shards:
            break
        before = maker.rejected
        count = maker.make(planned[k * size : (k + 1) * size], staging / name)
        if maker.rejected > before:
            progress.setdefault("rejected", {})[name] = maker.rejected - before
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
            resolution=int(parts.unet.config.sample_size * vae_scale_factor(parts.vae)),
            skipped={"ood_rejected": sum(progress.get("rejected", {}).values())} if settings.ood_percentile else {},
            classes=table.classes,
        )
        manifest.write(out)
    return out
