"""The speed options (torch.compile, channels_last) train the same model as eager, contiguous training does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from sdtune.models.sd_finetune import SDFineTune


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        self.values.append(float(outputs["loss"]))


def train(**options: object) -> tuple[list[float], SDFineTune]:
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"pixel_values": torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1, "caption": ["a red circle"] * 4}
        for _ in range(5)
    ]
    model = SDFineTune(learning_rate=1e-3, **options)
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[losses],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return losses.values, model


@pytest.mark.slow
def test_compiled_channels_last_training_follows_eager():
    eager, _ = train()
    # aot_eager traces and compiles the forward and backward graphs as inductor does, without inductor's C++ build
    # (minutes for the tiny UNet on 2 cores); the GPU check's compiled row uses inductor.
    compiled, model = train(compile_unet=True, compile_options={"backend": "aot_eager"}, channels_last=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] != pytest.approx(eager[0], rel=1e-3), "the model did not change: the comparison proves nothing"
    assert not any("_orig_mod" in name for name in model.state_dict()), "compiling renamed the weights"
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
