"""Shared fixtures: tiny synthetic shards, and helpers that run train.py in a subprocess."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import yaml
from safetensors.torch import load_file

from data_tools.make_shards import make_shards
from data_tools.synth import synth
from sdtune.checkpoint.layout import list_checkpoints, parse_tag, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# A test that uses one of these fixtures needs that real component, and gets its marker (see pyproject.toml).
COMPONENT_FIXTURES = {"s3_server": "s3", "slurm": "slurm"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in COMPONENT_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic 64x64 captioned images in 4 shards of 16, with a manifest."""
    root = tmp_path_factory.mktemp("synth")
    synth(root / "images", num_images=64, size=64, seed=0)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=16)
    return root / "shards"


@pytest.fixture(scope="session")
def digit_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """15 of sklearn's digits per class at 32 px: labelled image shards and tiny-VAE latent shards (4x16x16)."""
    from data_tools.digits import digits
    from data_tools.encode_latents import encode_latents

    root = tmp_path_factory.mktemp("digits")
    digits(root / "images", size=32, max_per_class=15)
    make_shards(root / "images", root / "shards", resolution=32, samples_per_shard=50, class_folders=True)
    encode_latents(str(root / "shards"), str(root / "latents"), batch_size=32)
    return root / "shards", root / "latents"


def train_config(
    run_dir: Path,
    shards: Path,
    *,
    callbacks: list[dict],
    data: dict | None = None,
    model: dict | None = None,
    **trainer: object,
) -> Path:
    """The quickstart config with a CSV logger (losses per step), the given callbacks, trainer overrides, and
    `data`/`model` init_args overrides (`model` may carry a `class_path`)."""
    config = yaml.safe_load(QUICKSTART.read_text())
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sdtune-test-key", "AWS_SECRET_ACCESS_KEY": "sdtune-test-secret"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for name, value in S3_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the local S3 server (named after the test)."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_endpoint(s3_server: str) -> Iterator[str]:
    """Points sdtune's S3 settings at the local server for in-process tests."""
    from sdtune.storage import s3

    before = s3.settings()
    s3.configure(endpoint_url=s3_server)
    yield s3_server
    s3.configure(before)


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


def quickstart_callbacks(**checkpoint: object) -> list[dict]:
    """The quickstart config's callbacks (EMA, sample grid, data stats, checkpoints), with `checkpoint` init_args
    overrides for its PeriodicCheckpoint."""
    callbacks = yaml.safe_load(QUICKSTART.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("PeriodicCheckpoint"):
            callback["init_args"].update(checkpoint)
    return callbacks


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
