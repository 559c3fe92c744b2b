"""The latent-space report: one self-contained HTML page (PNG plots inlined) plus the numbers as JSON.

    python -m sdtune.latent.report --images data/digits/shards --latents data/digits/latents \\
        --out runs/latent_report --classifier runs/latent_attention/classifier \\
        --benchmark runs/latent_benchmark/benchmark.json

Sections: how well the VAE reconstructs (PSNR, SSIM, LPIPS when available), how the classes lie in
latent space (PCA always, UMAP or t-SNE when installed; 1-nearest-neighbour accuracy in latent vs pixel
space), how far each augmentation moves samples (distance to the nearest real sample, in latent space
and in pixels after decoding), an image strip (originals, reconstructions, augmented decodes), the
attention classifier's CLS attention over the image, and the benchmark table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from sdtune.data.latents import decode
from sdtune.data.tables import LabelledTable, heldout_split, read_table
from sdtune.latent import plots
from sdtune.latent.augment import SMOTE, Extrapolate, GaussianNoise, Interpolate, LatentAugmentation
from sdtune.latent.classifier import load_classifier
from sdtune.latent.classifier_nets import PatchTransformer
from sdtune.latent.html import Section, render_page
from sdtune.latent.quality import lpips_or_none, psnr, ssim
from sdtune.models.components import load_vae_of
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings

log = logging.getLogger(__name__)

REPORT_AUGMENTATIONS: dict[str, LatentAugmentation] = {
    "gaussian 10%": GaussianNoise(ratio=0.1),
    "gaussian 50%": GaussianNoise(ratio=0.5),
    "lerp": Interpolate(mode="linear"),
    "slerp": Interpolate(mode="spherical"),
    "extrapolate": Extrapolate(strength=0.3),
    "smote": SMOTE(oversample=2.0),
}


def _pick(table: LabelledTable, max_samples: int) -> LabelledTable:
    """At most `max_samples`, the same in every run: evenly spread over the (sorted) keys."""
    if len(table) <= max_samples:
        return table
    return table.subset(np.linspace(0, len(table) - 1, max_samples).round().astype(int))


def _nearest_distance(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False) -> np.ndarray:
    """L2 distance from each flattened query to its nearest flattened reference."""
    distances = torch.cdist(queries.flatten(1).double(), references.flatten(1).double())
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values.numpy()


def _one_nn_accuracy(inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy: how often a sample's closest other sample shares its class."""
    distances = torch.cdist(inputs.flatten(1).double(), inputs.flatten(1).double())
    distances.fill_diagonal_(float("inf"))
    return float((labels[distances.argmin(dim=1)] == labels).float().mean())


def _embeddings(latents: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA

    flat = latents.flatten(1).numpy()
    result = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(flat)}
    try:
        import umap  # optional

        result["UMAP"] = umap.UMAP(random_state=seed).fit_transform(flat)
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(flat) - 1) // 3)))
        result["t-SNE"] = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(flat)
    return result


def reconstruction_section(images: torch.Tensor, recon: torch.Tensor, numbers: dict) -> Section:
    psnr_values, ssim_values = psnr(images, recon).numpy(), ssim(images, recon).numpy()
    lpips_values, lpips_note = lpips_or_none(images, recon)
    numbers["reconstruction"] = {
        "psnr_db": {"mean": float(psnr_values.mean()), "median": float(np.median(psnr_values))},
        "ssim": {"mean": float(ssim_values.mean()), "median": float(np.median(ssim_values))},
        "lpips": None if lpips_values is None else float(lpips_values.mean()),
        "lpips_note": lpips_note,
        "per_image": {"psnr_db": psnr_values.round(3).tolist(), "ssim": ssim_values.round(4).tolist()},
    }
    lpips_text = (
        f"LPIPS (lower is better): {float(lpips_values.mean()):.3f}."
        if lpips_values is not None
        else f"LPIPS was not computed: {lpips_note}."
    )
    return Section(
        "1. How faithfully does the VAE reconstruct images?",
        "Each image is compressed to a latent and decoded back. PSNR (dB, higher is better; above ~30 dB "
        "differences are hard to see) and SSIM (1 = identical structure) compare the reconstruction with the "
        f"original. Mean PSNR {psnr_values.mean():.1f} dB, mean SSIM {ssim_values.mean():.3f} over "
        f"{len(images)} images. {lpips_text}",
        [
            ("PSNR per image", plots.histogram(psnr_values, "PSNR per image", "dB")),
            ("SSIM per image", plots.histogram(ssim_values, "SSIM per image", "SSIM")),
        ],
    )


def structure_section(table: LabelledTable, images: torch.Tensor, seed: int, numbers: dict) -> Section:
    embeddings = _embeddings(table.inputs, seed)
    latent_nn, pixel_nn = _one_nn_accuracy(table.inputs, table.labels), _one_nn_accuracy(images, table.labels)
    numbers["structure"] = {"one_nn_accuracy_latent": latent_nn, "one_nn_accuracy_pixel": pixel_nn}
    numbers["structure"]["embeddings"] = list(embeddings)
    return Section(
        "2. Do images of the same class sit together in latent space?",
        "Each dot is one image's latent, squeezed to two dimensions and coloured by its class. Clusters of one "
        "colour mean the latent space separates the classes. As a number: the closest other image has the "
        f"same class {latent_nn:.0%} of the time in latent space, against {pixel_nn:.0%} comparing raw pixels.",
        [("2-D embeddings", plots.scatter_by_class(embeddings, table.labels.numpy(), table.classes))],
    )


def augmentation_section(
    table: LabelledTable, vae: torch.nn.Module, images: torch.Tensor, seed: int, numbers: dict
) -> tuple[Section, dict[str, torch.Tensor]]:
    """Distances of each augmentation's samples to the nearest real one (`images`: the reconstructions);
    returns the decoded samples too."""
    settings = table.latent_settings
    assert settings is not None
    # Pixel distances are to the decoded real latents (the reconstructions), so the VAE's own error is
    # not counted as the augmentation's.
    real_latent = np.median(_nearest_distance(table.inputs, table.inputs, exclude_self=True))
    real_pixel = np.median(_nearest_distance(images, images, exclude_self=True))
    latent_distances, pixel_distances, decoded, rows = {}, {}, {}, []
    for name, transform in REPORT_AUGMENTATIONS.items():
        made, _ = transform(table.inputs, table.labels, torch.Generator().manual_seed(seed))
        made = made[: len(table)]
        pictures = decode(vae, made, settings)
        latent_distances[name] = _nearest_distance(made, table.inputs) / real_latent
        pixel_distances[name] = _nearest_distance(pictures, images) / real_pixel
        decoded[name] = pictures
        rows.append([name, f"{np.median(latent_distances[name]):.2f}", f"{np.median(pixel_distances[name]):.2f}"])
    numbers["augmentation_distance"] = {
        "unit": "median distance to the nearest real sample / median real-to-real nearest distance",
        **{row[0]: {"latent": float(row[1]), "pixel": float(row[2])} for row in rows},
    }
    section = Section(
        "3. How far does each augmentation move samples?",
        "Synthetic samples are made in latent space and decoded. For each one we measure the distance to the "
        "closest real sample, where 1.0 is how far real images typically are from their closest neighbour "
        "(in pixels, real means the VAE's reconstructions, so its own error does not count). Below 1: the "
        "synthetic sample is a near-copy of a real one; well above 1: it leaves the data.",
        [("distances", plots.distance_boxes(latent_distances, pixel_distances))],
        [["augmentation", "latent distance (median)", "pixel distance (median)"], *rows],
    )
    return section, decoded


def attention_section(
    classifier_dir: Path, table: LabelledTable, images: torch.Tensor, num: int, heldout_keys: set[str] | None
) -> Section | None:
    net, info = load_classifier(classifier_dir)
    if not isinstance(net, PatchTransformer) or info.get("input") != "latents":
        log.warning("report: %s is not an attention classifier on latents; no attention view", classifier_dir)
        return None
    # Only images the classifier never trained on (its held-out split), when the split is known.
    candidates = [i for i, key in enumerate(table.keys) if heldout_keys is None or key in heldout_keys]
    if not candidates:  # trained on other data: its split says nothing about these images
        heldout_keys, candidates = None, list(range(len(table)))
    chosen = [candidates[i] for i in _one_per_class(table.labels[candidates], num)]
    maps = net.cls_attention(table.inputs[chosen])  # (num, grid, grid)
    with torch.no_grad():
        predicted = net(table.inputs[chosen]).argmax(dim=1)
    classes = table.classes
    captions = [
        f"true {classes[int(table.labels[i])]}\npred {classes[int(p)]}" for i, p in zip(chosen, predicted, strict=True)
    ]
    figures = [("attention", plots.attention_overlays(images[chosen], maps, captions))]
    metrics_path = classifier_dir.parent / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        title = f"held-out confusion matrix (accuracy {metrics['accuracy']:.1%})"
        figures.append(("confusion", plots.confusion(np.array(metrics["confusion"]), metrics["classes"], title)))
    return Section(
        "5. Where does the attention classifier look?",
        "The attention classifier reads the latent as a grid of patches. The heat map shows how much its "
        "summary token attends to each patch (attention rollout over all layers), laid over the original "
        "image: red areas drove the decision most. "
        + ("The images are from its held-out set (never seen in training)." if heldout_keys is not None else ""),
        figures,
    )


def benchmark_section(benchmark_json: Path) -> Section:
    from sdtune.latent.benchmark import table_rows

    saved = json.loads(benchmark_json.read_text())
    settings = saved["settings"]
    return Section(
        "6. Classifiers on latents vs pixels, with and without augmentation",
        f"Held-out accuracy, mean ± standard deviation over seeds {settings['seeds']}, each classifier trained "
        f"on {settings['max_train_per_class']} real images per class plus the augmentation's synthetic samples "
        "('synthetic_only': no real training image at all).",
        table=table_rows(saved["rows"], "accuracy"),
    )


def _heldout_keys(classifier_dir: Path, latents: str, storage: Storage) -> set[str] | None:
    """The keys of the classifier's held-out split (recomputed from the full dataset), if it recorded one."""
    split = json.loads((classifier_dir / "classifier.json").read_text()).get("split")
    if not split:
        return None
    full = read_table(latents, "--latents", storage)
    _, val = heldout_split(full.keys, full.labels, split["val_fraction"], split["split_seed"])
    return {full.keys[i] for i in val}


def _one_per_class(labels: torch.Tensor, num: int) -> list[int]:
    """Indices of up to `num` samples, cycling through the classes (first unused sample of each)."""
    by_class = {int(c): (labels == c).nonzero().flatten().tolist() for c in labels.unique()}
    chosen: list[int] = []
    while len(chosen) < num and any(by_class.values()):
        for members in by_class.values():
            if members and len(chosen) < num:
                chosen.append(members.pop(0))
    return chosen


def report(
    images: str,
    latents: str,
    out: Path = Path("runs/latent_report"),
    classifier: Path | None = None,
    benchmark: Path | None = None,
    max_samples: int = 400,
    num_strip: int = 8,
    seed: int = 0,
    s3: S3Settings | None = None,
) -> Path:
    """Write `<out>/report.html` (self-contained) and `<out>/report.json`.

    Args:
        images: Labelled image shards.
        latents: Their latent shards (data_tools encode_latents); the VAE named in their manifest decodes.
        out: Output folder.
        classifier: An exported attention classifier (`<run>/classifier`) for the attention view.
        benchmark: A `benchmark.json` from `python -m sdtune.latent.benchmark`, shown as a table.
        max_samples: Images analysed (spread evenly over the dataset).
        num_strip: Columns of the image strip and the attention view.
        seed: Seed of embeddings and augmentation draws.
        s3: Settings for s3:// shards (endpoint, retries), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    latent_table = _pick(read_table(latents, "--latents", storage), max_samples)
    settings = latent_table.latent_settings
    if settings is None:
        raise ValueError(f"--latents: {latents} holds images, not latents (data_tools encode_latents makes them)")
    image_table = read_table(images, "--images", storage, image_size=settings.resolution)
    position = {key: i for i, key in enumerate(image_table.keys)}
    missing = [k for k in latent_table.keys if k not in position]
    if missing:
        raise ValueError(f"--images: {len(missing)} latent(s) have no image with the same key, e.g. {missing[0]}")
    pictures = image_table.subset([position[k] for k in latent_table.keys]).inputs
    vae = load_vae_of(settings)
    recon = decode(vae, latent_table.inputs, settings)

    numbers: dict = {"num_samples": len(latent_table), "classes": latent_table.classes, "latents": settings.to_json()}
    sections = [
        reconstruction_section(pictures, recon, numbers),
        structure_section(latent_table, pictures, seed, numbers),
    ]
    augmentation, decoded = augmentation_section(latent_table, vae, recon, seed, numbers)
    sections.append(augmentation)
    columns = _one_per_class(latent_table.labels, num_strip)
    strip_rows = {"original": pictures[columns], "reconstruction": recon[columns]}
    strip_rows |= {name: decoded[name][columns] for name in decoded}
    titles = [latent_table.classes[int(latent_table.labels[i])] for i in columns]
    sections.append(
        Section(
            "4. What the images look like",
            "Top: original images. Then the VAE's reconstructions, then a synthetic image made by each "
            "augmentation from the same original (decoded from latent space).",
            [("image strip", plots.image_strip(strip_rows, titles))],
        )
    )
    if classifier is not None:
        attention = attention_section(
            classifier, latent_table, pictures, num_strip, _heldout_keys(classifier, latents, storage)
        )
        if attention is not None:
            sections.append(attention)
    if benchmark is not None:
        sections.append(benchmark_section(benchmark))

    out.mkdir(parents=True, exist_ok=True)
    page = render_page(sections, settings, len(latent_table), settings.vae)
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "report.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {out / 'report.html'} ({len(page) // 1024} KiB) and {out / 'report.json'}")
    return out / "report.html"


if __name__ == "__main__":
    from jsonargparse import auto_cli

    from sdtune.logs import setup_logging

    setup_logging()
    auto_cli(report, as_positional=False, allow_abbrev=False)
