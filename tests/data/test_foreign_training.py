"""Training on shards written elsewhere, through train.py: without a manifest the valid samples are counted once
at start (and kept in the run folder); with one from `data index` nothing is counted; either way every valid sample
is trained on once per epoch, each skip and conversion is counted once per epoch, and a run SIGKILLed mid-epoch
and resumed trains on the same samples in the same order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from data_tools.index import index
from sdtune.callbacks.step_log import STEP_LOG, read_step_log
from tests.helpers.corpus import write_foreign_corpus
from tests.helpers.kills import Kill, kill_condition
from tests.helpers.runs import kill_when, run_train, train_config

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6  # 24 valid samples / (2 workers x batch 4): no remainder
CALLBACKS = [
    {"class_path": "sdtune.callbacks.data_stats.DataStats"},
    {
        "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
        "init_args": {"every_n_epochs": 1, "every_n_train_steps": 2, "keep_last": 20},
    },
]


def epoch_summaries(stderr: str) -> list[dict[str, dict]]:
    """The DataStats line of each epoch: {"skipped": {...}, "converted": {...}, "events": {...}}."""
    summaries = []
    for line in re.findall(r"epoch \d+ on rank 0: (.*)", stderr):
        parts = dict(part.split(" ", 1) for part in line.split("; "))
        summaries.append({k: ast.literal_eval(v) for k, v in parts.items()})
    return summaries


def test_foreign_shards_train_exactly_and_resume(tmp_path: Path) -> None:
    corpus = write_foreign_corpus(tmp_path / "shards", tmp_path / "unpickled.txt")

    def config(run_dir: Path) -> Path:
        return train_config(run_dir, corpus.folder, callbacks=CALLBACKS, data={"num_workers": 2}, max_epochs=2)

    reference = tmp_path / "reference"
    result = run_train(config(reference))
    assert (
        "no manifest.json" in result.stderr and "counting valid samples with the loader's checks once" in result.stderr
    )
    assert len(list((reference / "data_index").glob("*.jsonl"))) == 1, "the count is kept in the run folder"
    assert "24 valid samples fill 2 reader(s) x 3 batch(es) exactly" in result.stderr
    rows = read_step_log(reference / STEP_LOG)
    assert len(rows) == 2 * STEPS_PER_EPOCH
    for epoch in range(2):
        keys = [k for row in rows[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH] for k in row["keys"]]
        assert sorted(keys) == sorted(corpus.valid), f"epoch {epoch}: not every valid sample once"
    summaries = epoch_summaries(result.stderr)
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["skipped"] == corpus.skipped
        assert summary["converted"] == corpus.converted
        assert summary["events"] == {}
    assert not corpus.marker.exists(), "a pickle member was unpickled"

    manifest = index(str(corpus.folder), resolution=64, num_workers=2)
    assert manifest.num_samples == 24 and manifest.skipped == corpus.skipped
    killed = tmp_path / "killed"
    kill_when(config(killed), kill_condition(Kill("step", step=STEPS_PER_EPOCH + 3), killed))
    resumed = run_train(config(killed), "--resume", "auto")
    assert "counting valid samples" not in resumed.stderr, "the manifest from `data index` is used"
    assert [row["keys"] for row in read_step_log(killed / STEP_LOG)] == [row["keys"] for row in rows]
    assert (killed / STEP_LOG).read_text() == (reference / STEP_LOG).read_text()
    assert epoch_summaries(resumed.stderr)[-1]["skipped"] == corpus.skipped
