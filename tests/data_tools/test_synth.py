"""The synthetic captioned shapes: the classic default set, the extended options tiny-pretrained and the
quickstart use (more shapes and sizes, pink, held-out pairs, class folders by any label), bad options."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.synth import BASE_COLORS, BASE_SHAPES, COLORS, synth
from sdtune.command import main


def labels_of(folder: Path) -> list[dict[str, str]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def test_defaults_draw_the_classic_set_and_captions_match_labels(tmp_path: Path) -> None:
    labels = labels_of(synth(tmp_path / "a", num_images=60, seed=4))
    assert {x["shape"] for x in labels} == set(BASE_SHAPES) and {x["size"] for x in labels} == {"small", "large"}
    assert {x["color"] for x in labels} <= set(BASE_COLORS) and all(x["color"] != x["background"] for x in labels)
    caption = (tmp_path / "a" / "000000.txt").read_text().strip()
    first = labels[0]
    assert (
        caption
        == f"a photo of a {first['size']} {first['color']} {first['shape']} on a {first['background']} background"
    )
    again = synth(tmp_path / "b", num_images=60, seed=4)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "a").iterdir())


def test_extended_options_pink_pairs_held_out_and_class_folders(tmp_path: Path) -> None:
    everything = ["circle", "square", "triangle", "diamond", "cross"]
    folder = synth(tmp_path / "pink", num_images=40, seed=1, colors=["pink"], shapes=everything, class_folders=True)
    labels = labels_of(folder)
    assert {x["color"] for x in labels} == {"pink"} and {x["shape"] for x in labels} == set(everything)
    assert {p.name for p in folder.iterdir()} == set(everything)  # class folders by shape
    held = synth(tmp_path / "held", num_images=300, seed=2, shapes=everything, exclude=["circle:green", "cross:red"])
    pairs = {(x["shape"], x["color"]) for x in labels_of(held)}
    assert ("circle", "green") not in pairs and ("cross", "red") not in pairs and ("circle", "red") in pairs
    by_color = synth(tmp_path / "c", num_images=50, seed=3, colors=list(COLORS), class_folders=True, class_of="color")
    assert {p.name for p in by_color.iterdir() if p.is_dir()} <= set(COLORS)
    # A pink shape is drawn in pink: its pixels include the colour.
    image = np.asarray(Image.open(next(folder.rglob("*.png"))))
    assert (np.abs(image.reshape(-1, 3) - COLORS["pink"]).sum(axis=1) == 0).any()


def _centre_of_shape(path: Path) -> np.ndarray:
    """The centre of the pixels that differ from the corner's (background) colour."""
    image = np.asarray(Image.open(path)).astype(int)
    ys, xs = np.nonzero(np.abs(image - image[0, 0]).sum(axis=-1) > 0)
    return np.array([(ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2])


def test_jitter_bounds_how_far_the_shape_moves_from_the_centre(tmp_path: Path) -> None:
    offsets = {}
    for jitter in (0.0, 0.15, 1.0):
        folder = synth(tmp_path / str(jitter), num_images=40, seed=5, sizes=["small"], jitter=jitter)
        offsets[jitter] = np.abs(np.stack([_centre_of_shape(p) for p in sorted(folder.glob("*.png"))]) - 31.5)
    room = (64 - 0.3 * 64) / 2  # a small shape's room on either side of the centre
    assert offsets[0.0].max() <= 1.0  # centred, within a pixel of rasterisation
    assert offsets[0.15].max() <= 0.15 * room + 1.0 and offsets[0.15].max() > 0.5
    assert offsets[1.0].max() > 0.5 * room  # anywhere the shape fits
    # jitter 1 (the default) draws the pixels the generator drew before the option existed (digest taken then).
    digest = hashlib.sha256()
    for path in sorted((tmp_path / "1.0").glob("*.png")):
        digest.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
    assert digest.hexdigest() == "94bf1988e88575b6f5aa6418b1d10679e9de7b34950f54d3fbdcf4a153b2b0e4"


def test_bad_options_name_themselves_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--colors", "[magenta]"]) == 2
    assert "synth --colors: ['magenta'] not among" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--exclude", "[circle-green]"]) == 2
    assert "synth --exclude: give pairs as shape:colour" in capsys.readouterr().err
    args = ["data", "synth", "--out", str(tmp_path / "x"), "--shapes", "[circle]", "--colors", "[red]"]
    assert main([*args, "--exclude", "[circle:red]"]) == 2
    assert "every (shape, colour) pair of the options is excluded" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--jitter", "1.5"]) == 2
    assert "synth --jitter: 1.5 is not between 0" in capsys.readouterr().err
