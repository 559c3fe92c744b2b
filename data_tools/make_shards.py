"""Turn images with captions into square WebDataset shards plus a dataset manifest.

Input is a folder of images with `.txt` sidecar captions (`cat.jpg` + `cat.txt`), or a CSV/JSONL file
with `path` and `caption` columns (paths relative to the file). Output: `shard-000000.tar`, ... each
holding `<key>.jpg`, `<key>.txt` and `<key>.json` (caption and source path), and `manifest.json`.

With `--class_folders`, the folder holds one subfolder per class (`digits/3/0001.png`): each sample also
gets `<key>.cls` (the class index, classes sorted by name) and `label`/`class_name` in its `.json`, the
manifest lists the class names, and an image without a caption gets `--caption_template`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data_tools.shard_sink import ShardSink
from sdtune.data.decode import BadSample, ImageLimits, decode_image, resize_crop_flip_image
from sdtune.data.manifest import DatasetManifest

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _from_folder(folder: Path) -> Iterator[tuple[Path, str | None]]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = path.with_suffix(".txt")
        yield path, caption_path.read_text(encoding="utf-8", errors="replace") if caption_path.exists() else None


def class_names(folder: Path) -> list[str]:
    """The subfolders of `folder` that hold images, sorted: their order gives the class indices."""
    names = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))
    )
    if len(names) < 2:
        raise ValueError(
            f"make_shards --class_folders: {folder} needs one subfolder of images per class; found {names or 'none'}"
        )
    return names


def _from_table(table: Path) -> Iterator[tuple[Path, str | None]]:
    if table.suffix.lower() == ".csv":
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if "path" not in row:
            raise ValueError(f"{table}: row {number} has no 'path' column (columns: {sorted(row)})")
        yield table.parent / row["path"], row.get("caption")


def list_inputs(source: Path) -> list[tuple[Path, str | None]]:
    if source.is_dir():
        return list(_from_folder(source))
    if source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        return list(_from_table(source))
    raise ValueError(f"make_shards --source: {source} is neither a folder of images nor a .csv/.jsonl file")


def _prepare(job: tuple[Path, str | None, int, int]) -> tuple[bytes, str] | str:
    """Resize/crop one image to JPEG bytes, or return the reason it was skipped."""
    path, caption, resolution, min_side = job
    if caption is None or not caption.strip():
        return "missing_caption" if caption is None else "empty_caption"
    try:
        raw = {path.suffix.lower().lstrip("."): path.read_bytes()}
    except OSError:
        return "unreadable_file"
    try:
        image = decode_image(raw, ImageLimits(min_side=min_side, max_pixels=64_000_000))
    except BadSample as bad:
        return bad.reason
    image = resize_crop_flip_image(image, resolution, np.random.default_rng(0), random_crop=False, flip_prob=0.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), caption.strip()


def make_shards(
    source: Path,
    out: Path,
    resolution: int = 512,
    samples_per_shard: int = 1000,
    min_image_side: int | None = None,
    num_workers: int = 1,
    class_folders: bool = False,
    caption_template: str = "a photo of a {label}",
) -> DatasetManifest:
    """Write shards of `samples_per_shard` samples and a manifest; report what was skipped and why.

    Args:
        source: Folder of images with .txt captions, or a .csv/.jsonl with path and caption columns.
        out: Output folder for the shards and manifest.json.
        resolution: Side of the square images written (shorter side resized, then center crop).
        samples_per_shard: Samples per tar file.
        min_image_side: Skip images whose shorter side is smaller (default: resolution // 2).
        num_workers: Processes that decode and resize images.
        class_folders: `source` has one subfolder per class; write class labels (`.cls`) and the class list.
        caption_template: With class_folders, the caption of an image that has no .txt (`{label}`: class name).
    """
    if samples_per_shard < 1 or resolution < 8:
        raise ValueError("make_shards: samples_per_shard must be >= 1 and resolution >= 8")
    inputs = list_inputs(source)
    classes = class_names(source) if class_folders else None
    labels: list[str | None] = [None] * len(inputs)
    if classes is not None:
        labels = [path.relative_to(source).parts[0] for path, _ in inputs]
        inputs = [
            (path, caption if caption is not None else caption_template.format(label=label))
            for (path, caption), label in zip(inputs, labels, strict=True)
        ]
    out.mkdir(parents=True, exist_ok=True)
    min_side = resolution // 2 if min_image_side is None else min_image_side
    jobs = [(path, caption, resolution, min_side) for path, caption in inputs]
    skipped: Counter[str] = Counter()
    sink = ShardSink(out, samples_per_shard, resolution)
    num_written = 0
    with Pool(num_workers) if num_workers > 1 else _Serial() as pool:
        results = pool.imap(_prepare, jobs, chunksize=8)
        for (path, _, _, _), label, result in zip(jobs, labels, results, strict=True):
            if isinstance(result, str):
                skipped[result] += 1
                log.info("skipped %s: %s", path, result)
                continue
            jpeg, caption = result
            source_name = str(path.relative_to(source)) if source.is_dir() else str(path)
            sample = {
                "__key__": f"{num_written:09d}",
                "jpg": jpeg,
                "txt": caption,
                "json": {"caption": caption, "source": source_name},
            }
            if classes is not None and label is not None:
                index = classes.index(label)
                sample["cls"] = str(index)
                sample["json"] |= {"label": index, "class_name": label}
            sink.write(sample)
            num_written += 1
    if num_written == 0:
        raise ValueError(f"make_shards: no usable image in {source} (skipped: {dict(skipped)})")
    manifest = sink.close(dict(skipped), classes)
    print(
        f"wrote {num_written} samples in {len(manifest.shards)} shards to {out}; skipped {sum(skipped.values())}: "
        f"{dict(sorted(skipped.items()))}"
    )
    return manifest


class _Serial:
    """Pool stand-in for num_workers=1 (no processes)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(fn, items, chunksize: int = 1):
        return map(fn, items)
