"""Metric-guided generation on tiny-pretrained: a noise-aware latent classifier trained through its config steers
text-to-image towards a digit, judged by the checker (which guidance never saw); the OOD filter; determinism."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_tools.digits import digits
from data_tools.encode_latents import encode_latents
from data_tools.make_shards import make_shards
from sdtune.data.tables import read_table
from sdtune.generate.guided import NoiseAwareClassifier, OODScore, accepted
from sdtune.storage import Storage
from tests.helpers.runs import REPO, run_train, train_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def noise_aware(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the exported noise-aware classifier, the digit latents it was trained on): 60 digits per class."""
    root = tmp_path_factory.mktemp("noise_aware")
    digits(root / "images", size=64, max_per_class=60)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=200, class_folders=True)
    encode_latents(str(root / "shards"), str(root / "latents"), vae="tiny-pretrained", batch_size=64)
    config = yaml.safe_load((REPO / "configs" / "latent" / "noise_aware_cnn.yaml").read_text())
    config["trainer"].update(default_root_dir=str(root / "run"), enable_progress_bar=False, max_epochs=25)
    config["data"]["init_args"]["shards"] = str(root / "latents")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_train(path)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5, metrics["accuracy"]  # over all noise levels, pure noise included (chance 0.1)
    return root / "run" / "classifier", root / "latents"


def guided(classifier: Path, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "sdtune", "generate", "guided", "--classifier", str(classifier), "--label", "3",
               "--classifier_scale", "0.6", "--prompt", "a handwritten digit", "--seeds", "0-11", "--steps", "20",
               "--out", str(out), *extra]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_classifier_guidance_raises_the_checkers_probability_of_the_class(
    noise_aware: tuple[Path, Path], tmp_path: Path
) -> None:
    classifier, latents = noise_aware
    first = guided(classifier, tmp_path / "a", "--ood_fit", str(latents))
    plain, steered = first["rows"]["unguided"], first["rows"]["guided"]
    # The guiding classifier is satisfied; the independent checker agrees, less strongly (same seeds).
    assert np.mean(steered["classifier_p"]) > np.mean(plain["classifier_p"]) + 0.3
    assert np.mean(steered["checker_p"]) > np.mean(plain["checker_p"]), (steered["checker_p"], plain["checker_p"])
    assert len(steered["ood_score"]) == 12 and first["settings"]["ood_threshold"] > 0
    second = guided(classifier, tmp_path / "b", "--ood_fit", str(latents))
    assert (tmp_path / "a" / "guided.png").read_bytes() == (tmp_path / "b" / "guided.png").read_bytes()
    assert second["rows"] == first["rows"], "deterministic for a seed"


def test_the_ood_filter_rejects_more_at_a_lower_threshold(noise_aware: tuple[Path, Path]) -> None:
    classifier_folder, latents = noise_aware
    classifier = NoiseAwareClassifier.load(classifier_folder)
    table = read_table(str(latents), "latents", Storage())
    fit, unseen = torch.arange(len(table)) % 2 == 0, torch.arange(len(table)) % 2 == 1
    score = OODScore.fit(classifier, table.inputs[fit].float(), table.labels[fit])
    # The threshold comes from scores of latents the fit did not see: on unseen real digits the 95th percentile
    # accepts about 95% (an in-sample threshold accepted a minority of them).
    assert 0.88 <= accepted(score(classifier, table.inputs[unseen].float()), score.threshold_at(95)).mean() <= 1.0
    noise = torch.randn(64, *table.inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    candidates = np.concatenate([score(classifier, table.inputs[:64].float()), score(classifier, noise)])
    kept = [int(accepted(candidates, score.threshold_at(p)).sum()) for p in (50, 80, 95, 99)]
    assert kept == sorted(kept) and kept[0] < kept[-1], kept
    assert score(classifier, noise).mean() > score(classifier, table.inputs[:64].float()).mean(), "noise is OOD"
    with pytest.raises(ValueError, match="trained on clean inputs"):
        from sdtune.latent.classifier import Classifier

        plain = Classifier()
        plain.build(4, 16, 10)
        plain.export(classifier_folder.parent / "clean")
        NoiseAwareClassifier.load(classifier_folder.parent / "clean")


def test_a_discriminator_scores_realism_guides_towards_it_and_filters(
    noise_aware: tuple[Path, Path], tmp_path: Path
) -> None:
    classifier, latents = noise_aware
    shards = latents.parent / "shards"
    made = tmp_path / "made"
    for command in (
        ["generate", "dataset", "--source", str(shards), "--out", str(made), "--per_class", "20", "--steps", "6",
         "--samples_per_shard", "100", "--prompt_template", "a handwritten digit {label}"],
        ["generate", "discriminator", "--real", str(latents), "--generated", str(tmp_path / "made_latents"),
         "--out", str(tmp_path / "disc"), "--steps", "150"],
    ):  # fmt: skip
        if command[1] == "discriminator":
            encode_latents(str(made), str(tmp_path / "made_latents"), vae="tiny-pretrained", batch_size=64)
        result = subprocess.run([sys.executable, "-m", "sdtune", *command], cwd=REPO, env=train_env(),
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "disc" / "discriminator.json").read_text())
    assert record["per_side"] == 200 and record["heldout_accuracy"] > 0.6, record  # chance: 0.5
    runs = {}
    for scale in ("0", "0.5"):
        extra = ["--discriminator", str(tmp_path / "disc" / "classifier"), "--discriminator_scale", scale]
        runs[scale] = guided(classifier, tmp_path / f"g{scale}", *extra, "--min_realism", "0.5")["rows"]["guided"]
    assert np.mean(runs["0.5"]["realism"]) > np.mean(runs["0"]["realism"]), "guidance towards p(real) raises it"
    for row in runs.values():
        assert row["realistic_enough"] == [p >= 0.5 for p in row["realism"]]

    # The report's realism curves: the discriminator's p(real), the OOD score and the FD to the real latents.
    a, b = sorted((latents.parent / "images" / "3").glob("*.png"))[:2]
    target = sorted((latents.parent / "images" / "8").glob("*.png"))[0]
    command = [sys.executable, "-m", "sdtune", "generate", "report", "--a", str(a), "--b", str(b), "--target",
               str(target), "--alphas", "0,1", "--seeds", "1", "--steps", "6", "--classifier", str(classifier),
               "--ood_fit", str(latents), "--discriminator", str(tmp_path / "disc" / "classifier"), "--out",
               str(tmp_path / "report")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "report" / "report.json").read_text())
    for row in record["by_strength"] + record["by_guidance_scale"] + record["by_scheduler"]:
        assert 0 <= row["p_real"] <= 1 and row["fd"] > 0 and row["ood_score"] > 0, row
    assert "p(real)" in (tmp_path / "report" / "report.html").read_text()


def test_generate_dataset_guided_redraws_what_the_ood_filter_rejects_and_feeds_the_benchmark(
    noise_aware: tuple[Path, Path], tmp_path: Path
) -> None:
    from sdtune.eval.checker import Checker, checker_folder
    from sdtune.latent.benchmark import benchmark
    from sdtune.models.components import TINY_PRETRAINED

    classifier, latents = noise_aware

    def made(out: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sdtune", "generate", "dataset", "--method", "guided", "--classifier",
                   str(classifier), "--classifier_scale", "1.0", "--ood_percentile", "95", "--max_attempts", "2",
                   "--source", str(latents), "--out", str(out), "--per_class", "1", "--samples_per_shard", "5",
                   "--steps", "10", "--prompt_template", "a handwritten digit", "--cfg_scale", "3"]  # fmt: skip
        return subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)

    first, second = made(tmp_path / "a"), made(tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    shards = sorted((tmp_path / "a").glob("shard-*.tar"))
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("shard-*.tar"))]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    table = read_table(str(tmp_path / "a"), "generated", Storage())
    rejected = manifest["skipped"]["ood_rejected"]
    assert len(table) + rejected == 10 and len(table) > 0, (len(table), rejected)
    with tarfile.open(shards[0]) as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert all(r["method"] == "guided" and r["ood_score"] <= r["ood_threshold"] for r in records)
    assert any(r["attempt"] == 1 for r in records) or rejected > 0, "a 95th-percentile filter redraws some"
    # The prompt names no digit: the classifier's guidance alone picks it; the checker (never used by guidance)
    # finds the labelled digit well above chance (0.1).
    checker = Checker.load(checker_folder(TINY_PRETRAINED))
    found = checker.predict(table.inputs)["digit"].argmax(1)
    names = checker.heads["digit"].classes
    hits = np.mean([names[int(i)] == table.classes[int(label)] for i, label in zip(found, table.labels, strict=True)])
    assert hits > 0.3, hits
    rows = benchmark(str(latents), str(latents.parent / "shards"), tmp_path / "bench", classifiers=("pixel_cnn",),
                     augmentations=("none",), seeds=(0,), steps=5, max_train_per_class=5,
                     generated=[f"guided={tmp_path / 'a'}"])  # fmt: skip
    assert [r["augmentation"] for r in rows] == ["none", "guided", "guided_only"]
