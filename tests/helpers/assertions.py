"""What a run left behind, read back and compared: per-step losses, checkpoint weights, one run against another."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sdtune.checkpoint.layout import list_checkpoints, verify_checkpoint


def read_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every train/loss value logged under run_dir (all CSV versions), by step (1-based: after the step)."""
    import csv

    losses: dict[int, list[float]] = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return losses


def final_weights(run_dir: Path, step: int) -> dict:
    (ref,) = [r for r in list_checkpoints(run_dir / "checkpoints") if r.step == step]
    assert verify_checkpoint(ref.path) is None
    return {name: load_file(ref.path / name / "diffusion_pytorch_model.safetensors") for name in ("unet", "unet_ema")}


def assert_same_run(reference_dir: Path, resumed_dir: Path, resumed_from: int, final_step: int) -> None:
    expected, seen = read_losses(reference_dir), read_losses(resumed_dir)
    assert sorted(expected) == list(range(0, final_step)), sorted(expected)
    assert set(range(resumed_from, final_step)) <= set(seen), f"steps logged: {sorted(seen)}"
    # The killed process may lose the log row of its last step (SIGKILL before the logger wrote it).
    assert len(set(expected) - set(seen)) <= 1, f"steps logged: {sorted(seen)}"
    for step, values in seen.items():
        # Steps run before the kill and again after the resume must agree too.
        assert all(v == expected[step][0] for v in values), (step, values, expected[step])
    reference, resumed = final_weights(reference_dir, final_step), final_weights(resumed_dir, final_step)
    for folder in reference:
        for name, tensor in reference[folder].items():
            assert resumed[folder][name].equal(tensor), f"{folder}/{name} differs"
