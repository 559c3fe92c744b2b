"""Finding the newest complete checkpoint: half-written, corrupt and temp folders are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtune.checkpoint.layout import MANIFEST, find_latest_checkpoint, verify_checkpoint, write_manifest
from sdtune.checkpoint.resume import plan_resume


def make_checkpoint(root: Path, epoch: int, step: int, complete: bool = True) -> Path:
    folder = root / f"epoch={epoch:04d}-step={step:06d}"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "training_state.safetensors").write_bytes(b"s" * 50)
    if complete:
        write_manifest(folder, {"epoch": epoch, "step": step})
    return folder


def test_newest_complete_wins(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 0, 10)
    newest = make_checkpoint(tmp_path, 1, 20)
    assert find_latest_checkpoint(tmp_path).path == newest
    manifest = json.loads((newest / MANIFEST).read_text())
    assert manifest["files"]["training_state.safetensors"]["bytes"] == 50 and len(manifest["files"]) == 2


def test_broken_checkpoints_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = make_checkpoint(tmp_path, 0, 10)
    make_checkpoint(tmp_path, 1, 20, complete=False)  # killed before the manifest
    corrupt = make_checkpoint(tmp_path, 1, 30)
    (corrupt / "training_state.safetensors").write_bytes(b"x" * 50)  # same size, other bytes
    truncated = make_checkpoint(tmp_path, 1, 40)
    (truncated / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    (tmp_path / ".tmp-epoch=0001-step=000050").mkdir()  # a write in progress
    assert find_latest_checkpoint(tmp_path).path == good
    assert "no manifest.json" in caplog.text and "does not match its sha256" in caplog.text
    assert "has 1 bytes" in caplog.text
    assert verify_checkpoint(corrupt) == "training_state.safetensors does not match its sha256"


def test_resume_option(tmp_path: Path) -> None:
    assert plan_resume("never", tmp_path) is None
    assert plan_resume("auto", tmp_path) is None  # nothing there yet: start fresh
    folder = make_checkpoint(tmp_path, 0, 10)
    assert plan_resume("auto", tmp_path).ref.path == folder
    assert plan_resume(str(folder), tmp_path).ref.training_state == folder / "training_state.safetensors"
    broken = make_checkpoint(tmp_path, 0, 11, complete=False)
    with pytest.raises(ValueError, match="--resume .*no manifest.json"):
        plan_resume(str(broken), tmp_path)


def test_model_card_shows_the_scores_of_the_checkpoints_eval_json(tmp_path: Path) -> None:
    from sdtune.checkpoint.card import model_card, read_scores

    assert read_scores(tmp_path) is None
    (tmp_path / "eval.json").write_text(
        json.dumps(
            {"step": 8, "metrics": {"checker_all": 0.5, "checker_all_low": 0.25, "checker_all_high": 0.75, "fd": 1.25}}
        )
    )
    scores = read_scores(tmp_path)
    assert scores == {"checker_all": 0.5, "checker_all_low": 0.25, "checker_all_high": 0.75, "fd": 1.25}
    meta = {"base_model": "tiny-pretrained", "epoch": 0, "step": 8, "train_mode": "full", "ema": True}
    card = model_card("user/repo", "epoch=0000-step=000008", meta, {}, "32-true", 1, scores=scores)
    assert "## Scores" in card and "| fd | 1.25 |  |" in card and "| checker_all | 0.5 | 0.25 to 0.75 |" in card
    assert "checker_all_low" not in card
    assert "## Scores" not in model_card("user/repo", "epoch=0000-step=000008", meta, {}, "32-true", 1)
