"""A discriminator of real vs generated latents, noise-aware, for guidance towards realism and as a filter.

    sdtune generate discriminator --real data/digits/latents --generated data/digits/generated_latents \\
        --out runs/discriminator
    sdtune generate guided ... --discriminator runs/discriminator/classifier --discriminator_scale 0.3 \\
        --min_realism 0.5

It is the latent Classifier (a ConvNet, `noise_aware`: trained on latents noised to random timesteps, the
timestep as an input channel) with two classes, `generated` and `real`, on equal numbers of each, and a held-out
fifth of each side (split by key) for its accuracy on clean latents. Its p(real) of a generated latent is the
realism score; guidance climbs its log p(real) like classifier guidance.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from sdtune.data.tables import heldout_split, read_table
from sdtune.latent import classifier_nets
from sdtune.latent.classifier import Classifier
from sdtune.storage import Storage

CLASSES = ["generated", "real"]


def train_discriminator(
    real: str, generated: str, out: Path, noise_aware: str = "tiny-pretrained", steps: int = 300, seed: int = 0
) -> dict[str, Any]:
    """Train on `real` and `generated` latent shards; export to `out/classifier`; returns its held-out metrics."""
    storage = Storage()
    tables = [read_table(generated, "--generated", storage), read_table(real, "--real", storage)]
    if any(t.latent_settings is None for t in tables):
        raise ValueError("--real and --generated: give latent shards (data_tools encode_latents), not images")
    if tables[0].latent_settings.differences(tables[1].latent_settings):  # type: ignore[union-attr,arg-type]
        raise ValueError("--generated: encoded with other latent settings than --real (another VAE?)")
    count = min(len(t) for t in tables)
    keys, inputs, labels = [], [], []
    for label, table in enumerate(tables):
        keys += [f"{CLASSES[label]}/{k}" for k in table.keys[:count]]
        inputs.append(table.inputs[:count].float())
        labels += [label] * count
    x, y = torch.cat(inputs), torch.tensor(labels)
    train, val = heldout_split(keys, y, 0.2, seed)
    L.seed_everything(seed, verbose=False)
    model = Classifier(net=functools.partial(classifier_nets.ConvNet, widths=(32, 64)), noise_aware=noise_aware)
    model.build(x.shape[1], x.shape[-1], 2)
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    metrics = model.evaluate(x[val], y[val])
    folder = model.export(out / "classifier")
    info = json.loads((folder / "classifier.json").read_text())
    info.update(classes=CLASSES, input="latents", latent_settings=tables[1].latent_settings.to_json())  # type: ignore[union-attr]
    (folder / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    record = {"heldout_accuracy": metrics["accuracy"], "per_side": count, "steps": steps, "real": real,
              "generated": generated, "noise_aware": noise_aware}  # fmt: skip
    (out / "discriminator.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
