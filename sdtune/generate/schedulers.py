"""The samplers generation offers, built from the model's own scheduler config (its betas, prediction type,
zero-terminal-SNR rescaling and timestep spacing carry over)."""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin

SCHEDULERS = ("ddim", "dpm++", "euler")


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise ValueError(f"--scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
