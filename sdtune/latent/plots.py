"""matplotlib figures for the latent-space report, returned as PNG bytes (Agg backend, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image


def figure_png(figure: plt.Figure, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def image_strip(rows: dict[str, torch.Tensor], column_titles: list[str]) -> bytes:
    """A grid: one row per named image set (N, 3, H, W), the same N columns each."""
    names = list(rows)
    num_columns = len(column_titles)
    figure, axes = plt.subplots(len(names), num_columns, figsize=(1.3 * num_columns, 1.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        pictures = to_uint8(rows[name])
        for c in range(num_columns):
            axis = axes[r][c]
            axis.imshow(pictures[c])
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(column_titles[c], fontsize=8)
            if c == 0:
                axis.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    return figure_png(figure)


def scatter_by_class(points: dict[str, np.ndarray], labels: np.ndarray, classes: list[str]) -> bytes:
    """Side-by-side 2-D scatter plots (one per named embedding), coloured by class."""
    figure, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for axis, (title, xy) in zip(axes[0], points.items(), strict=True):
        for index, name in enumerate(classes):
            mask = labels == index
            axis.scatter(xy[mask, 0], xy[mask, 1], s=9, color=colours(index % colours.N), label=name, alpha=0.8)
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    return figure_png(figure)


def histogram(values: np.ndarray, title: str, xlabel: str) -> bytes:
    figure, axis = plt.subplots(figsize=(4.6, 3.0))
    axis.hist(values, bins=30, color="#4c72b0")
    axis.axvline(float(np.median(values)), color="black", linestyle="--", label=f"median {np.median(values):.2f}")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("images")
    axis.legend(fontsize=8)
    return figure_png(figure)


def distance_boxes(latent: dict[str, np.ndarray], pixel: dict[str, np.ndarray]) -> bytes:
    """Box plots of nearest-real-sample distances per augmentation, latent and pixel space side by side."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, (title, data) in zip(axes, (("latent space", latent), ("pixel space (decoded)", pixel)), strict=True):
        axis.boxplot(list(data.values()), showfliers=False)
        axis.set_xticks(range(1, len(data) + 1), list(data), rotation=30, fontsize=8)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("distance to nearest real sample\n(1 = typical real-to-real distance)", fontsize=8)
    return figure_png(figure)


def confusion(matrix: np.ndarray, classes: list[str], title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(0.45 * len(classes) + 2.5, 0.45 * len(classes) + 2))
    axis.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            axis.text(j, i, str(value), ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(classes)), classes, fontsize=8)
    axis.set_yticks(range(len(classes)), classes, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=10)
    return figure_png(figure)


def attention_overlays(images: torch.Tensor, maps: torch.Tensor, captions: list[str]) -> bytes:
    """Each image with its CLS-attention map (grid, grid) upsampled and overlaid as a heat map."""
    pictures = to_uint8(images)
    size = pictures.shape[1]
    upsampled = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear")[:, 0].numpy()
    num = len(pictures)
    figure, axes = plt.subplots(2, num, figsize=(1.6 * num, 3.4), squeeze=False)
    for index in range(num):
        axes[0][index].imshow(pictures[index])
        axes[0][index].set_title(captions[index], fontsize=7)
        axes[1][index].imshow(pictures[index])
        axes[1][index].imshow(upsampled[index], cmap="jet", alpha=0.5)
        for axis in (axes[0][index], axes[1][index]):
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_ylabel("image", fontsize=8)
    axes[1][0].set_ylabel("attention", fontsize=8)
    return figure_png(figure)
