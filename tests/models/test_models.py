"""Component loading: the tiny preset is seeded and offline; a saved folder loads back the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.models import SDFineTune, tiny
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


@pytest.mark.parametrize("words", [tiny.PRETRAINED_WORDS, ("red", "green", "background", "round", "ground")])
def test_every_caption_word_is_one_token(words: tuple[str, ...]) -> None:
    """A merge of one word must not split another ("r e" of "red" used to cut "green" into 4 tokens, which
    moved every later word of a caption to another position)."""
    tokenizer = tiny.tiny_tokenizer(words)
    assert {word: tokenizer.tokenize(word) for word in words} == {word: [word + "</w>"] for word in words}
    assert tokenizer.tokenize("greens") != ["greens</w>"]  # other text still tokenizes, piece by piece


def test_the_frozen_text_encoder_tells_words_and_their_places_apart() -> None:
    """tiny-pretrained's text encoder stays frozen, so its outputs must already separate the words a UNet has
    to follow: at one position, two colours (or shapes) are far apart; one colour as the shape's and as the
    background's is told apart too. CLIP's default init gives 0.99 for the first."""
    tokenizer = tiny.tiny_tokenizer(tiny.PRETRAINED_WORDS)
    encoder = tiny.tiny_pretrained_text_encoder(tokenizer)
    captions = [
        "a photo of a large red circle on a blue background",
        "a photo of a large green circle on a blue background",
        "a photo of a large red square on a blue background",
        "a photo of a large blue circle on a red background",
    ]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids).last_hidden_state

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).item()

    colour, shape, background = 6, 7, 10  # positions after <|startoftext|> "a photo of a large"
    assert cosine(states[0, colour], states[1, colour]) < 0.6
    assert cosine(states[0, shape], states[2, shape]) < 0.6
    assert cosine(states[0, colour], states[3, background]) < 0.6  # "red": the shape's vs the background's


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
