"""Tiny random-init Stable Diffusion components, built offline from configs (as diffusers' own tests do).

The tiny preset has the real SD architecture with small widths: a 2-block VAE (downsampling factor 2,
not 8), a 2-block UNet with cross-attention, a 2-layer CLIP text encoder, and a byte-level BPE CLIP
tokenizer whose vocab/merges files are generated here. Every component is seeded, so two builds are
bitwise identical.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_SEED = 0
# Words of the synthetic captions (data_tools.synth) get whole-word merges, so the tiny tokenizer
# produces a few tokens per word instead of one per byte.
_TINY_WORDS = tuple(
    (
        "a photo of red green blue yellow purple orange white black small large circle square triangle "
        "on background with and the in picture shape"
    ).split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _symbols(word: str) -> list[str]:
    """A word as BPE starts it: one symbol per character, the last with the end-of-word marker."""
    return list(word[:-1]) + [word[-1] + "</w>"]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word` with its end-of-word marker: ((w o) r) d</w>."""
    pieces = _symbols(word)
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is left."""
    parts = _symbols(word)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _ordered_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges under which every word is one token. BPE applies the lowest-ranked pair first, so one word's merge
    can split another ("r e" of "red" inside "green"); the words such a merge breaks move to the front until
    none is broken."""
    order = list(dict.fromkeys(words))
    for _ in range(10 * len(order)):
        merges = list(dict.fromkeys(m for word in order for m in _word_merges(word)))
        ranks = {merge: rank for rank, merge in enumerate(merges)}
        broken = [word for word in order if len(_bpe(word, ranks)) != 1]
        if not broken:
            return merges
        order = broken + [word for word in order if word not in broken]
    raise ValueError(f"tiny tokenizer: no merge order makes each of {broken} one token")


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] = _TINY_WORDS) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a small CLIP BPE tokenizer whose `words` are
    single tokens (any other text still tokenizes, byte by byte)."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _ordered_merges(words)
    vocab_list += list(dict.fromkeys(left + right for left, right in merges if left + right not in vocab_list))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_tokenizer(words: tuple[str, ...] = _TINY_WORDS) -> CLIPTokenizer:
    """Load the generated tokenizer; checks its size because some transformers 5 paths yield 2 tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_tokenizer(Path(tmp), words)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        expected = len(json.loads((folder / "vocab.json").read_text()))
    assert len(tokenizer) == expected, f"tiny tokenizer has {len(tokenizer)} tokens, expected {expected}"
    return tokenizer


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(TINY_SEED)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(TINY_SEED)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )


def _text_encoder(tokenizer: CLIPTokenizer, width: int, mlp_width: int, heads: int, layers: int) -> CLIPTextModel:
    """A random-init CLIP text tower over `tokenizer`'s vocabulary, with its special-token ids."""
    torch.manual_seed(TINY_SEED)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=width,
        intermediate_size=mlp_width,
        layer_norm_eps=1e-05,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
    )
    return CLIPTextModel(config)


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return _text_encoder(tokenizer, width=32, mlp_width=37, heads=4, layers=2)


def tiny_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD's training noise schedule (scaled_linear, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_pretrained_scheduler() -> DDPMScheduler:
    """SD's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al., 2023, as in SD 2.1
    fine-tunes and SDXL derivatives). At 16x16 latents SD's own schedule leaks the image's mean colour: at
    t=999 the per-channel latent means keep a signal of std ~0.05 against a noise mean of std ~0.06, so a UNet
    learns to read colour from the noise, and from pure noise at sampling time it draws a colour at random."""
    return DDPMScheduler.from_config(
        tiny_scheduler("v_prediction").config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def sd15_shaped_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet architecture (860M parameters), random init: for GPU throughput and memory figures."""
    torch.manual_seed(TINY_SEED)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sd15_shaped_vae() -> AutoencoderKL:
    torch.manual_seed(TINY_SEED)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_shaped_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """CLIP ViT-L/14's text tower shape (12 layers, width 768) over the tiny tokenizer's vocabulary."""
    return _text_encoder(tokenizer, width=768, mlp_width=3072, heads=12, layers=12)


# ---- tiny-pretrained: the architecture of the model `sdtune tiny-model` trains (weights ship in the repo) ----
# Its tokenizer also knows the words of the extended shapes, the held-out colour and the digit captions.
PRETRAINED_WORDS = _TINY_WORDS + ("medium", "diamond", "cross", "pink", "handwritten", "digit")


def tiny_pretrained_vae(seed: int = TINY_SEED) -> AutoencoderKL:
    """3 blocks (32, 64, 64 channels), one ResNet layer each, no mid-block attention, 4 latent channels:
    64x64 pixels -> 16x16x4 latents (downsampling 4; SD's is 8). ~0.9M parameters."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        norm_num_groups=16,
        mid_block_add_attention=False,
    )


def tiny_pretrained_unet(seed: int = TINY_SEED) -> UNet2DConditionModel:
    """16x16x4 latents; 3 levels (64, 128, 128 channels) with cross-attention at 16x16 and 8x8. ~5.8M."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
        # The prompt also enters the timestep embedding, attention-pooled (diffusers' "text" addition, as in
        # UnCLIP/Kandinsky): global attributes such as the background colour need not go through every pixel's
        # cross-attention.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def tiny_pretrained_text_encoder(tokenizer: CLIPTokenizer, seed: int = TINY_SEED) -> CLIPTextModel:
    """A 2-layer CLIP text tower of width 64; `sdtune tiny-model` keeps it frozen at this seeded init.

    CLIP's own init (embeddings of std 0.02 under layers whose outputs are ~10x larger) erases the tokens: a
    frozen tower built that way gives "red" and "green" at the same position a cosine similarity of 0.99, and a
    UNet trained on it learns to ignore colour and shape words. Here the token and position embeddings both
    have std 1, so each output holds its own word and its place about equally: "red" against "green" at one
    place, and "red" as the shape's colour against "red" as the background's, are at cosine ~0.55."""
    encoder = _text_encoder(tokenizer, width=64, mlp_width=128, heads=4, layers=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoder.embeddings.token_embedding.weight.normal_(0.0, 1.0, generator=generator)
        encoder.embeddings.position_embedding.weight.normal_(0.0, 1.0, generator=generator)
    return encoder
