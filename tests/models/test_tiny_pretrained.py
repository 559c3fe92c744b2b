"""tiny-pretrained, the small latent diffusion model sdtune trains and ships: it loads (sdtune and plain
diffusers, offline), its files are the ones its card lists, its VAE reconstructs held-out images, its
checker recognises real images, and it draws what held-out prompts ask for."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from data_tools.synth import COLORS, SHAPES, SIZES, caption_of, draw_labels, draw_shape
from sdtune.eval.checker import Checker, asked_for
from sdtune.fileio import sha256_file
from sdtune.latent.quality import psnr, ssim
from sdtune.models.components import load_components, load_vae, resolve_pretrained, tiny_pretrained_folder
from sdtune.models.sampling import generate
from sdtune.research.tiny_model.figures import EVAL_STEPS, prompt_sets
from sdtune.research.tiny_model.recipe import HELD_OUT_PAIRS, NEW_CONCEPT

FOLDER = tiny_pretrained_folder()
FIGURES = json.loads((FOLDER / "figures.json").read_text())
GUIDANCE = FIGURES["results"]["sampler"]["guidance_scale"]  # chosen by the recipe on seen pairs


def real_shapes(count: int, seed: int, colors: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Freshly drawn shapes (any shape, size and colour of `colors`) and their true captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        labels = draw_labels(rng, SHAPES, colors, list(COLORS)[:8], list(SIZES))
        image = draw_shape(64, labels["shape"], labels["color"], labels["background"], labels["size"], rng)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(caption_of(labels))
    return torch.stack(images), captions


def test_the_shipped_files_are_the_ones_the_card_lists_and_fit_the_budget() -> None:
    card = (FOLDER / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", card, flags=re.M))
    shipped = {str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(listed) == shipped
    assert all(sha256_file(FOLDER / name) == digest for name, digest in listed.items())
    assert sum((FOLDER / name).stat().st_size for name in shipped) < 20 * 2**20
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in shipped)
    assert "make tiny-model" in card and FIGURES["settings"]["new_concept"] == NEW_CONCEPT


def test_loads_by_name_in_sdtune_and_from_its_folder_in_plain_diffusers() -> None:
    parts = load_components("tiny-pretrained")
    assert resolve_pretrained("tiny-pretrained") == str(FOLDER)
    assert all(p.dtype == torch.float32 for p in parts.unet.parameters())  # fp16 on disk, fp32 to train
    assert parts.vae_scale_factor == 4 and parts.unet.config.sample_size == 16
    pipeline = StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    prompt = "a photo of a large red circle on a blue background"
    plain = pipeline(
        prompt,
        height=64,
        width=64,
        num_inference_steps=10,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    ours = generate(
        parts.unet,
        parts.vae,
        parts.text_encoder,
        parts.tokenizer,
        parts.noise_scheduler.config,
        [prompt],
        [3],
        10,
        GUIDANCE,
        64,
    )
    np.testing.assert_allclose(plain, ours, atol=1e-5)


def test_vae_reconstructs_held_out_shapes_and_digits() -> None:
    vae = load_vae("tiny-pretrained").eval()
    images, _ = real_shapes(64, seed=123, colors=list(COLORS))  # pink included: a colour it never saw
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    assert psnr(reconstruction, images).median() > 25 and ssim(reconstruction, images).median() > 0.85
    shipped = FIGURES["results"]["vae"]
    assert shipped["shapes"]["psnr_median"] >= 25 and shipped["shapes"]["ssim_median"] >= 0.85
    assert shipped["tiny_preset_random"]["shapes"]["psnr_median"] < 12  # the random preset it replaces


def test_checker_recognises_real_images_and_reads_prompts() -> None:
    checker = Checker.load(FOLDER / "checker")
    images, captions = real_shapes(90, seed=7, colors=list(COLORS))
    summary = checker.score(images, captions).summary()
    assert summary["shape"] >= 0.9 and summary["color"] >= 0.9, summary
    assert asked_for("a photo of a small pink cross on a red background", checker.vocabulary) == {
        "shape": "cross",
        "color": "pink",
    }
    assert asked_for("a handwritten digit 7", checker.vocabulary) == {"digit": "7"}
    assert asked_for("a watercolour of a lighthouse", checker.vocabulary) == {}
    # Shuffled captions are mostly wrong: the score is not a constant.
    wrong = checker.score(images, captions[1:] + captions[:1]).summary()
    assert wrong["all"] < 0.5


def test_the_shipped_model_follows_shape_colour_and_digit_words_above_chance() -> None:
    """A floor under the card's text-to-image figures, so weights that ignore the prompt cannot ship again: the
    first shipped UNet gave colour 0.05 on held-out pairs (chance 0.11), the second shape 0.05 (chance 0.2).
    The issue's target for held-out pairs is 0.8; the shipped weights give 0.825 at the guidance the recipe picked
    on seen pairs (diamonds come out as crosses or circles), so the floor here is 3x chance, not the target."""
    results, chance = FIGURES["results"]["text_to_image"], FIGURES["results"]["chance"]
    for prompts in ("held_out_pairs", "seen_pairs"):
        assert results[prompts]["color"] >= 5 * chance["color"], (prompts, results[prompts])
        assert results[prompts]["shape"] >= 3 * chance["shape"], (prompts, results[prompts])
    assert results["digits"]["digit"] >= 5 * chance["digit"], results["digits"]
    assert results["new_concept"]["color"] <= 2 * chance["color"]  # pink: never seen by the UNet


@pytest.mark.slow
def test_the_shipped_text_to_image_figures_reproduce_from_the_shipped_weights() -> None:
    """The card's held-out-pairs figure is what the shipped weights give: same prompts, seeds and sampler,
    judged by the shipped checker (within 0.1: another CPU may round a few pixels differently)."""
    parts = load_components("tiny-pretrained")
    checker = Checker.load(FOLDER / "checker")
    prompts = prompt_sets(HELD_OUT_PAIRS, NEW_CONCEPT)["held_out_pairs"]
    seeds = list(range(FIGURES["settings"]["eval_seeds"]))
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    images = generate(
        parts.unet,
        parts.vae,
        parts.text_encoder,
        parts.tokenizer,
        parts.noise_scheduler.config,
        all_prompts,
        all_seeds,
        EVAL_STEPS,
        GUIDANCE,
        64,
    )
    summary = checker.score_rendered(images, all_prompts).summary()
    shipped = FIGURES["results"]["text_to_image"]["held_out_pairs"]
    assert summary["count"] == shipped["count"] == len(prompts) * len(seeds)
    for attribute in ("shape", "color", "all"):
        assert abs(summary[attribute] - shipped[attribute]) <= 0.1, (summary, shipped)
