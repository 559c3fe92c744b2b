"""The speed options (torch.compile, channels_last) train the same model as eager, contiguous training does."""

from __future__ import annotations

import pytest

from tests.helpers.assertions import read_losses
from tests.helpers.runs import run_train, train_config


@pytest.mark.slow
def test_compiled_channels_last_training_follows_eager(tmp_path, synth_shards):
    losses = {}
    variants = {
        "eager": {},
        # aot_eager traces and compiles forward and backward graphs like inductor does, without the C++ build
        # that takes minutes on 2 cores; the GPU check's rows use inductor.
        "compiled": {"compile_unet": True, "compile_options": {"backend": "aot_eager"}, "channels_last": True},
    }
    for name, model in variants.items():
        config = train_config(tmp_path / name, synth_shards, callbacks=[], model=model, max_steps=4)
        run_train(config)
        losses[name] = [values[0] for _, values in sorted(read_losses(tmp_path / name).items())]
    assert len(losses["eager"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert len(set(losses["eager"])) == 4  # the steps differ: a constant would pass the comparison trivially
