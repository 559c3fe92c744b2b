"""scikit-learn baselines on flattened latents (or pixels): logistic regression, random forest, SVM.

    python -m sdtune.latent.sklearn_baselines --shards data/digits/latents --out runs/sklearn

Same held-out split and the same metrics as the Lightning classifiers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdtune.data.tables import heldout_split, read_table
from sdtune.latent.metrics import classification_metrics
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings

BASELINES = ("logreg", "random_forest", "svm")


def make_baseline(name: str, seed: int):
    """An unfitted sklearn pipeline (standardised features for the linear and kernel models)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=-1)
    if name == "svm":
        return make_pipeline(StandardScaler(), SVC(C=10.0, kernel="rbf", random_state=seed))
    raise ValueError(f"sklearn baseline: {name!r} is not one of {list(BASELINES)}")


def fit_and_score(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    seed: int = 0,
) -> dict:
    """Fit baseline `name` on flattened training inputs; metrics on the held-out inputs."""
    model = make_baseline(name, seed)
    model.fit(train[0].flatten(1).numpy(), train[1].numpy())
    predictions = model.predict(heldout[0].flatten(1).numpy())
    return classification_metrics(np.asarray(predictions), heldout[1].numpy(), num_classes)


def main(
    shards: str,
    out: Path = Path("runs/sklearn"),
    baselines: tuple[str, ...] = BASELINES,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    seed: int = 0,
    s3: S3Settings | None = None,
) -> dict[str, dict]:
    """Fit each baseline on the training split of `shards` and write `<out>/sklearn_metrics.json`.

    Args:
        shards: Labelled latent (or image) shards.
        out: Output folder.
        baselines: Any of logreg, random_forest, svm.
        val_fraction: Held-out fraction per class (same split as the Lightning classifiers).
        split_seed: Seed of the held-out split.
        seed: Seed of the models.
        s3: Settings for s3:// shards (endpoint, retries), as in a training config's `s3:` section.
    """
    table = read_table(shards, "--shards", Storage(s3))
    train_index, val_index = heldout_split(table.keys, table.labels, val_fraction, split_seed)
    train, heldout = table.subset(train_index), table.subset(val_index)
    results = {}
    for name in baselines:
        results[name] = fit_and_score(
            name, (train.inputs, train.labels), (heldout.inputs, heldout.labels), len(table.classes), seed
        )
        print(f"{name}: accuracy {results[name]['accuracy']:.4f}, macro-F1 {results[name]['macro_f1']:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sklearn_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from sdtune.logs import setup_logging

    setup_logging()
    auto_cli(main, as_positional=False, allow_abbrev=False)
