"""The synthetic captioned shapes: the classic default set, the extended options tiny-pretrained and the
quickstart use (more shapes and sizes, pink, held-out pairs, class folders by any label), bad options."""

from __future__ import annotations

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


def test_bad_options_name_themselves_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--colors", "[magenta]"]) == 2
    assert "synth --colors: ['magenta'] not among" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--exclude", "[circle-green]"]) == 2
    assert "synth --exclude: give pairs as shape:colour" in capsys.readouterr().err
    args = ["data", "synth", "--out", str(tmp_path / "x"), "--shapes", "[circle]", "--colors", "[red]"]
    assert main([*args, "--exclude", "[circle:red]"]) == 2
    assert "every (shape, colour) pair of the options is excluded" in capsys.readouterr().err
