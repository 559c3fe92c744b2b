"""`sdtune eval` end to end on a quickstart run of tiny-pretrained: the page, the JSON, the CSV, the cache."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdtune.checkpoint.layout import list_checkpoints
from sdtune.checkpoint.remote import StorageRemote
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings
from tests.helpers.browser import find_chromium, inspect_page
from tests.helpers.runs import QUICKSTART, REPO, run_train, train_env

pytestmark = pytest.mark.slow
PROMPTS = [
    "a photo of a large pink circle on a blue background",
    "a photo of a medium pink square on a black background",
]
SEEDS = "0,1"


def _eval(run_dir: Path | str, out: Path, *extra: str) -> dict:
    prompts = out.parent / "prompts.txt"
    prompts.write_text("# the quickstart's new colour\n" + "\n".join(PROMPTS) + "\n\n")
    command = [sys.executable, "-m", "sdtune", "eval", str(run_dir), "--prompts", str(prompts), "--seeds", SEEDS]
    result = subprocess.run(
        [*command, "--base", "--out", str(out), *extra], cwd=REPO, env=train_env(None), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "eval: " in result.stdout and "eval.html" in result.stdout
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, pink_shards: Path, synth_shards: Path) -> Path:
    """The quickstart's config, cut to 2 epochs of 8 steps, with the Evaluate callback (base model and every
    epoch, FD against the synthetic shapes) and a CSV logger instead of the checker callback and wandb."""
    root = tmp_path_factory.mktemp("eval_run")
    config = yaml.safe_load(QUICKSTART.read_text())
    run_dir = root / "run"
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    evaluate = {
        "class_path": "sdtune.eval.callback.Evaluate",
        "init_args": {"prompts": PROMPTS, "seeds": [0, 1], "at_start": True, "real": str(synth_shards)},
    }
    config["trainer"].update(
        default_root_dir=str(run_dir), max_epochs=2, enable_progress_bar=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}},
        callbacks=[callbacks["EMA"], evaluate, callbacks["PeriodicCheckpoint"]],
    )  # fmt: skip
    config["data"]["init_args"]["shards"] = str(pink_shards)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_train(path, "--resume", "auto")
    return run_dir


def test_eval_scores_each_checkpoint_beside_the_base_model_and_renders_only_what_is_new(
    quickstart_run: Path, pink_shards: Path, synth_shards: Path, tmp_path: Path, s3_server: str, s3_bucket: str
) -> None:
    out = tmp_path / "eval"
    per_target = len(PROMPTS) * 2
    extra = ["--real", str(synth_shards), "--train", str(pink_shards.parent / "images")]
    first = _eval(quickstart_run, out, *extra)
    labels = [c["label"] for c in first["checkpoints"]]
    assert labels == ["base", "epoch=0000-step=000008", "epoch=0001-step=000016"]
    assert [c["step"] for c in first["checkpoints"]] == [0, 8, 16]
    assert first["render"] == {**first["render"], "rendered": 3 * per_target, "cached": 0}
    assert first["render"]["images_per_second"] > 0
    assert all(c["weights"] is None or c["weights"].endswith("unet_ema") for c in first["checkpoints"])
    for entry in first["checkpoints"]:
        m = entry["metrics"]
        assert 0 <= m["checker_all"] <= 1 and 0 <= m["checker_color"] <= 1
        assert m["fd"] > 0 and m["fd_low"] <= m["fd"] <= m["fd_high"] and m["kid_subset_size"] == per_target
        assert -1 <= m["nn_similarity"] <= m["nn_similarity_max"] <= 1 and 0 <= m["memorised_fraction"] <= 1
        assert len(entry["closest_pairs"]) == 4
    base, newest = first["checkpoints"][0]["metrics"], first["checkpoints"][-1]["metrics"]
    assert base["checker_color"] <= 0.25  # the base model never saw pink
    assert first["ranking"]["by"] == "fd" and sorted(first["ranking"]["order"]) == sorted(labels)
    assert set(first["best"]) == {"checker_all", "fd", "kid", "nn_similarity"}
    assert len(list((out / "cache").rglob("*.png"))) == 3 * per_target
    with (out / "eval.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["checkpoint"] for r in rows] == labels and float(rows[-1]["fd"]) == pytest.approx(newest["fd"])

    # A rerun renders nothing and measures the same.
    again = _eval(quickstart_run, out, *extra)
    assert again["render"]["rendered"] == 0 and again["render"]["cached"] == 3 * per_target
    assert [c["metrics"]["fd"] for c in again["checkpoints"]] == [c["metrics"]["fd"] for c in first["checkpoints"]]

    # One more epoch: the new checkpoint (and only it) is rendered; the pruned one drops out.
    run_train(quickstart_run.parent / "config.yaml", "--resume", "auto", "--trainer.max_epochs", "3")
    assert [r.step for r in list_checkpoints(quickstart_run / "checkpoints")] == [24, 16]
    third = _eval(quickstart_run, out, *extra)
    assert [c["step"] for c in third["checkpoints"]] == [0, 16, 24]
    assert third["render"]["rendered"] == per_target and third["render"]["cached"] == 2 * per_target

    # The same checkpoints from S3 (as a run's `remote` publishes them, weights only): their weights hash the
    # same, so every image comes from the cache.
    storage = Storage(S3Settings(endpoint_url=s3_server))
    remote = StorageRemote(f"s3://{s3_bucket}/run/checkpoints", 3, storage)
    for ref in list_checkpoints(quickstart_run / "checkpoints"):
        weights_only = tmp_path / "weights_only" / ref.path.name
        shutil.copytree(ref.path, weights_only, ignore=shutil.ignore_patterns("training_state.safetensors"))
        manifest = json.loads((weights_only / "manifest.json").read_text())
        del manifest["files"]["training_state.safetensors"]
        (weights_only / "manifest.json").write_text(json.dumps(manifest))
        remote.publish(weights_only, ref.path.name, "")
    remote_eval = _eval(remote.url, out, *extra, "--s3_endpoint_url", s3_server)
    assert [c["step"] for c in remote_eval["checkpoints"]] == [0, 16, 24]
    assert remote_eval["render"]["rendered"] == 0 and remote_eval["render"]["cached"] == 3 * per_target
    assert [c["identity"] for c in remote_eval["checkpoints"]] == [c["identity"] for c in third["checkpoints"]]

    page = (out / "eval.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    # grids per prompt, metric curves (checker, FD, KID, similarity), the memorisation pairs
    assert len(sources) == len(PROMPTS) + 4 + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<script" not in page and "(best)" in page
    if find_chromium() is None:
        pytest.skip("chromium not installed (make test installs Debian's chromium)")
    seen = inspect_page(out / "eval.html", tmp_path / "eval.png")
    assert len(seen["images"]) == len(sources)
    assert all(i["complete"] and i["width"] > 100 for i in seen["images"]), seen["images"]
    assert seen["failed"] == [] and all(u.startswith(("file://", "data:")) for u in seen["requested"])
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('src="data:image/png;base64,', 'src="missing.png#', 1))
    seen = inspect_page(broken, tmp_path / "broken.png")
    assert seen["failed"] and any(i["width"] == 0 for i in seen["images"])


def test_evaluate_callback_scores_the_base_model_and_each_epoch_into_its_checkpoint(quickstart_run: Path) -> None:
    evals = sorted((quickstart_run / "evals").glob("*.json"))
    records = [json.loads(p.read_text()) for p in evals]
    steps = [r["step"] for r in records]
    # at_start: the base model as step 0, once (the other test resumes this run for a third epoch: no new step 0)
    assert steps in ([0, 8, 16], [0, 8, 16, 24]), steps
    for record in records:
        m = record["metrics"]
        assert 0 <= m["checker_all"] <= 1 and m["fd"] > 0 and m["kid_subset_size"] == 4
        assert record["features_name"] == "checker" and record["real_count"] == 64 and record["seconds"] > 0
    for ref in list_checkpoints(quickstart_run / "checkpoints"):
        copied = json.loads((ref.path / "eval.json").read_text())
        assert (
            copied["step"] == ref.step and "eval.json" in json.loads((ref.path / "manifest.json").read_text())["files"]
        )
    logged = []
    for table in sorted((quickstart_run / "lightning_logs").rglob("metrics.csv")):  # one per start of the run
        with table.open() as handle:
            logged += [row for row in csv.DictReader(handle) if row.get("eval/fd")]
    assert [int(row["step"]) for row in logged] == steps
    assert all(float(row["eval/seconds"]) > 0 for row in logged)


def test_eval_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a pink circle\n")
    for args, expected in (
        ([str(tmp_path / "nowhere"), "--prompts", str(prompts)], "neither a run folder"),
        ([str(tmp_path), "--prompts", str(tmp_path / "none.txt")], "--prompts:"),
        ([str(tmp_path), "--prompts", str(prompts), "--seeds", "a,b"], "--seeds:"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sdtune", "eval", *args, "--out", str(tmp_path / "out")],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
