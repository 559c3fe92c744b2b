"""The command line: LightningCLI over sdtune's modules, plus `--resume auto|never|<checkpoint folder>`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sdtune.callbacks.ema import EMA
from sdtune.callbacks.preemption import Preemption, find_preemption, requeue_slurm_job
from sdtune.callbacks.step_log import StepLog
from sdtune.checkpoint.callback import PeriodicCheckpoint, find_checkpoint_callback
from sdtune.checkpoint.layout import CheckpointRef, find_latest_checkpoint, parse_tag, verify_checkpoint
from sdtune.checkpoint.remote import Remote, fetch_checkpoint
from sdtune.distributed import DistributedSettings, build_strategy, cluster_plugins, num_processes
from sdtune.storage import s3
from sdtune.storage.s3 import S3Settings

log = logging.getLogger("sdtune")


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoint to resume from, and the remote it came from (None: it was on the local disk)."""

    ref: CheckpointRef
    remote_url: str | None = None


def newest_remote_checkpoint(
    remotes: list[Remote], checkpoint_dir: Path, newer_than: int, download: bool = True
) -> ResumePlan | None:
    """The newest complete remote checkpoint past step `newer_than`, downloaded into `checkpoint_dir` and verified.

    With `download=False` (ranks other than 0) only the choice is made; rank 0 downloads, and the checkpoint
    callback makes the ranks agree once the process group is up.
    """
    candidates: list[tuple[tuple[int, int], str, Remote]] = []
    for remote in remotes:
        try:
            tags = remote.complete_tags()
        except Exception as err:  # an unreachable remote must not stop a local resume
            log.warning("resume auto: cannot list %s (%s); skipping it", remote.url, err)
            continue
        candidates += [(key, tag, remote) for tag in tags if (key := parse_tag(tag)) and key[0] > newer_than]
    for (step, epoch), tag, remote in sorted(candidates, key=lambda c: c[0], reverse=True):
        if not download:
            return ResumePlan(CheckpointRef(checkpoint_dir / tag, epoch, step), remote.url)
        try:
            folder = fetch_checkpoint(remote.url, tag, checkpoint_dir)
        except Exception as err:  # a broken remote checkpoint: fall back to the next one
            log.warning("resume auto: %s/%s unusable (%s)", remote.url, tag, err)
            continue
        log.info("resume auto: downloaded %s/%s", remote.url, tag)
        return ResumePlan(CheckpointRef(folder, epoch, step), remote.url)
    return None


def resolve_resume(
    resume: str, checkpoint_dir: Path, remotes: list[Remote] | None = None, download: bool = True
) -> ResumePlan | None:
    """`auto`: the newest complete checkpoint locally or on a remote (or none); `never`; or a folder to verify."""
    if resume == "never":
        return None
    if resume == "auto":
        ref = find_latest_checkpoint(checkpoint_dir)
        plan = newest_remote_checkpoint(remotes or [], checkpoint_dir, ref.step if ref else -1, download)
        plan = plan or (ResumePlan(ref) if ref else None)
        log.info("resume auto: %s", plan.ref.path if plan else "no complete checkpoint locally or remotely")
        return plan
    folder = Path(resume)
    problem = verify_checkpoint(folder) if folder.is_dir() else "not a folder"
    if problem:
        raise ValueError(f"--resume {resume}: {problem}; give a checkpoint folder, 'auto' or 'never'")
    return ResumePlan(CheckpointRef(folder, -1, -1))


class SDTuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--resume",
            type=str,
            default="never",
            help="'auto' resumes from the newest complete checkpoint if there is one, 'never' starts fresh, "
            "or give a checkpoint folder",
        )
        parser.add_dataclass_arguments(S3Settings, "s3")
        parser.add_dataclass_arguments(DistributedSettings, "distributed")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The strategy comes from `sdtune.distributed.build_strategy`; checkpointing brings preemption handling;
        every run gets a `StepLog`."""
        config = self.config_init[self.subcommand]
        trainer_config = config["trainer"]
        callbacks = list(trainer_config.get("callbacks") or [])
        accelerator = str(trainer_config.get("accelerator", "auto"))
        world_size = num_processes(
            accelerator,
            trainer_config.get("devices", "auto"),
            int(trainer_config.get("num_nodes", 1)),
        )
        settings = config["distributed"]
        kwargs["strategy"] = build_strategy(
            trainer_config.get("strategy", "auto"),
            world_size,
            settings if isinstance(settings, DistributedSettings) else DistributedSettings(**vars(settings)),
            accelerator=accelerator,
            optimizer=getattr(self.model, "hparams", {}).get("optimizer", "adamw"),
            uses_ema=any(isinstance(c, EMA) for c in callbacks),
        )
        plugins = trainer_config.get("plugins") or []
        kwargs["plugins"] = (plugins if isinstance(plugins, list) else [plugins]) + cluster_plugins()
        added: list[L.Callback] = []
        if any(isinstance(c, PeriodicCheckpoint) for c in callbacks) and not any(
            isinstance(c, Preemption) for c in callbacks
        ):
            added.append(Preemption())
        if not any(isinstance(c, StepLog) for c in callbacks):
            added.append(StepLog())  # every run keeps its per-step history (steps.jsonl, also in checkpoints)
        kwargs["callbacks"] = [*callbacks, *added]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        s3_settings = self.config_init["fit"]["s3"]
        s3.configure(s3_settings if isinstance(s3_settings, S3Settings) else S3Settings(**vars(s3_settings)))
        callback = find_checkpoint_callback(self.trainer)
        resume = self.config["fit"]["resume"]
        if callback is None:
            if resume != "never":
                raise ValueError("--resume needs a PeriodicCheckpoint callback in trainer.callbacks")
            return
        # Only rank 0 downloads a remote checkpoint; the others wait for it in the callback's setup.
        download = self.trainer.global_rank == 0
        plan = resolve_resume(resume, callback.checkpoint_dir(self.trainer), callback.remotes(), download)
        if plan is not None:
            callback.resume_from = (plan.ref.path.name, plan.remote_url)
            # Read by PeriodicCheckpoint's SafetensorsCheckpointIO: no pickle is loaded.
            self.config_init["fit"]["ckpt_path"] = str(plan.ref.training_state)

    def after_fit(self) -> None:
        preemption = find_preemption(self.trainer)
        if preemption is None or not preemption.preempted:
            return
        if not self.trainer.is_global_zero:
            return
        if not (preemption.requeue and requeue_slurm_job()):
            log.warning(
                "stopped after a preemption signal at step %d; rerun with --resume auto to continue",
                preemption.stopped_at,
            )


def main(args: list[str] | None = None) -> SDTuneCLI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return SDTuneCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
