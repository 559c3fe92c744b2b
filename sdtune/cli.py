"""The command line: LightningCLI over sdtune's modules, plus `--resume auto|never|<checkpoint folder>`."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sdtune.checkpoint.callback import PeriodicCheckpoint
from sdtune.checkpoint.layout import CheckpointRef, find_latest_checkpoint, parse_tag, verify_checkpoint
from sdtune.checkpoint.remote import Remote, fetch_checkpoint
from sdtune.storage import s3
from sdtune.storage.s3 import S3Settings

log = logging.getLogger("sdtune")


def newest_remote_checkpoint(remotes: list[Remote], checkpoint_dir: Path, newer_than: int) -> CheckpointRef | None:
    """Download the newest complete remote checkpoint past step `newer_than` into `checkpoint_dir`, verified."""
    candidates: list[tuple[tuple[int, int], str, Remote]] = []
    for remote in remotes:
        try:
            tags = remote.complete_tags()
        except Exception as err:  # an unreachable remote must not stop a local resume
            log.warning("resume auto: cannot list %s (%s); skipping it", remote.url, err)
            continue
        candidates += [(key, tag, remote) for tag in tags if (key := parse_tag(tag)) and key[0] > newer_than]
    for (step, epoch), tag, remote in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            folder = fetch_checkpoint(remote.url, tag, checkpoint_dir)
        except Exception as err:  # a broken remote checkpoint: fall back to the next one
            log.warning("resume auto: %s/%s unusable (%s)", remote.url, tag, err)
            continue
        log.info("resume auto: downloaded %s/%s", remote.url, tag)
        return CheckpointRef(folder, epoch, step)
    return None


def resolve_resume(resume: str, checkpoint_dir: Path, remotes: list[Remote] | None = None) -> CheckpointRef | None:
    """`auto`: the newest complete checkpoint locally or on a remote (or none); `never`; or a folder to verify."""
    if resume == "never":
        return None
    if resume == "auto":
        ref = find_latest_checkpoint(checkpoint_dir)
        remote_ref = newest_remote_checkpoint(remotes or [], checkpoint_dir, ref.step if ref else -1)
        ref = remote_ref or ref
        log.info("resume auto: %s", ref.path if ref else "no complete checkpoint locally or remotely, starting fresh")
        return ref
    folder = Path(resume)
    problem = verify_checkpoint(folder) if folder.is_dir() else "not a folder"
    if problem:
        raise ValueError(f"--resume {resume}: {problem}; give a checkpoint folder, 'auto' or 'never'")
    return CheckpointRef(folder, -1, -1)


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

    def before_fit(self) -> None:
        s3_settings = self.config_init["fit"]["s3"]
        s3.configure(s3_settings if isinstance(s3_settings, S3Settings) else S3Settings(**vars(s3_settings)))
        callback = next((c for c in self.trainer.callbacks if isinstance(c, PeriodicCheckpoint)), None)
        resume = self.config["fit"]["resume"]
        if callback is None:
            if resume != "never":
                raise ValueError("--resume needs a PeriodicCheckpoint callback in trainer.callbacks")
            return
        ref = resolve_resume(resume, callback.checkpoint_dir(self.trainer), callback.remotes())
        if ref is not None:
            # Read by PeriodicCheckpoint's SafetensorsCheckpointIO: no pickle is loaded.
            self.config_init["fit"]["ckpt_path"] = str(ref.training_state)


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
