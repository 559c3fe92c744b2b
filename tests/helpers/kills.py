"""Seeded interruptions of a training run: where each kill lands, and when it is due."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdtune.checkpoint.layout import parse_tag


@dataclass(frozen=True)
class Kill:
    """One SIGKILL of a launch: at `startup` (after `seconds`), when the step log reaches step `step`, while
    the checkpoint of step `step` is `writing`, or at the epoch `boundary` (once that checkpoint is complete);
    or a SIGUSR1 (`preempt`) when the step log reaches `step`: the run checkpoints there and stops."""

    when: str
    step: int = 0
    seconds: float = 0.0

    @property
    def signum(self) -> int:
        return signal.SIGUSR1 if self.when == "preempt" else signal.SIGKILL


def kill_plan(seed: int, checkpoint_steps: list[int], steps_per_epoch: int, kinds: list[str]) -> list[Kill]:
    """Seeded kills in the order of `kinds`; each one after the progress the previous ones forced, so the run
    advances between them. `checkpoint_steps`: the steps at which the run writes a checkpoint."""
    rng = random.Random(seed)
    plan, progress = [], 0
    for kind in kinds:
        if kind == "startup":
            plan.append(Kill("startup", seconds=round(rng.uniform(0.5, 5.0), 2)))
            continue
        if kind in ("step", "preempt"):
            step = progress + rng.randint(2, max(2, steps_per_epoch // 4))
            step += step % steps_per_epoch == 0  # mid-epoch
        elif kind == "writing":
            step = min(s for s in checkpoint_steps if s > progress)
        else:
            step = (progress // steps_per_epoch + 1) * steps_per_epoch
        plan.append(Kill(kind, step=step))
        progress = step
    return plan


def kill_condition(kill: Kill, run_dir: Path) -> Callable[[], bool]:
    """True once `kill` is due for the launch started now (files left by earlier launches do not count)."""
    started_ns, started = time.time_ns(), time.monotonic()
    checkpoints = run_dir / "checkpoints"

    def fresh(path: Path) -> bool:
        try:
            return path.stat().st_mtime_ns > started_ns
        except FileNotFoundError:
            return False

    def step_logged() -> bool:
        log = run_dir / "steps.jsonl"
        if not fresh(log):
            return False
        complete = log.read_bytes().split(b"\n")[:-1]  # the last line may be half written
        return bool(complete) and json.loads(complete[-1])["step"] >= kill.step

    def writing() -> bool:
        folders = checkpoints.glob(".tmp-epoch=*")
        return any(fresh(p) and parse_tag(p.name.removeprefix(".tmp-"))[0] >= kill.step for p in folders)

    def boundary_written() -> bool:
        return any(fresh(p) for p in checkpoints.glob(f"epoch=*-step={kill.step:06d}/manifest.json"))

    conditions = {
        "startup": lambda: time.monotonic() - started >= kill.seconds,
        "step": step_logged,
        "preempt": step_logged,
        "writing": writing,
        "boundary": boundary_written,
    }
    return conditions[kill.when]
