"""Labelled sample grids: a row per prompt, a column per seed, a title; small images enlarged."""

from __future__ import annotations

import numpy as np
import pytest

from sdtune.models.sampling import labelled_grid


def test_labelled_grid_places_tiles_and_writes_labels() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((6, 64, 64, 3)).astype(np.float32)
    grid = labelled_grid(
        images, ["a photo of a red circle", "a handwritten digit 7"], ["seed 0", "seed 1", "seed 2"], "step 16"
    )
    pixels = np.asarray(grid)
    label_width, top, tile = 260, 34, 128  # 64 px tiles are enlarged 2x
    assert grid.size == (label_width + 3 * tile, top + 2 * tile)
    # The tile of row 1, column 2 is image 5 enlarged (nearest): its top-left 2x2 block is its first pixel.
    block = pixels[top + tile : top + tile + 2, label_width + 2 * tile : label_width + 2 * tile + 2]
    assert (block == np.round(images[5, 0, 0] * 255).astype(np.uint8)).all()
    # Labels and title are drawn (dark text on the white margins).
    assert (pixels[top : top + tile, :label_width] < 100).any() and (pixels[:14] < 100).any()
    with pytest.raises(ValueError, match="5 images for 2 rows x 3 columns"):
        labelled_grid(images[:5], ["a", "b"], ["0", "1", "2"])
