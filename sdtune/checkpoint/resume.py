"""Resume: the one place that decides which checkpoint a run continues from, fetches it, and makes the ranks agree.

    --resume never        start fresh
    --resume auto         the newest complete checkpoint, in the local checkpoint folder or on a remote
                          (R2/S3, the Hub) that `PeriodicCheckpoint` publishes to; a newer remote one is
                          downloaded (by rank 0) and verified; none: start fresh
    --resume <folder>     that checkpoint folder, verified first

`plan_resume` runs once per process before fit (only rank 0 downloads); `agree_on_resume` runs in the
checkpoint callback's setup, when the process group is up: every rank must have chosen the same checkpoint,
and a node that does not share rank 0's disk fetches its own copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from sdtune.checkpoint.layout import CheckpointRef, find_latest_checkpoint, parse_tag, verify_checkpoint
from sdtune.checkpoint.remote import Remote
from sdtune.distributed import gather_objects, is_distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoint to resume from, and the remote it came from (None: it was on the local disk)."""

    ref: CheckpointRef
    remote: Remote | None = None

    @property
    def tag(self) -> str:
        return self.ref.path.name


def newest_remote_checkpoint(
    remotes: list[Remote], checkpoint_dir: Path, newer_than: int, download: bool = True
) -> ResumePlan | None:
    """The newest complete remote checkpoint past step `newer_than`, downloaded into `checkpoint_dir` and verified.

    With `download=False` (ranks other than 0) only the choice is made; rank 0 downloads, and
    `agree_on_resume` makes the ranks agree once the process group is up.
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
            return ResumePlan(CheckpointRef(checkpoint_dir / tag, epoch, step), remote)
        try:
            folder = remote.fetch(tag, checkpoint_dir)
        except Exception as err:  # a broken remote checkpoint: fall back to the next one
            log.warning("resume auto: %s/%s unusable (%s)", remote.url, tag, err)
            continue
        log.info("resume auto: downloaded %s/%s", remote.url, tag)
        return ResumePlan(CheckpointRef(folder, epoch, step), remote)
    return None


def plan_resume(
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


def agree_on_resume(trainer: L.Trainer, plan: ResumePlan | None, checkpoint_dir: Path) -> None:
    """All ranks resume the same checkpoint, and every node has it on disk (call on every rank)."""
    tags = gather_objects(plan.tag if plan else None)
    if any(tag != tags[0] for tag in tags):
        raise RuntimeError(
            f"ranks chose different checkpoints to resume from ({dict(enumerate(tags))}); a remote checkpoint "
            "may have failed to download on rank 0 (see its log). Run again with --resume auto"
        )
    if plan is None or not is_distributed():
        return
    folder = plan.ref.path  # a remote checkpoint is fetched into checkpoint_dir; --resume <folder> names its own
    trainer.strategy.barrier()  # rank 0's download (on a shared disk) is complete
    if trainer.local_rank == 0 and not folder.is_dir():
        if plan.remote is None:
            raise FileNotFoundError(f"rank {trainer.global_rank}: {folder} is missing on this node")
        log.info("rank %d: this node lacks %s; fetching it from %s", trainer.global_rank, plan.tag, plan.remote.url)
        plan.remote.fetch(plan.tag, folder.parent)
    trainer.strategy.barrier()
