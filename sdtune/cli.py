"""The command line: LightningCLI over sdtune's modules, plus `--resume auto|never|<checkpoint folder>`."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sdtune.checkpoint.callback import PeriodicCheckpoint
from sdtune.checkpoint.layout import CheckpointRef, find_latest_checkpoint, verify_checkpoint

log = logging.getLogger("sdtune")


def resolve_resume(resume: str, checkpoint_dir: Path) -> CheckpointRef | None:
    """`auto`: the newest complete checkpoint in `checkpoint_dir` (or none); `never`; or a folder to verify."""
    if resume == "never":
        return None
    if resume == "auto":
        ref = find_latest_checkpoint(checkpoint_dir)
        log.info("resume auto: %s", ref.path if ref else f"no complete checkpoint in {checkpoint_dir}, starting fresh")
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

    def before_fit(self) -> None:
        callback = next((c for c in self.trainer.callbacks if isinstance(c, PeriodicCheckpoint)), None)
        resume = self.config["fit"]["resume"]
        if callback is None:
            if resume != "never":
                raise ValueError("--resume needs a PeriodicCheckpoint callback in trainer.callbacks")
            return
        ref = resolve_resume(resume, callback.checkpoint_dir(self.trainer))
        if ref is not None:
            # Read by PeriodicCheckpoint's SafetensorsCheckpointIO: no pickle is loaded.
            self.config_init["fit"]["ckpt_path"] = str(ref.training_state)


def main(args: list[str] | None = None) -> SDTuneCLI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return SDTuneCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
