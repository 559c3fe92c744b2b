"""Component loading: the tiny preset is seeded and offline; a saved folder loads back the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.models import SDFineTune
from sdtune.models.components import load_components


def test_tiny_preset_is_seeded_and_sane() -> None:
    first, second = load_components("tiny"), load_components("tiny")
    for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.vae_scale_factor == 2  # a 2-block VAE: read from its config, not assumed 8
    assert len(first.tokenizer) > 500  # not the 2-token tokenizer some transformers 5 paths yield
    ids = first.tokenizer("a photo of a red circle").input_ids
    assert ids[0] == first.tokenizer.bos_token_id and ids[-1] == first.tokenizer.eos_token_id
    assert first.text_encoder.config.vocab_size == len(first.tokenizer)
    assert first.text_encoder.config.eos_token_id == first.tokenizer.eos_token_id


def test_local_folder_round_trip(tmp_path: Path) -> None:
    parts = load_components("tiny")
    parts.save_pretrained(tmp_path / "model")
    assert not list((tmp_path / "model").rglob("*.bin")), "weights are written as safetensors"
    loaded = load_components(str(tmp_path / "model"))
    for a, b in zip(parts.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenizer("a red circle").input_ids == parts.tokenizer("a red circle").input_ids


@pytest.mark.parametrize("bad", ["./no/such/folder", "not a hub id", "http://example.com/model"])
def test_bad_pretrained_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="model.pretrained"):
        load_components(bad)


def test_frozen_parts_and_trainable_sets() -> None:
    full = SDFineTune(pretrained="tiny")
    assert all(name.startswith("unet.") for name in full.trainable_parameters())
    assert not any(p.requires_grad for p in full.vae.parameters())
    assert not any(p.requires_grad for p in full.text_encoder.parameters())
    lora = SDFineTune(pretrained="tiny", train_mode="lora", lora_rank=4)
    assert lora.trainable_parameters() and all("lora" in n for n in lora.trainable_parameters())
    assert SDFineTune(pretrained="tiny", prediction_type="v_prediction").noise_scheduler.config.prediction_type == (
        "v_prediction"
    )
