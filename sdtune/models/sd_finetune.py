"""SDFineTune: fine-tune a Stable Diffusion UNet (full or LoRA) on captioned images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler

from sdtune import rng
from sdtune.distributed import flag_tensor_of_all_ranks
from sdtune.fsdp import FSDP2Strategy
from sdtune.models.components import encode_prompts, load_components
from sdtune.models.diffusion_loss import diffusion_loss, min_snr_weights, prediction_target, sample_noise
from sdtune.models.lora import LORA_WEIGHTS, add_lora, lora_state_dict
from sdtune.tensorfile import FileContent, TensorFile, replace_values, write_files

log = logging.getLogger(__name__)


_VAL_SEED = 20_231_117  # validation noise does not depend on model.seed: runs with other seeds compare too


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class SDFineTune(L.LightningModule):
    """Stable Diffusion fine-tune: VAE and text encoder frozen, UNet trained fully or through LoRA."""

    def __init__(
        self,
        pretrained: str = "tiny",
        revision: str | None = None,
        train_mode: Literal["full", "lora"] = "full",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto",
        min_snr_gamma: float | None = None,
        min_snr_floor: float = 0.0,
        noise_offset: float = 0.0,
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        lr_scheduler: str = "constant_with_warmup",
        lr_warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        allow_tf32: bool = True,
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_options: dict[str, Any] | None = None,
        max_nonfinite_steps: int = 10,
        seed: int = 0,
    ) -> None:
        """
        Args:
            pretrained: Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), local diffusers folder, "tiny",
                or "sd15-random" (SD 1.5's architecture, random weights: for GPU throughput figures only).
            revision: Hub revision (branch, tag or commit) of `pretrained`.
            train_mode: "full" trains every UNet weight; "lora" trains a LoRA adapter on the attention layers.
            lora_rank: LoRA rank.
            lora_alpha: LoRA alpha (default: equal to the rank, i.e. scale 1).
            lora_targets: UNet module names that get LoRA layers.
            prediction_type: UNet target; "auto" takes it from the model's scheduler config.
            min_snr_gamma: Min-SNR loss weighting gamma (5.0 is the paper's value); None disables it.
            min_snr_floor: Lower bound of the min-SNR weight in clean-latent terms (0: the paper's weighting). With a
                zero terminal SNR scheduler and v-prediction, 1.0 keeps the noisiest timesteps at plain v-loss weight.
            noise_offset: Offset-noise strength (0.05-0.1 helps very dark/bright images); 0 disables it.
            optimizer: "adamw", or "adamw8bit" (bitsandbytes' AdamW8bit: 8-bit moments, on CUDA and on CPU alike).
            learning_rate: Peak learning rate.
            weight_decay: AdamW weight decay.
            adam_betas: AdamW betas.
            adam_eps: AdamW epsilon.
            lr_scheduler: diffusers schedule name: constant, constant_with_warmup, linear, cosine, ...
            lr_warmup_steps: Linear warmup steps.
            gradient_checkpointing: Recompute UNet activations in backward to save memory.
            allow_tf32: fp32 matmuls and convolutions on CUDA in TF32 (Ampere and newer: several times faster for
                the fp32 parts; no effect on other devices).
            channels_last: Keep the UNet's weights and inputs in channels-last layout (faster convolutions on
                tensor cores).
            compile_unet: Compile the UNet's forward with torch.compile (slower first steps, faster after).
            compile_options: torch.compile arguments, e.g. {"mode": "max-autotune"} or {"backend": "aot_eager"}.
            max_nonfinite_steps: Steps with a NaN/inf loss (on any rank) are skipped on every rank; this many in
                a row stop the run (the last checkpoint stays the last good one).
            seed: Seed of the noise and timesteps of every step (a function of seed, step and rank).
        """
        super().__init__()
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"model.min_snr_gamma: must be > 0 or null, got {min_snr_gamma}")
        if not 0.0 <= min_snr_floor <= (min_snr_gamma or float("inf")):
            raise ValueError(f"model.min_snr_floor: must be in [0, min_snr_gamma], got {min_snr_floor}")
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate: must be > 0, got {learning_rate}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps: must be >= 1, got {max_nonfinite_steps}")
        self.save_hyperparameters()
        parts = load_components(pretrained, revision)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.vae_scale_factor = parts.vae_scale_factor
        self.prediction_type = (
            self.noise_scheduler.config.prediction_type if prediction_type == "auto" else prediction_type
        )
        self.noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        self.unet.train()  # from_pretrained returns eval mode: dropout would be silently off
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        if train_mode == "lora":
            torch.manual_seed(seed)  # LoRA init is random: keep it reproducible
            self._add_lora(self.unet)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        # The checkpoint keeps only trainable weights (frozen ones come from `pretrained`); see on_save_checkpoint.
        self.strict_loading = False
        self.num_nonfinite_skipped = 0
        self.num_nonfinite_in_a_row = 0
        self.skip_update = False
        self._nonfinite: torch.Tensor | None = None  # per-rank flags of the steps since the last update

    def _add_lora(self, unet: UNet2DConditionModel) -> None:
        hp = self.hparams
        add_lora(unet, hp.lora_rank, hp.lora_alpha or hp.lora_rank, list(hp.lora_targets))

    # ---- parameters -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def configure_model(self) -> None:
        """Under `trainer.strategy: fsdp`, shard the UNet (FSDP2); the frozen parts stay whole on every rank."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.unet)
        if self.hparams.compile_unet:
            # In place: the weights keep their names in checkpoints and exports.
            self.unet.compile(**(self.hparams.compile_options or {}))

    def setup(self, stage: str) -> None:
        settings = getattr(getattr(self.trainer, "datamodule", None), "latent_settings", None)
        if settings is None:
            return
        hp, scaling = self.hparams, float(self.vae.config.scaling_factor)
        mine = (hp.pretrained, hp.revision, scaling)
        theirs = (settings.vae, settings.revision, settings.scaling_factor)
        if mine != theirs:
            raise ValueError(
                f"data.shards: the latents were encoded with VAE {settings.vae!r} (revision {settings.revision}, "
                f"scaling {settings.scaling_factor}) but model.pretrained is {hp.pretrained!r} (revision "
                f"{hp.revision}, scaling {scaling}); re-encode with this model's VAE or train from images"
            )

    def on_fit_start(self) -> None:
        if self.hparams.allow_tf32:  # CUDA-only switches: nothing changes on other devices
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # Frozen parts run in the autocast dtype (as diffusers' scripts do), on every device: CI runs the code
        # a GPU user runs. Whatever runs them outside the training step must run under the same autocast.
        if "bf16" in str(self.trainer.precision):
            self.vae.to(torch.bfloat16)
            self.text_encoder.to(torch.bfloat16)

    # ---- the training step ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> CLIP hidden states (B, 77, D)."""
        return encode_prompts(self.tokenizer, self.text_encoder, captions, self.device)

    def step_generator(self) -> torch.Generator:
        """A generator seeded from (seed, step, rank): a resumed run draws the same noise at the same step."""
        seed = _step_seed(self.hparams.seed, self.global_step, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of one batch; all randomness comes from `generator`."""
        if "latents" in batch:  # latent shards: encoded ahead of time (posterior mean)
            latents = batch["latents"].to(self.device)  # (B, 4, h, w)
        else:
            latents = self.encode_images(batch["pixel_values"], generator)  # (B, 4, h, w)
        text_states = self.encode_text(batch["caption"])  # (B, 77, D)
        noise = sample_noise(latents, self.hparams.noise_offset, generator)  # (B, 4, h, w)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=self.device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.hparams.channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
        prediction = self.unet(noisy_latents, timesteps, text_states.to(noisy_latents.dtype)).sample
        target = prediction_target(self.noise_scheduler, self.prediction_type, latents, noise, timesteps)
        gamma = self.hparams.min_snr_gamma
        weights = (
            None
            if gamma is None
            else min_snr_weights(
                self.noise_scheduler, timesteps, gamma, self.prediction_type, self.hparams.min_snr_floor
            )
        )
        return diffusion_loss(prediction, target, weights)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch, self.step_generator())
        # Queued on the device, read on the host in on_before_optimizer_step (once backward is queued too).
        flags = flag_tensor_of_all_ranks(~torch.isfinite(loss.detach()).all())
        self._nonfinite = flags if self._nonfinite is None else self._nonfinite | flags
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["caption"]))
        return loss

    def heldout_loss(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss with noise and timesteps fixed per (batch, rank): comparable across runs and checkpoints (also
        `sdtune eval --val_shards`)."""
        seed = int(np.random.SeedSequence([_VAL_SEED, batch_idx, self.global_rank]).generate_state(1)[0])
        return self.compute_loss(batch, torch.Generator(device=self.device).manual_seed(seed))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss on held-out data with noise and timesteps fixed per (batch, rank): comparable across runs."""
        loss = self.heldout_loss(batch, batch_idx)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["caption"]))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        flags, self._nonfinite = self._nonfinite, None
        self.skip_update = flags is not None and self.skip_nonfinite(flags.tolist())
        if self.skip_update:
            # Lightning refuses a skipped training_step under DDP, so backward runs (its gradient all-reduce
            # keeps the ranks in step) and the gradients are dropped here: AdamW leaves a parameter without a
            # gradient untouched (no update, no weight decay, no moment change).
            optimizer.zero_grad(set_to_none=True)

    def skip_nonfinite(self, flags: list[bool]) -> bool:
        """True when the loss was NaN/inf on any rank (`flags`, in rank order): then every rank skips this update;
        counted and bounded."""
        if not any(flags):
            self.num_nonfinite_in_a_row = 0
            return False
        self.num_nonfinite_skipped += 1
        self.num_nonfinite_in_a_row += 1
        bad_ranks = [rank for rank, flag in enumerate(flags) if flag]
        log.warning(
            "rank %d: step %d skipped on every rank: non-finite loss on rank(s) %s (%d in a row, %d in total)",
            self.global_rank,
            self.global_step,
            bad_ranks,
            self.num_nonfinite_in_a_row,
            self.num_nonfinite_skipped,
        )
        self.log("train/nonfinite_skipped", float(self.num_nonfinite_skipped), on_step=True, rank_zero_only=True)
        if self.num_nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.num_nonfinite_in_a_row} non-finite losses in a row (model.max_nonfinite_steps); stopping. "
                "The last checkpoint predates them: lower model.learning_rate or check the data, then resume"
            )
        return True

    # ---- optimizer --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = self.trainer.estimated_stepping_batches
        return self.configure_optimizers_for(int(total_steps) if total_steps != float("inf") else None)

    def configure_optimizers_for(self, total_steps: int | None) -> dict[str, Any]:
        """Optimizer and per-step LR schedule for a run of `total_steps` optimizer steps."""
        hp = self.hparams
        params = list(self.trainable_parameters().values())
        kwargs = {
            "lr": hp.learning_rate,
            "betas": tuple(hp.adam_betas),
            "eps": hp.adam_eps,
            "weight_decay": hp.weight_decay,
        }
        if hp.optimizer == "adamw8bit":
            import bitsandbytes as bnb  # runs on CPU too (uint8 state, qmaps, absmax): no fallback

            optimizer = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
        scheduler = get_scheduler(
            hp.lr_scheduler, optimizer, num_warmup_steps=hp.lr_warmup_steps, num_training_steps=total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_parameters()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        rng.save_to(checkpoint)
        checkpoint["nonfinite"] = {"skipped": self.num_nonfinite_skipped, "in_a_row": self.num_nonfinite_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = set(self.trainable_parameters()) - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trainable weight(s) (e.g. {sorted(missing)[0]}); "
                "was it written with another model.train_mode or LoRA setting?"
            )
        nonfinite = checkpoint.get("nonfinite", {"skipped": 0, "in_a_row": 0})
        self.num_nonfinite_skipped, self.num_nonfinite_in_a_row = nonfinite["skipped"], nonfinite["in_a_row"]
        rng.load_from(checkpoint, self.global_rank)

    def model_for_export(self) -> UNet2DConditionModel | None:
        """The UNet with full weights: `self.unet`, or under FSDP a CPU copy on rank 0 (None on other ranks).

        Under FSDP every rank must call this: the shards are gathered with a collective.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.unet, FSDPModule):
            return self.unet
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.unet, options=options)  # full on rank 0, empty elsewhere
        if not self.trainer.is_global_zero:
            return None
        unet = UNet2DConditionModel.from_config(self.unet.config)
        if self.hparams.train_mode == "lora":
            self._add_lora(unet)
        unet.load_state_dict(state)
        return unet

    def export_files(
        self,
        suffix: str = "",
        model: UNet2DConditionModel | None = None,
        dtype: torch.dtype | None = None,
        values: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, FileContent]:
        """The trained weights in diffusers layout: `unet{suffix}/` or `lora{suffix}/` (safetensors).

        `values` (trainable parameter name -> tensor, e.g. the EMA weights) replaces those parameters' values;
        it applies to this module's own UNet only.
        """
        unet = model if model is not None else self.unet
        if self.hparams.train_mode == "lora":
            state, folder = lora_state_dict(unet), f"lora{suffix}"
            files: dict[str, FileContent] = {}
        else:
            state, folder = unet.state_dict(), f"unet{suffix}"
            files = {f"{folder}/config.json": unet.to_json_string().encode()}
        if values is not None:
            if unet is not self.unet:
                raise ValueError("export_files: values replace this module's own UNet weights, not another model's")
            state = replace_values(state, self.trainable_parameters(), values)
        weights = LORA_WEIGHTS if self.hparams.train_mode == "lora" else "diffusion_pytorch_model.safetensors"
        files[f"{folder}/{weights}"] = TensorFile(dict(state), {"format": "pt"}, dtype)
        return files

    def save_base_pipeline(self, folder: Path) -> None:
        """The base model as a diffusers pipeline folder, with this run's scheduler (its prediction type): the rest
        of the pipeline a checkpoint's UNet completes (`PeriodicCheckpoint.hub_root`)."""
        parts = load_components(self.hparams.pretrained, self.hparams.revision)
        parts.noise_scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        parts.save_pretrained(folder)

    def export_weights(self, folder: Path, suffix: str = "", model: UNet2DConditionModel | None = None) -> None:
        """Write `export_files` into `folder` now (the checkpoint callback writes them off the training thread)."""
        write_files(folder, self.export_files(suffix, model))
