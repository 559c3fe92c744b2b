"""A classifier LightningModule over latents or pixels; the network is a config choice.

    model:
      class_path: sdtune.latent.classifier.Classifier
      init_args:
        net:
          class_path: sdtune.latent.classifier_nets.PatchTransformer
          init_args: {patch_size: 2, dim: 128}

The network is built in `configure_model`, once the DataModule has read the data and knows the input
shape and the number of classes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from sdtune import rng
from sdtune.contracts import ClassificationData
from sdtune.latent import classifier_nets
from sdtune.latent.metrics import classification_metrics
from sdtune.tensorfile import FileContent, TensorFile, replace_values, write_files

NetFactory = Callable[[int, int, int], nn.Module]


def describe_net(factory: NetFactory) -> tuple[str, dict[str, Any]]:
    """(class name in sdtune.latent.classifier_nets, options) of a network factory (a class or a partial)."""
    if isinstance(factory, functools.partial):
        cls = next(a for a in factory.args if isinstance(a, type)) if factory.args else factory.func
        options = dict(factory.keywords)
    else:
        cls, options = factory, {}
    assert isinstance(cls, type) and getattr(classifier_nets, cls.__name__, None) is cls, f"unknown network {cls}"
    return cls.__name__, options


class Classifier(L.LightningModule):
    """Cross-entropy classifier; logs val/accuracy and val/macro_f1 and keeps the last confusion matrix."""

    def __init__(
        self,
        net: NetFactory = classifier_nets.LinearProbe,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        warmup_fraction: float = 0.05,
        noise_aware: str | None = None,
    ) -> None:
        """
        Args:
            net: Network class in sdtune.latent.classifier_nets and its options (class_path + init_args);
                input channels, size and class count come from the data.
            learning_rate: Peak AdamW learning rate (cosine decay over the run after a linear warmup).
            weight_decay: AdamW weight decay.
            label_smoothing: Cross-entropy label smoothing.
            warmup_fraction: Fraction of the steps spent warming up.
            noise_aware: Train on latents noised to a random timestep of this model's noise schedule (a Hub id,
                folder or tiny-pretrained), the timestep given to the network as an extra input channel (t / T):
                a classifier of noisy latents, for classifier guidance (sdtune generate guided). Latent data only.
        """
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate: must be > 0, got {learning_rate}")
        self.save_hyperparameters(ignore=["net"])
        self.net_factory = net
        self.net_name, self.net_options = describe_net(net)
        self.net: nn.Module | None = None
        self.input_spec: dict[str, Any] = {}
        self.val_metrics: dict[str, Any] = {}
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.alphas_cumprod: torch.Tensor | None = None
        if noise_aware:
            from sdtune.models.components import load_noise_scheduler

            self.alphas_cumprod = load_noise_scheduler(noise_aware).alphas_cumprod.float()

    def build(self, in_channels: int, image_size: int, num_classes: int) -> None:
        time_channel = int(self.alphas_cumprod is not None)
        self.input_spec = {"in_channels": in_channels + time_channel, "image_size": image_size,
                           "num_classes": num_classes, "time_channel": bool(time_channel)}  # fmt: skip
        if time_channel:
            self.input_spec["num_train_timesteps"] = len(self.alphas_cumprod)  # type: ignore[arg-type]
        self.net = self.net_factory(in_channels + time_channel, image_size, num_classes)

    def configure_model(self) -> None:
        if self.net is None:
            data = self.trainer.datamodule
            if not isinstance(data, ClassificationData):
                raise ValueError(
                    "model: Classifier needs data: sdtune.latent.classification_data.ClassificationDataModule "
                    f"(or a DataModule offering sdtune.contracts.ClassificationData), got {type(data).__name__}"
                )
            if self.alphas_cumprod is not None and data.input_kind != "latents":  # type: ignore[attr-defined]
                raise ValueError("model.noise_aware: needs latent shards (data.shards), not images")
            self.build(*data.classification_shape())

    def forward(self, inputs: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; a noise-aware classifier takes each input's timestep (default: 0, clean)."""
        assert self.net is not None, "build() first"
        if self.alphas_cumprod is not None:
            inputs = with_time_channel(inputs, timesteps, len(self.alphas_cumprod))
        return self.net(inputs)

    def _noised(self, inputs: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents noised to a uniformly drawn timestep, the timesteps); inputs unchanged if not noise-aware."""
        if self.alphas_cumprod is None:
            return inputs, torch.zeros(len(inputs), dtype=torch.long, device=inputs.device)
        return noised(inputs, self.alphas_cumprod, generator)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch  # (B, C, H, W), (B,)
        inputs, timesteps = self._noised(inputs, None)
        loss = nn.functional.cross_entropy(
            self(inputs, timesteps), labels, label_smoothing=self.hparams.label_smoothing
        )
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch  # noise-aware: the same noise and timesteps in every run and epoch
        inputs, timesteps = self._noised(inputs, torch.Generator().manual_seed(batch_idx))
        logits = self(inputs, timesteps)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), on_epoch=True, batch_size=len(labels))
        self._val_outputs.append((logits.argmax(dim=1).cpu(), labels.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        predictions = torch.cat([p for p, _ in self._val_outputs]).numpy()
        targets = torch.cat([t for _, t in self._val_outputs]).numpy()
        self._val_outputs.clear()
        self.val_metrics = classification_metrics(predictions, targets, self.input_spec["num_classes"])
        self.log("val/accuracy", self.val_metrics["accuracy"], prog_bar=True)
        self.log("val/macro_f1", self.val_metrics["macro_f1"], prog_bar=True)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
        """Metrics of the network (in eval mode) on `inputs` (N, C, H, W) with true `labels` (N,)."""
        assert self.net is not None
        was_training = self.net.training
        self.net.eval()
        predictions = torch.cat([self(x.to(self.device)).argmax(dim=1).cpu() for x in inputs.split(batch_size)])
        self.net.train(was_training)
        return classification_metrics(predictions.numpy(), labels.numpy(), self.input_spec["num_classes"])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints (sdtune.contracts.Exportable) ---------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def model_for_export(self) -> nn.Module | None:
        return self.net

    def export_files(
        self,
        suffix: str = "",
        model: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        values: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, FileContent]:
        """`classifier{suffix}/`: model.safetensors + classifier.json, loadable with `load_classifier`."""
        data = self.trainer.datamodule if self._trainer is not None else None
        extra = data.export_info() if isinstance(data, ClassificationData) else {}
        net = model if model is not None else self.net
        assert net is not None
        state = net.state_dict()
        if values is not None:
            state = replace_values(state, self.trainable_parameters(), values)
        info = {"net": self.net_name, "options": self.net_options, **self.input_spec, **extra}
        return {
            f"classifier{suffix}/model.safetensors": TensorFile(dict(state), {}, dtype),
            f"classifier{suffix}/classifier.json": (json.dumps(info, indent=2) + "\n").encode(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng.save_to(checkpoint)  # dropout and any other draw from the global RNGs resume exactly

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng.load_from(checkpoint, self.global_rank)

    def export(self, folder: Path) -> Path:
        """Write `export_files` into `folder` now: model.safetensors and classifier.json (network, options, input
        shape and the data's classes)."""
        files = self.export_files()
        write_files(folder, {name.removeprefix("classifier/"): content for name, content in files.items()})
        return folder


def noised(
    inputs: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents (B, C, H, W) noised to timesteps drawn uniformly from the schedule (drawn on the CPU from
    `generator`: the same on every device), and those timesteps."""
    draw = {"generator": generator, "device": "cpu"}
    timesteps = torch.randint(0, len(alphas_cumprod), (len(inputs),), **draw)  # type: ignore[arg-type]
    noise = torch.randn(inputs.shape, **draw).to(inputs.device)  # type: ignore[arg-type]
    ab = alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(inputs.device)
    return ab.sqrt() * inputs + (1 - ab).sqrt() * noise, timesteps.to(inputs.device)


def with_time_channel(inputs: torch.Tensor, timesteps: torch.Tensor | None, count: int) -> torch.Tensor:
    """Inputs (B, C, H, W) with a channel (B, 1, H, W) holding each one's timestep / `count` (0 when None)."""
    t = torch.zeros(len(inputs), device=inputs.device) if timesteps is None else timesteps.to(inputs.device).float()
    plane = (t / count).view(-1, 1, 1, 1).expand(-1, 1, *inputs.shape[2:]).to(inputs.dtype)
    return torch.cat([inputs, plane], dim=1)


def load_classifier(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A network exported by `Classifier.export` (safetensors; only classes of classifier_nets are built)."""
    info = json.loads((folder / "classifier.json").read_text())
    cls = getattr(classifier_nets, info["net"], None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{folder}/classifier.json: unknown network {info['net']!r}")
    net = cls(info["in_channels"], info["image_size"], info["num_classes"], **info["options"])
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval(), info
