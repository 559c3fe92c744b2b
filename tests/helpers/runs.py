"""Running train.py in a subprocess the way a user does, and reading back what a run left."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def train_config(
    run_dir: Path,
    shards: Path,
    *,
    callbacks: list[dict],
    data: dict | None = None,
    model: dict | None = None,
    **trainer: object,
) -> Path:
    """The quickstart config on the random `tiny` preset (fast; these runs test training mechanics, not images)
    with a CSV logger (losses per step), the given callbacks, trainer overrides, and `data`/`model` init_args
    overrides (`model` may carry a `class_path`)."""
    config = yaml.safe_load(QUICKSTART.read_text())
    # The settings these runs were written against: 16 steps an epoch on the 64-image fixtures.
    config["model"]["init_args"].update(pretrained="tiny", learning_rate=1e-4, noise_offset=0.05)
    config["data"]["init_args"].update(batch_size=4, shuffle_buffer=32)
    config["data"]["init_args"].update(data or {})
    model = dict(model or {})
    config["model"]["class_path"] = model.pop("class_path", config["model"]["class_path"])
    config["model"]["init_args"].update(model)
    config["trainer"].update(
        default_root_dir=str(run_dir),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "csv", "flush_logs_every_n_steps": 1},
        },
        callbacks=callbacks,
        enable_progress_bar=False,
        **trainer,
    )
    config["data"]["init_args"]["shards"] = str(shards)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def with_settings(config: Path, **top_level: object) -> Path:
    """Set top-level config sections (`s3:`, `distributed:`) of a config written by `train_config`."""
    data = yaml.safe_load(config.read_text()) | top_level
    config.write_text(yaml.safe_dump(data))
    return config


def train_command(config: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return [sys.executable, str(REPO / "train.py"), subcommand, "--config", str(config), *extra]


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", **(extra or {})}


def run_train(
    config: Path, *extra: str, timeout: float = 600, env: dict[str, str] | None = None, subcommand: str = "fit"
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(config, *extra, subcommand=subcommand),
        cwd=REPO,
        env=train_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def mount_namespaces_work() -> bool:
    """Whether this machine lets a test mount filesystems in a private mount namespace (root, CAP_SYS_ADMIN)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def run_with_mounts(
    config: Path,
    mounts: dict[Path, str],
    *extra: str,
    copy_out: tuple[Path, Path] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """train.py in a private mount namespace with tmpfs filesystems of the given sizes (`{path: "16m"}`) mounted
    over those paths (a small /dev/shm, a small disk); `copy_out=(src, dst)` copies a folder out of a mount
    before the namespace, and its mounts, end. Returns the finished process (any return code)."""
    steps = [
        f"mkdir -p {shlex.quote(str(path))} && mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(path))}"
        for path, size in mounts.items()
    ]
    script = " && ".join(steps) + ' || exit 99; "$@"; rc=$?; '
    if copy_out:
        src, dst = (shlex.quote(str(p)) for p in copy_out)
        script += f"mkdir -p {dst}; cp -a {src}/. {dst}/; "
    script += "exit $rc"
    command = ["unshare", "-m", "sh", "-c", script, "sh", *train_command(config, *extra)]
    result = subprocess.run(command, cwd=REPO, env=env or train_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode != 99, f"mounting failed: {result.stderr}"
    return result


def kill_when(
    config: Path,
    condition,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    signum: int = signal.SIGKILL,
) -> str:
    """Start training, SIGKILL it (and every rank it launched) as soon as `condition()` holds (polled every
    2 ms); returns its stderr. With `signum=SIGUSR1` (a preemption) the run checkpoints and exits by itself."""
    stderr = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block a chatty run
    process = subprocess.Popen(
        train_command(config, "--resume", "auto"),
        env=train_env(env),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,  # its own process group: the kill reaches DDP's other ranks too
    )
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert process.poll() is None, f"training ended before the kill: {_read_back(stderr)[-3000:]}"
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.002)
        os.killpg(process.pid, signum)
        returncode = process.wait(timeout=60)
        assert signum == signal.SIGKILL or returncode == 0, f"rc {returncode}: {_read_back(stderr)[-3000:]}"
        return _read_back(stderr)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _read_back(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def quickstart_callbacks(**checkpoint: object) -> list[dict]:
    """The quickstart config's callbacks (EMA, sample grid, data stats, checkpoints; not its checker score, which
    judges images and needs tiny-pretrained), with `checkpoint` init_args overrides for its PeriodicCheckpoint."""
    callbacks = yaml.safe_load(QUICKSTART.read_text())["trainer"]["callbacks"]
    callbacks = [c for c in callbacks if not c["class_path"].endswith("CheckerScore")]
    for callback in callbacks:
        if callback["class_path"].endswith("PeriodicCheckpoint"):
            callback["init_args"].update(checkpoint)
    return callbacks
