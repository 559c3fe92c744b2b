"""Write a complete checkpoint folder every N epochs (and optionally every N steps), atomically."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from sdtune.checkpoint.card import model_card, read_scores
from sdtune.checkpoint.hub_root import RootRule
from sdtune.checkpoint.layout import (
    TRAINING_STATE,
    checkpoint_tag,
    due,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from sdtune.checkpoint.loop_state import canonicalize_loop_state
from sdtune.checkpoint.publish import PUBLISH_LOG, Publisher, record_event
from sdtune.checkpoint.remote import HubRemote, Remote, StorageRemote
from sdtune.checkpoint.resume import ResumePlan, agree_on_resume, plan_resume
from sdtune.checkpoint.state_file import SafetensorsCheckpointIO
from sdtune.checkpoint.writer import BackgroundWriter, PendingCheckpoint, free_gradients
from sdtune.contracts import Exportable, PipelineExportable, require
from sdtune.fileio import fsync_dir
from sdtune.preflight import DiskNeed, disk_problem
from sdtune.storage import Storage
from sdtune.tensorfile import TensorFile

log = logging.getLogger(__name__)


def config_hash(trainer: L.Trainer) -> str:
    """sha256 of the model and data hyperparameters (what must match for a meaningful resume)."""
    hparams = {"model": dict(trainer.lightning_module.hparams)}
    if trainer.datamodule is not None:
        hparams["data"] = dict(trainer.datamodule.hparams)
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()


@runtime_checkable
class CheckpointPart(Protocol):
    """A callback that adds files to every checkpoint folder and reads them back when a run resumes."""

    def write_to_checkpoint(self, trainer: L.Trainer, checkpoint: PendingCheckpoint) -> None:
        """Every rank (a part may gather shards with a collective); rank 0 adds this part's files to `checkpoint`:
        large ones with `checkpoint.add` (snapshotted now, written in the background), small ones straight
        into `checkpoint.folder` (the temp folder, before the manifest)."""

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        """Every rank, at fit start: the checkpoint folder being resumed, or None for a fresh run."""


@runtime_checkable
class SaveRequest(Protocol):
    """A callback that can ask for a checkpoint after the current step (preemption does)."""

    def wants_save(self, trainer: L.Trainer) -> bool:
        """True when a checkpoint must be written after this step (asked in `on_train_batch_end`)."""


@runtime_checkable
class ExportsWeights(Protocol):
    """A part whose exported weights can stand in for the trained ones' (EMA: `export_ema_only`)."""

    exports_weights: bool


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_parts(trainer: L.Trainer) -> list[CheckpointPart]:
    return [cb for cb in trainer.callbacks if isinstance(cb, CheckpointPart)]


def save_requested(trainer: L.Trainer) -> bool:
    return any(cb.wants_save(trainer) for cb in trainer.callbacks if isinstance(cb, SaveRequest))


class PeriodicCheckpoint(Checkpoint):
    """Checkpoints in the layout of `sdtune.checkpoint.layout`; keeps the newest `keep_last` complete ones."""

    def __init__(
        self,
        every_n_epochs: int = 1,
        every_n_train_steps: int = 0,
        keep_last: int = 3,
        dirpath: str | None = None,
        remote: str | None = None,
        hub_repo: str | None = None,
        hub_revision: str = "main",
        hub_private: bool = True,
        hub_weights_only: bool = False,
        hub_root: str = "newest",
        remote_keep_last: int = 3,
        fail_on_publish_error: bool = True,
        export_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
        export_ema_only: bool = False,
        background_write: bool = True,
    ) -> None:
        """
        Args:
            every_n_epochs: Save at the end of every N epochs (0: never).
            every_n_train_steps: Also save every N optimizer steps (0: never).
            keep_last: Complete checkpoints kept (at least 2, so a crash mid-write always leaves one).
            dirpath: Checkpoint folder (default: <trainer.default_root_dir>/checkpoints).
            remote: Also publish every checkpoint here, e.g. `s3://bucket/runs/my-run/checkpoints` (R2 or S3);
                `--resume auto` looks here too.
            hub_repo: Also publish every checkpoint to this Hub model repo (`user/name`), one commit each.
            hub_revision: Branch of `hub_repo` to commit to (created if missing).
            hub_private: Create `hub_repo` as a private repo if it does not exist.
            hub_weights_only: Push only weights, samples and manifest to the Hub (no training state; the Hub
                copy then cannot be resumed from, `remote` can).
            hub_root: What the root of `hub_repo` holds, as a complete diffusers pipeline
                (`StableDiffusionPipeline.from_pretrained("user/repo")`): "newest" (the newest checkpoint),
                "best:<metric>" (the best by an Evaluate callback metric, e.g. best:fd or best:checker_all) or
                "none" (only the history under checkpoints/).
            remote_keep_last: Complete checkpoints kept on each remote (the Hub keeps older ones in history).
            fail_on_publish_error: End fit with an error if any publish failed after its retries.
            export_dtype: dtype of the exported weights (`unet/`, `unet_ema/`, LoRA); "auto" is the training
                precision's half type (bf16-mixed: bfloat16, 16-mixed: float16, else float32). The training
                state always keeps the fp32 master weights, so resuming is exact either way.
            export_ema_only: Export only the EMA weights (`unet_ema/`), not the trained ones (needs the EMA
                callback): the checkpoint is smaller by one copy of the weights.
            background_write: Serialise, hash and fsync each checkpoint on a background thread (one in flight);
                training waits only for the copy of the state to host memory.
        """
        if keep_last < 2 or remote_keep_last < 1:
            raise ValueError(
                f"PeriodicCheckpoint: keep_last must be >= 2 and remote_keep_last >= 1, got {keep_last}, "
                f"{remote_keep_last}"
            )
        if every_n_epochs < 0 or every_n_train_steps < 0:
            raise ValueError("PeriodicCheckpoint: every_n_epochs and every_n_train_steps must be >= 0")
        if export_dtype != "auto" and export_dtype not in _DTYPES:
            raise ValueError(f"PeriodicCheckpoint.export_dtype: {export_dtype!r} is not auto, {', '.join(_DTYPES)}")
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.keep_last = keep_last
        self.dirpath = dirpath
        self.remote = remote
        self.hub_repo, self.hub_revision, self.hub_private = hub_repo, hub_revision, hub_private
        self.hub_weights_only = hub_weights_only
        self.hub_root = RootRule.parse(hub_root)
        self.remote_keep_last = remote_keep_last
        self.storage = Storage()  # the run's own (the config's `s3:` section) comes through use_storage()
        self.fail_on_publish_error = fail_on_publish_error
        self.export_dtype = export_dtype
        self.export_ema_only = export_ema_only
        self.background_write = background_write
        self.writer = BackgroundWriter()
        self.last_saved: Path | None = None
        self.publisher: Publisher | None = None
        self.resume_plan: ResumePlan | None = None  # set by prepare_resume before fit

    def use_storage(self, storage: Storage) -> None:
        """Publish to and resume from remotes through `storage` (built by the CLI from the config's settings)."""
        self.storage = storage

    def remotes(self, pl_module: L.LightningModule | None = None) -> list[Remote]:
        """Where checkpoints are published, in the order `--resume auto` looks after the local folder; with the
        module, the Hub remote can build its root pipeline (`hub_root`)."""
        found: list[Remote] = []
        if self.remote:
            found.append(StorageRemote(self.remote, self.remote_keep_last, self.storage))
        if self.hub_repo:
            found.append(
                HubRemote(
                    self.hub_repo,
                    self.hub_revision,
                    self.remote_keep_last,
                    self.storage,
                    self.hub_private,
                    self.hub_weights_only,
                    self.hub_root,
                    pl_module.save_base_pipeline if isinstance(pl_module, PipelineExportable) else None,
                )
            )
        return found

    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Training state as safetensors + JSON (no pickle), for saving and for resuming.
        trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()
        if stage == "fit":
            require(pl_module, Exportable, "PeriodicCheckpoint")
            if self.export_ema_only and not any(isinstance(cb, ExportsWeights) for cb in trainer.callbacks):
                raise ValueError(
                    "PeriodicCheckpoint.export_ema_only: no callback exports EMA weights; add sdtune.callbacks.EMA "
                    "to trainer.callbacks or set export_ema_only: false"
                )
            agree_on_resume(trainer, self.resume_plan, self.checkpoint_dir(trainer))

    def prepare_resume(self, trainer: L.Trainer, resume: str) -> Path | None:
        """Choose (and on rank 0 fetch) the checkpoint `--resume` names; the training state to load, or None."""
        download = trainer.global_rank == 0  # other ranks wait for it in setup (agree_on_resume)
        self.resume_plan = plan_resume(resume, self.checkpoint_dir(trainer), self.remotes(), download)
        return self.resume_plan.ref.training_state if self.resume_plan else None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        canonicalize_loop_state(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        canonicalize_loop_state(checkpoint)  # runs before Lightning restores its loops from `checkpoint`

    def checkpoint_bytes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Estimated size of one checkpoint: exported weights, fp32 trainable weights, EMA and optimizer state."""
        exported = sum(
            content.nbytes() if isinstance(content, TensorFile) else len(content)
            for content in pl_module.export_files(dtype=self.weights_dtype(trainer)).values()
        )
        ema = any(isinstance(cb, ExportsWeights) for cb in trainer.callbacks)
        trainable = sum(p.numel() for p in pl_module.trainable_parameters().values())
        optimizer_bytes = sum(2 if "8bit" in type(o).__name__ else 8 for o in trainer.optimizers) or 8
        state = trainable * (4 + (4 if ema else 0) + optimizer_bytes)
        return state + exported * ((0 if self.export_ema_only else 1) + (1 if ema else 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = self.checkpoint_dir(trainer)
        existing = sum(verify_checkpoint(ref.path, check_hashes=False) is None for ref in list_checkpoints(root))
        need = DiskNeed(self.checkpoint_bytes(trainer, pl_module), self.keep_last, existing)
        problem = disk_problem(need, root)
        if problem:
            raise OSError(problem)
        if trainer.is_global_zero and root.is_dir():
            for leftover in root.glob(".tmp-*"):  # writes cut short by a crash
                log.warning("removing incomplete checkpoint write %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        resumed = self.resume_plan.ref.path if self.resume_plan else None
        for part in checkpoint_parts(trainer):
            part.read_from_checkpoint(trainer, resumed)
        remotes = self.remotes(pl_module)
        if trainer.is_global_zero and remotes:
            root.mkdir(parents=True, exist_ok=True)
            self.publisher = Publisher(remotes, root)
            self.publisher.start()

    def weights_dtype(self, trainer: L.Trainer) -> torch.dtype:
        """The dtype exported weights are written in (`export_dtype`)."""
        if self.export_dtype != "auto":
            return _DTYPES[self.export_dtype]
        precision = str(trainer.precision)
        if precision.startswith("bf16"):
            return torch.bfloat16
        return torch.float16 if precision.startswith("16") else torch.float32

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        waited = self.writer.wait()  # the last checkpoint is complete on disk before fit returns
        if waited > 0.05:
            log.info("waited %.1f s at the end of fit for the last checkpoint write", waited)
        if self.publisher is None:
            return
        waited = self.publisher.close()
        log.info("waited %.1f s at the end of fit for the last checkpoint upload", waited)
        failures, self.publisher = self.publisher.failures, None
        if failures and self.fail_on_publish_error:
            raise RuntimeError(
                f"{failures} checkpoint publish(es) failed (see {PUBLISH_LOG} and the log); the local checkpoints "
                "are complete. Fix the remote and rerun with --resume auto, or set fail_on_publish_error: false"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            self.writer.wait()  # fit ended with an error: a checkpoint in flight is still finished
        except OSError as err:
            log.error("%s", err)
        if self.publisher is not None:  # fit ended with an error: still finish uploading what was saved
            self.publisher.close()
            self.publisher = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        # Callbacks that ask for a save (preemption) run before this one: Lightning orders checkpoints last.
        if save_requested(trainer) or due(trainer, batch_idx, self.every_n_epochs, self.every_n_train_steps):
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Take a checkpoint: every rank snapshots its part on this thread; rank 0 finishes it (`_finish`) in
        the background when `background_write`, else before returning."""
        start = time.monotonic()
        tag = checkpoint_tag(trainer)
        root = self.checkpoint_dir(trainer)
        final = root / tag
        tmp = root / f".tmp-{tag}"
        waited = self.writer.wait()  # one checkpoint in flight (and a failed write is raised here)
        free_gradients(trainer, pl_module)
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier()
        pending = PendingCheckpoint(tmp, self.weights_dtype(trainer))
        io = trainer.strategy.checkpoint_io
        assert isinstance(io, SafetensorsCheckpointIO)
        io.deferred = pending if trainer.is_global_zero else None
        try:  # full state; every rank takes part; the strategy picks writers
            trainer.save_checkpoint(tmp / TRAINING_STATE, weights_only=False)
        finally:
            io.deferred = None
        if not self.export_ema_only:
            model = pl_module.model_for_export()  # every rank: FSDP gathers the shards to rank 0 here
            if trainer.is_global_zero:
                pending.add_files(pl_module.export_files(model=model, dtype=pending.weights_dtype))
        for part in checkpoint_parts(trainer):  # EMA weights, the sample grid, the step history, ...
            part.write_to_checkpoint(trainer, pending)  # every rank (EMA gathers its shards); rank 0 adds files
        if trainer.is_global_zero:
            meta = self._meta(trainer, pl_module, pending.names())
            card = self._card_maker(trainer, pl_module, read_scores(pending.folder))
            snapshot_bytes = pending.snapshot.bytes_copied
            blocked = time.monotonic() - start

            def finish() -> None:
                self._finish(pending, meta, card, final, blocked, waited, snapshot_bytes)

            if self.background_write:
                self.writer.submit(tag, finish)
            else:
                finish()
            pl_module.log("checkpoint/blocked_s", time.monotonic() - start, rank_zero_only=True)
        trainer.strategy.barrier()
        self.last_saved = final
        return final

    def _finish(
        self,
        pending: PendingCheckpoint,
        meta: dict[str, object],
        card: Callable[[dict[str, Any]], str],
        final: Path,
        blocked: float,
        waited: float,
        snapshot_bytes: int,
    ) -> None:
        """Write the snapshotted files (hashed on the way), the manifest, rename into place, prune, publish."""
        start = time.monotonic()
        tmp, root = pending.folder, final.parent
        try:
            digests = pending.write()
            write_manifest(tmp, meta, digests)
            shutil.rmtree(final, ignore_errors=True)  # a broken folder of the same step (from a crash)
            tmp.rename(final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves the older checkpoints as they were
            raise
        self._prune(root)
        written = time.monotonic() - start
        if not self.background_write:
            blocked += written  # written on the training thread
        manifest = read_manifest(final)
        size = sum(entry["bytes"] for entry in manifest["files"].values())
        log.info("checkpoint: %s (%.2f GB; blocked %.2f s, written in %.1f s)", final, size / 1e9, blocked, written)
        record_event(
            root,
            {
                "event": "checkpoint",
                "tag": final.name,
                "blocked_s": round(blocked, 4),
                "waited_for_previous_s": round(waited, 4),
                "snapshot_bytes": snapshot_bytes,
                "write_s": round(written, 4),
                "bytes": size,
            },
        )
        if self.publisher is not None:
            self.publisher.submit(final, card(manifest))

    @staticmethod
    def _meta(trainer: L.Trainer, pl_module: L.LightningModule, names: set[str]) -> dict[str, object]:
        hp = pl_module.hparams
        return {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "base_model": hp.get("pretrained"),
            "revision": hp.get("revision"),
            "train_mode": hp.get("train_mode"),
            "config_hash": config_hash(trainer),
            "ema": bool(names & {"unet_ema", "lora_ema", "classifier_ema"}),
        }

    def _card_maker(
        self, trainer: L.Trainer, pl_module: L.LightningModule, scores: dict[str, float] | None
    ) -> Callable[[dict[str, Any]], str]:
        """The model card of this checkpoint, given its manifest (read in the background, once written)."""
        hparams = dict(pl_module.hparams) | (dict(trainer.datamodule.hparams) if trainer.datamodule else {})
        repo, tag = self.hub_repo or "checkpoints", checkpoint_tag(trainer)
        return functools.partial(
            model_card, repo, tag, hparams=hparams, precision=str(trainer.precision), world_size=trainer.world_size,
            scores=scores,
        )  # fmt: skip

    def _prune(self, root: Path) -> None:
        """Delete all but the newest `keep_last` complete checkpoints (size check only: cheap)."""
        complete = [ref for ref in list_checkpoints(root) if verify_checkpoint(ref.path, check_hashes=False) is None]
        for ref in complete[self.keep_last :]:
            # Renamed first: a kill during the deletion leaves a temp folder (removed at the next start), never
            # a half-deleted checkpoint that looks like one.
            trash = root / f".tmp-pruned-{ref.path.name}"
            shutil.rmtree(trash, ignore_errors=True)
            ref.path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
