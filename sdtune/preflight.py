"""Checks made before a run spends money: the hazards of a first run on a rented GPU, found up front.

Each check returns what is wrong in one line naming the option to change (or None), so the caller decides
whether it is an error or a warning: CUDA missing on a GPU machine, a `/dev/shm` too small for the data
loader's batches in flight, wandb online without a key, and too little disk for `keep_last` checkpoints.
"""

from __future__ import annotations

import netrc
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
MB = 1e6


def nvidia_driver() -> tuple[str, str] | None:
    """(driver version, newest CUDA version the driver runs) when an NVIDIA GPU and driver are present."""
    if shutil.which("nvidia-smi") is None and not Path("/proc/driver/nvidia/version").is_file():
        return None
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        header = ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    if driver is None and Path("/proc/driver/nvidia/version").is_file():
        driver = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
    return (driver[1] if driver else "unknown", cuda[1] if cuda else "unknown")


def cuda_problem(
    accelerator: str, cuda_available: bool, torch_version: str, torch_cuda: str | None, driver: tuple[str, str] | None
) -> str | None:
    """Why training would not use the GPU it was meant to (None when it will, or none was meant)."""
    if cuda_available or accelerator not in ("auto", "gpu", "cuda"):
        return None
    if driver is None:
        if accelerator == "auto":
            return None  # no GPU here: a CPU run is what "auto" means
        return (
            f"trainer.accelerator: {accelerator} but this machine shows no NVIDIA driver (no nvidia-smi); "
            "check that the instance has a GPU (docker run --gpus all), or set trainer.accelerator: cpu"
        )
    driver_version, driver_cuda = driver
    if torch_cuda is None:
        return (
            f"an NVIDIA GPU is here (driver {driver_version}, CUDA <= {driver_cuda}) but torch {torch_version} is a "
            f"CPU-only build: install the CUDA build (pip install torch --index-url "
            f"https://download.pytorch.org/whl/cu{driver_cuda.replace('.', '')[:3]}), or use the image's torch "
            "(python -m venv --system-site-packages, pip install -c constraints.txt -e .)"
        )
    return (
        f"an NVIDIA GPU is here but torch {torch_version} (built for CUDA {torch_cuda}) cannot use it: the driver "
        f"{driver_version} runs CUDA <= {driver_cuda}. Install a torch built for CUDA {driver_cuda} or older, or "
        "rent a host with a newer driver"
    )


def shm_prefetch(free_bytes: int, num_workers: int, batch_bytes: int, prefetch: int) -> tuple[int, str | None]:
    """The DataLoader prefetch factor `/dev/shm` can hold, and why it was lowered (or why nothing fits).

    Batches in flight live in shared memory: `num_workers * prefetch` of them. Returns (prefetch, None) when
    they fit, (lower, warning) when fewer do, and (0, error) when not even one batch per worker does.
    """
    if num_workers == 0 or free_bytes >= num_workers * prefetch * batch_bytes:
        return prefetch, None
    fits = free_bytes // (num_workers * batch_bytes)
    need = f"{num_workers} workers x {prefetch} batches of {batch_bytes / MB:.1f} MB"
    if fits >= 1:
        return int(fits), (
            f"/dev/shm has {free_bytes / MB:.0f} MB free, less than {need} need: prefetch lowered to {fits} "
            "batch(es) per worker (start the container with a larger --shm-size, e.g. 8g, to keep 4)"
        )
    return 0, (
        f"/dev/shm has {free_bytes / MB:.1f} MB free, not enough for one batch per worker ({need}): start the "
        "container with --shm-size=8g (Docker's default is 64 MB), or lower data.num_workers or data.batch_size"
    )


def wandb_key_missing(env: dict[str, str] | None = None) -> bool:
    """True when wandb would log online but has no API key (it raises without a terminal to ask on)."""
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or env.get("WANDB_API_KEY"):
        return False
    host = re.sub(r"^https?://", "", env.get("WANDB_BASE_URL", "api.wandb.ai")).rstrip("/")
    path = Path(env.get("NETRC", Path(env.get("HOME", "~")).expanduser() / ".netrc"))
    if not path.is_file():
        return True
    try:
        return netrc.netrc(path).authenticators(host) is None
    except (netrc.NetrcParseError, OSError):
        return True


@dataclass(frozen=True)
class DiskNeed:
    checkpoint_bytes: int  # one checkpoint
    keep_last: int
    existing: int  # complete checkpoints already in the folder

    @property
    def bytes_needed(self) -> int:
        """Room for the checkpoints still to come before pruning starts, plus the one being written."""
        return max(1, self.keep_last + 1 - self.existing) * self.checkpoint_bytes


def disk_problem(need: DiskNeed, folder: Path) -> str | None:
    """Why `folder`'s disk cannot hold `keep_last` checkpoints (None when it can)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= need.bytes_needed:
        return None
    return (
        f"checkpoint: keep_last {need.keep_last} checkpoints of {need.checkpoint_bytes / GB:.2f} GB each (plus the "
        f"one being written) need {need.bytes_needed / GB:.2f} GB in {folder}, {free / GB:.2f} GB is free: "
        "lower keep_last (>= 2), set export_ema_only: true or export_dtype: bfloat16, or free disk space"
    )
