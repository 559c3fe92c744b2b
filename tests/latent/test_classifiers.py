"""Classifier configs train on CPU and report held-out metrics; sklearn baselines; the benchmark; metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.checkpoint.layout import find_latest_checkpoint, verify_checkpoint
from sdtune.cli import main
from sdtune.data.tables import heldout_split, read_table
from sdtune.latent import sklearn_baselines
from sdtune.latent.augment import Interpolate
from sdtune.latent.benchmark import benchmark
from sdtune.latent.classification_data import ClassificationDataModule
from sdtune.latent.classifier import load_classifier, noised, with_time_channel
from sdtune.latent.metrics import classification_metrics
from sdtune.models.components import load_noise_scheduler
from sdtune.storage import Storage
from tests.helpers.runs import REPO, kill_when, run_train

CONFIGS = sorted((REPO / "configs" / "latent").glob("*.yaml"))


def test_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 200)
    predictions = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 4, 200))
    metrics = classification_metrics(predictions, targets, 4)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(targets, predictions))
    assert metrics["macro_f1"] == pytest.approx(f1_score(targets, predictions, average="macro"))
    assert metrics["confusion"] == confusion_matrix(targets, predictions).tolist()


def test_heldout_split_is_stratified_fixed_and_shared_by_latents_and_pixels(digit_data: tuple[Path, Path]) -> None:
    shards, latents = digit_data
    images, codes = read_table(str(shards), "t", Storage()), read_table(str(latents), "t", Storage())
    assert images.keys == codes.keys and torch.equal(images.labels, codes.labels)
    train, val = heldout_split(images.keys, images.labels, 0.2)
    assert heldout_split(images.keys[::-1], images.labels.flip(0), 0.2)[1] != val  # indices move with order...
    reversed_val = heldout_split(images.keys[::-1], images.labels.flip(0), 0.2)[1]
    assert {images.keys[::-1][i] for i in reversed_val} == {images.keys[i] for i in val}  # ...the keys do not
    assert torch.bincount(images.labels[val]).tolist() == [3] * 10 and not set(train) & set(val)


def test_decoded_augmentation_gives_pixel_classifiers_images(digit_data: tuple[Path, Path]) -> None:
    shards, latents = digit_data
    data = ClassificationDataModule(str(shards), latents=str(latents), augment=[Interpolate()], synthetic_only=True)
    data.setup("fit")
    inputs, labels = data.training_set()
    assert inputs.shape == (120, 3, 64, 64) and inputs.min() >= -1 and inputs.max() <= 1
    assert torch.equal(labels, data.train.labels)
    with pytest.raises(ValueError, match="data.latents: augmenting a pixel classifier"):
        ClassificationDataModule(str(shards), augment=[Interpolate()]).setup("fit")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_classifier_config_trains_and_reports_heldout_metrics(
    config: Path, digit_data: tuple[Path, Path], tmp_path: Path
) -> None:
    shards, latents = digit_data
    first_line = config.read_text().splitlines()[0]
    assert first_line == f"# python train.py fit --config configs/latent/{config.name}", first_line
    data = str(latents if "shards: data/digits/latents" in config.read_text() else shards)
    main(
        ["fit", "--config", str(config), "--data.init_args.shards", data, "--trainer.max_epochs", "2"]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_heldout"] == 30 and metrics["num_train"] == 120 and len(metrics["classes"]) == 10
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 30
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / 30)
    # The exported network reloads (safetensors) and reproduces the reported accuracy.
    net, info = load_classifier(tmp_path / "classifier")
    table = read_table(data, "t", Storage())
    inputs = table.inputs if info["input"] == "latents" else _resize(table.inputs, info["image_size"])
    _, val = heldout_split(table.keys, table.labels, 0.2)
    inputs = inputs[val]
    if info.get("time_channel"):  # noise-aware: validation's noise (one batch: generator seeded with 0)
        alphas = load_noise_scheduler("tiny-pretrained").alphas_cumprod.float()
        inputs, timesteps = noised(inputs.float(), alphas, torch.Generator().manual_seed(0))
        inputs = with_time_channel(inputs, timesteps, info["num_train_timesteps"])
    with torch.no_grad():
        predictions = net(inputs).argmax(dim=1)
    assert (predictions == table.labels[val]).float().mean().item() == pytest.approx(metrics["accuracy"])
    # Per-epoch checkpoints (PeriodicCheckpoint serves classifiers too): the exported network of the last one
    # is the network the run ended with.
    latest = find_latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.epoch == 1 and verify_checkpoint(latest.path) is None
    assert (latest.path / "classifier" / "model.safetensors").read_bytes() == (
        tmp_path / "classifier" / "model.safetensors"
    ).read_bytes()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    from sdtune.latent.classification_data import _resize as resize

    return resize(images, size)


def test_sklearn_baselines_report_the_same_metrics(digit_data: tuple[Path, Path], tmp_path: Path) -> None:
    results = sklearn_baselines.main(str(digit_data[1]), out=tmp_path)
    assert set(results) == {"logreg", "random_forest", "svm"}
    for metrics in results.values():
        assert np.array(metrics["confusion"]).sum() == 30 and metrics["accuracy"] > 0.1  # chance is 0.1
    assert json.loads((tmp_path / "sklearn_metrics.json").read_text()) == results


def test_benchmark_writes_mean_and_std_over_seeds(digit_data: tuple[Path, Path], tmp_path: Path) -> None:
    shards, latents = digit_data
    rows = benchmark(
        str(latents),
        str(shards),
        out=tmp_path,
        classifiers=("linear", "pixel_cnn", "logreg"),
        augmentations=("none", "smote", "synthetic_only"),
        seeds=(0, 1, 2),
        steps=4,
        max_train_per_class=8,
    )
    assert len(rows) == 27 and {r["num_train_real"] for r in rows} == {80}
    table = (tmp_path / "benchmark.md").read_text()
    assert "| linear | latents |" in table and "| pixel_cnn | pixels |" in table and " ± " in table
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["seeds"] == [0, 1, 2]
    linear_none = [r["accuracy"] for r in rows if r["classifier"] == "linear" and r["augmentation"] == "none"]
    assert len(set(linear_none)) > 1  # seeds really differ (init and batch order)


def test_unlabelled_and_badly_labelled_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    import io

    import webdataset as wds
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "a", "png": png, "cls": "1"})
        writer.write({"__key__": "b", "png": png, "json": {"label": 0}})
        writer.write({"__key__": "c", "png": png, "cls": "one"})
        writer.write({"__key__": "d", "png": png, "txt": "no label"})
        writer.write({"__key__": "e", "png": png, "json": {"label": "zero"}})
    table = read_table(str(tmp_path), "data.shards", Storage(), image_size=16)
    assert table.labels.tolist() == [1, 0] and table.classes == ["0", "1"]
    assert table.skipped == {"bad_label": 2, "missing_label": 1}


@pytest.mark.slow
@pytest.mark.parametrize("every_n_train_steps", [0, 3], ids=["epoch-checkpoints", "mid-epoch-checkpoints"])
def test_a_killed_classifier_resumes_exactly(
    digit_data: tuple[Path, Path], tmp_path: Path, every_n_train_steps: int
) -> None:
    """latent_cnn_augmented (augmentation redrawn every epoch, shuffled batches), killed after its second
    checkpoint and resumed: the same metrics, exported network and final checkpoint as never killed."""
    import yaml

    def config(run_dir: Path) -> Path:
        settings = yaml.safe_load((CONFIGS[0].parent / "latent_cnn_augmented.yaml").read_text())
        settings["trainer"].update(default_root_dir=str(run_dir), max_epochs=4, enable_progress_bar=False)
        settings["data"]["init_args"]["shards"] = str(digit_data[1])
        for callback in settings["trainer"]["callbacks"]:
            if callback["class_path"].endswith("PeriodicCheckpoint"):
                callback["init_args"].update(keep_last=10, every_n_train_steps=every_n_train_steps)
        path = run_dir.with_suffix(".yaml")
        run_dir.mkdir(parents=True)
        path.write_text(yaml.safe_dump(settings))
        return path

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train(config(reference))
    resumed_config = config(resumed)
    kill_when(resumed_config, lambda: len(list((resumed / "checkpoints").glob("epoch=*/manifest.json"))) >= 2)
    killed_at = find_latest_checkpoint(resumed / "checkpoints")
    assert killed_at is not None and killed_at.step < find_latest_checkpoint(reference / "checkpoints").step
    run_train(resumed_config, "--resume", "auto")
    assert json.loads((resumed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    for name in (
        "classifier/model.safetensors",
        "checkpoints/" + find_latest_checkpoint(reference / "checkpoints").path.name + "/classifier/model.safetensors",
    ):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    assert (resumed / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()


def test_benchmark_generator_rows_are_named_and_take_each_seeds_own_set(
    digit_data: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    from sdtune.latent.benchmark import generator_rows

    assert generator_rows(["a/b", "guided=s3://x/y={seed}"]) == {
        "generated": "a/b", "generated_only": "a/b", "guided": "s3://x/y={seed}", "guided_only": "s3://x/y={seed}"
    }  # fmt: skip
    for bad in (["slerp=a"], ["a", "b"], ["synthetic=a"]):
        with pytest.raises(ValueError, match="--generated: .* give NAME=PATH"):
            generator_rows(bad)
    shards, latents = digit_data
    shutil.copytree(shards, tmp_path / "made0")  # stands in for seed 0's generated set; seed 1 has none yet
    run = dict(classifiers=("pixel_cnn",), augmentations=("none",), seeds=(0, 1), steps=2, max_train_per_class=4,
               generated=[f"made={tmp_path / 'made{seed}'}"])  # fmt: skip
    with pytest.raises(ValueError, match="made1"):
        benchmark(str(latents), str(shards), out=tmp_path / "bench", **run)  # type: ignore[arg-type]
    shutil.copytree(shards, tmp_path / "made1")
    rows = benchmark(str(latents), str(shards), out=tmp_path / "bench", **run)  # type: ignore[arg-type]
    assert [(r["augmentation"], r["seed"]) for r in rows] == [
        ("none", 0), ("none", 1), ("made", 0), ("made", 1), ("made_only", 0), ("made_only", 1)
    ]  # fmt: skip
