"""The shipped sbatch template on a real local SLURM cluster (slurm-wlm + munge on 127.0.0.1): 2 tasks of
DDP on CPU, preempted twice with USR1 (to the tasks, then to the batch script as `--signal=B:USR1@<s>`
does), checkpointed, requeued and finished; the final weights equal an uninterrupted job's."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdtune.checkpoint.layout import find_latest_checkpoint
from sdtune.slurm import render
from tests.helpers.assertions import assert_same_run
from tests.helpers.runs import train_config
from tests.helpers.slurm_cluster import LocalSlurm, missing_tools

pytestmark = pytest.mark.slow
MAX_STEPS = 20
EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}
CHECKPOINT = {
    "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
    "init_args": {"every_n_epochs": 1, "every_n_train_steps": 5, "keep_last": 10},
}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM tests need Debian's slurm-wlm and munge (missing: {missing}); make test installs them")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        cluster.stop()
        pytest.skip(f"the SLURM daemons could not start here: {err}")
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, tmp_path: Path, shards: Path, name: str) -> tuple[str, Path, Path]:
    """Render slurm/single_node.sbatch for 2 CPU tasks and submit it; returns (job id, run dir, log file)."""
    run_dir = tmp_path / name
    config = train_config(
        run_dir, shards, callbacks=[EMA, CHECKPOINT], data={"num_workers": 1}, accelerator="cpu", max_steps=MAX_STEPS
    )
    script = render(
        "single_node",
        str(config),
        time="00:20:00",
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        job_name=name,
        run_dir=str(run_dir),
        log_dir=str(tmp_path / "logs"),
        setup=f"export PATH={Path(sys.executable).parent}:$PATH WANDB_MODE=offline PYTHONHASHSEED=0",
        out=str(tmp_path / f"{name}.sbatch"),
    )
    job_id = slurm.sbatch(script)
    return job_id, run_dir, tmp_path / "logs" / f"{name}-{job_id}.out"


def wait_until(condition, timeout: float, what: str, slurm: LocalSlurm, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text()[-4000:] if log.exists() else "(no job log yet)"
            raise TimeoutError(f"{what} not reached in {timeout} s\n{text}\n{slurm.logs()[-3000:]}")
        time.sleep(0.2)


def test_template_job_preempted_requeued_and_resumed_exactly(
    slurm: LocalSlurm, tmp_path: Path, synth_shards: Path
) -> None:
    ref_id, ref_dir, ref_log = submit(slurm, tmp_path, synth_shards, "reference")
    info = slurm.wait_for(ref_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    assert info["JobState"] == "COMPLETED", ref_log.read_text()[-4000:]

    job_id, run_dir, log = submit(slurm, tmp_path, synth_shards, "preempted")
    checkpoints = run_dir / "checkpoints"

    def newest_step() -> int:
        ref = find_latest_checkpoint(checkpoints)
        return ref.step if ref else -1

    # 1: USR1 straight to the tasks (`scancel --signal=USR1`): every rank checkpoints at one step, rank 0 requeues.
    wait_until(lambda: newest_step() >= 5, 300, "first checkpoint", slurm, log)
    assert slurm.run("scancel", "--signal=USR1", job_id).returncode == 0
    wait_until(lambda: slurm.job(job_id).get("Restarts") == "1", 120, "requeue after the first USR1", slurm, log)
    slurm.start_now(job_id)
    first_stop = newest_step()

    # 2: USR1 to the batch script only, as `#SBATCH --signal=B:USR1@<s>` sends it; slurm/launch.sh forwards it.
    wait_until(lambda: newest_step() > first_stop, 300, "a checkpoint after the restart", slurm, log)
    assert slurm.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    wait_until(lambda: slurm.job(job_id).get("Restarts") == "2", 120, "requeue after the second USR1", slurm, log)
    slurm.start_now(job_id)

    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "2", info
    assert "sdtune: USR1: asking every task to checkpoint" in text  # the batch-script path was taken
    stops = re.findall(r"rank (\d): preemption signal on rank\(s\) \[[\d, ]+\]; checkpointing at step (\d+)", text)
    steps = sorted({int(step) for _, step in stops})
    assert len(steps) == 2 and sorted(stops) == sorted((r, str(s)) for s in steps for r in "01"), stops
    assert text.count("requeued SLURM job") == 2
    assert_same_run(ref_dir, run_dir, resumed_from=steps[-1], final_step=MAX_STEPS)
    show = subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True, text=True)
    assert "Restarts=2" in show.stdout
