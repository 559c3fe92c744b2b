"""The command line: LightningCLI over sdtune's modules, plus `--resume auto|never|<checkpoint folder>`."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from sdtune import preflight
from sdtune.callbacks.preemption import Preemption, requeue_slurm_job
from sdtune.callbacks.step_log import StepLog
from sdtune.checkpoint.callback import PeriodicCheckpoint
from sdtune.contracts import UsesStorage, find_callback
from sdtune.distributed import DistributedSettings, ProcessLayout, build_strategy, cluster_plugins
from sdtune.logs import setup_logging
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings

log = logging.getLogger("sdtune")
T = TypeVar("T")


def check_environment(trainer_config: Any) -> None:
    """Before anything heavy: a GPU torch cannot use is an error; wandb online without a key goes offline."""
    import torch

    problem = preflight.cuda_problem(
        str(trainer_config.accelerator),
        torch.cuda.is_available(),
        torch.__version__,
        torch.version.cuda,
        preflight.nvidia_driver(),
    )
    if problem:
        raise OSError(problem)
    loggers = trainer_config.logger if isinstance(trainer_config.logger, list) else [trainer_config.logger]
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not logger._offline and preflight.wandb_key_missing():
            log.warning(
                "wandb: logging offline: no WANDB_API_KEY in the environment (and no ~/.netrc entry), and wandb "
                "cannot ask for one without a terminal. Set WANDB_API_KEY to log online; `wandb sync` uploads "
                "the offline run later"
            )
            logger._offline = True  # Lightning's WandbLogger then starts wandb in offline mode
            logger._wandb_init.pop("mode", None)


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
        trainer_config = self._config().trainer
        check_environment(trainer_config)
        callbacks = list(trainer_config.callbacks or [])
        kwargs["strategy"] = build_strategy(
            ProcessLayout.of(trainer_config),
            self._settings("distributed", DistributedSettings),
            optimizer=getattr(self.model, "hparams", {}).get("optimizer", "adamw"),
        )
        plugins = trainer_config.plugins or []
        kwargs["plugins"] = (plugins if isinstance(plugins, list) else [plugins]) + cluster_plugins()
        added: list[L.Callback] = []
        if any(isinstance(c, PeriodicCheckpoint) for c in callbacks) and not any(
            isinstance(c, Preemption) for c in callbacks
        ):
            added.append(Preemption())
        if not any(isinstance(c, StepLog) for c in callbacks):
            added.append(StepLog())  # every run keeps its per-step history (steps.jsonl, also in checkpoints)
        kwargs["callbacks"] = [*callbacks, *added]
        if not any(isinstance(c, Checkpoint) for c in callbacks):
            # Without a checkpoint callback Lightning adds its own ModelCheckpoint, which pickles the whole
            # module to a .ckpt file every epoch: sdtune's checkpoints are PeriodicCheckpoint's (safetensors).
            kwargs["enable_checkpointing"] = False
        return super().instantiate_trainer(**kwargs)

    def _config(self) -> Any:
        # Without a subcommand (`run=False`, as `sdtune bench` builds it) the config is not nested under one.
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def _settings(self, section: str, cls: type[T]) -> T:
        """A dataclass section of the config (`s3:`, `distributed:`) as its dataclass."""
        value = self._config()[section]
        return value if isinstance(value, cls) else cls(**vars(value))

    def _configure_storage(self) -> None:
        """One `Storage` from the `s3:` section, handed to the DataModule and the callbacks that read or write
        URLs, for every subcommand (fit, validate and test read shards alike)."""
        storage = Storage(self._settings("s3", S3Settings))
        for user in [self.datamodule, *self.trainer.callbacks]:
            if isinstance(user, UsesStorage):
                user.use_storage(storage)

    def before_validate(self) -> None:
        self._configure_storage()

    def before_test(self) -> None:
        self._configure_storage()

    def before_fit(self) -> None:
        self._configure_storage()
        callback = find_callback(self.trainer, PeriodicCheckpoint)
        resume = self.config["fit"]["resume"]
        if callback is None:
            if resume != "never":
                raise ValueError("--resume needs a PeriodicCheckpoint callback in trainer.callbacks")
            return
        training_state = callback.prepare_resume(self.trainer, resume)  # sdtune.checkpoint.resume decides
        if training_state is not None:
            # Read by PeriodicCheckpoint's SafetensorsCheckpointIO: no pickle is loaded.
            self.config_init["fit"]["ckpt_path"] = str(training_state)

    def after_fit(self) -> None:
        preemption = find_callback(self.trainer, Preemption)
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
    setup_logging()
    no_abbreviations = {"allow_abbrev": False}  # `--trainer.max_step 2` must not be taken as max_steps
    return SDTuneCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**no_abbreviations, **{sub: no_abbreviations for sub in ("fit", "validate", "test", "predict")}},
        args=args,
    )
