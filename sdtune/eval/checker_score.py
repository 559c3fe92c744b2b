"""CheckerScore: did the fine-tune learn what its prompts ask for? The checker's score before and after.

    callbacks:
      - class_path: sdtune.eval.checker_score.CheckerScore
        init_args:
          prompts: [a photo of a large pink circle on a blue background, ...]

Before the first training step (the base model) and at the end of fit (with the EMA weights when an EMA
callback is present), every prompt x seed is rendered with the sample grid's pipeline and judged by the
checker (`sdtune.eval.checker`; by default the one shipped with `tiny-pretrained`). `checker_score.json` in
the run folder keeps both; a resumed run keeps the `before` of its first start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from sdtune.callbacks.sample_grid import render_current
from sdtune.contracts import Sampleable, require
from sdtune.eval.checker import Checker, asked_for, checker_folder
from sdtune.models.components import TINY_PRETRAINED
from sdtune.models.sampling import prompt_major

log = logging.getLogger(__name__)
SCORE_FILE = "checker_score.json"


class CheckerScore(L.Callback):
    def __init__(
        self,
        prompts: list[str],
        seeds: list[int] = [0, 1, 2, 3, 4, 5, 6, 7],  # noqa: B006 (jsonargparse needs a literal default)
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        checker: str = TINY_PRETRAINED,
    ) -> None:
        """
        Args:
            prompts: Prompts that name what the checker knows (a shape and colour, or a digit).
            seeds: Seeds per prompt.
            num_inference_steps: DDIM steps per image.
            guidance_scale: Classifier-free guidance scale.
            checker: "tiny-pretrained" (its shipped checker) or a folder with shape/, color/, digit/ heads.
        """
        if not prompts or not seeds:
            raise ValueError("CheckerScore: give at least one prompt and one seed")
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.checker = Checker.load(checker_folder(checker))
        unjudged = [p for p in self.prompts if not asked_for(p, self.checker.vocabulary)]
        if unjudged:
            raise ValueError(
                f"CheckerScore: the checker knows none of the words of {unjudged[0]!r}; its classes: "
                f"{self.checker.vocabulary}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, Sampleable, "CheckerScore")

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / SCORE_FILE

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        images = render_current(
            trainer, pl_module, self.prompts, self.seeds, self.num_inference_steps, self.guidance_scale
        )
        prompts, _ = prompt_major(self.prompts, self.seeds)
        return {"step": trainer.global_step, **self.checker.score_rendered(images, prompts).summary()}

    def _read(self, trainer: L.Trainer) -> dict[str, Any]:
        path = self._path(trainer)
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            path = self._path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = self._read(trainer)
        if trainer.global_step == 0 or "before" not in record:
            settings = {"prompts": self.prompts, "seeds": self.seeds, "guidance_scale": self.guidance_scale}
            before = self.measure(trainer, pl_module) if trainer.global_step == 0 else None
            record = {**settings, "before": before}
            self._write(trainer, record)
            if before is not None:
                log.info("checker score before training: %s", before)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = self._read(trainer)
        record["after"] = self.measure(trainer, pl_module)
        self._write(trainer, record)
        if trainer.is_global_zero:
            before, after = record.get("before"), record["after"]
            shown = " ".join(f"{k} {v:.2f}" for k, v in after.items() if k not in ("step", "count"))
            was = " ".join(f"{k} {v:.2f}" for k, v in before.items() if k not in ("step", "count")) if before else "-"
            print(
                f"checker score ({int(after['count'])} images: {len(self.prompts)} prompts x {len(self.seeds)} seeds): "
                f"before training {was}; after step {after['step']} {shown}  ({self._path(trainer)})"
            )
