"""Turn images with captions into square WebDataset shards plus a dataset manifest.

Input is a folder of images with `.txt` sidecar captions (`cat.jpg` + `cat.txt`), a CSV/JSONL file with
`path` and `caption` columns (paths relative to the file), or existing tar shards (a `.tar`, a folder of
them, a glob or brace pattern, local or s3:// / hf://) to re-shard. Output: `shard-000000.tar`, ... each
holding `<key>.jpg`, `<key>.txt` and `<key>.json` (caption and source), and `manifest.json`. Images are
converted to RGB by the loader's rules (CMYK through its ICC profile, transparency on a background colour,
16-bit scaled to 8 bits); only images that cannot be decoded, or are too small or too large, are skipped.

With `--class_folders`, the folder holds one subfolder per class (`digits/3/0001.png`): each sample also
gets `<key>.cls` (the class index, classes sorted by name) and `label`/`class_name` in its `.json`, the
manifest lists the class names, and an image without a caption gets `--caption_template`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data_tools.shard_sink import ShardSink
from sdtune.data.decode import (
    IMAGE_EXTS,
    LABEL_EXT,
    WANTED_EXTS,
    BadSample,
    ImageLimits,
    decode_caption,
    decode_image_converted,
    parse_colour,
    resize_crop_flip_image,
)
from sdtune.data.manifest import DatasetManifest
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.storage import Storage, is_remote

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _from_folder(folder: Path) -> Iterator[tuple[Path, str | None]]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = path.with_suffix(".txt")
        yield path, caption_path.read_text(encoding="utf-8", errors="replace") if caption_path.exists() else None


def captions_without_image(folder: Path) -> list[str]:
    """`.txt` files in a folder of images that no image shares a name with."""
    images = {p.with_suffix("") for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.txt") if p.with_suffix("") not in images)


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


@dataclass(frozen=True)
class Item:
    """One input sample: where it came from, its image (a file, or bytes from a shard) and caption."""

    name: str
    image: Path | bytes | None
    image_ext: str
    caption: str | None
    label: str | None = None  # class name (class folders) or index (a shard's .cls)
    reason: str | None = None  # already known to be bad (a shard sample's caption)


def is_shard_source(source: str) -> bool:
    """Tar shards (a .tar, a pattern, a remote prefix, or a folder holding .tar files and no images)."""
    if "{" in source or source.endswith(".tar") or is_remote(source) or any(ch in source for ch in "*?["):
        return True
    folder = Path(source)
    return folder.is_dir() and any(folder.glob("*.tar")) and not any(_from_folder(folder))


def _from_shards(spec: str, storage: Storage, skipped: Counter[str]) -> Iterator[Item]:
    urls = storage.expand_urls(spec)
    if not urls:
        raise ValueError(f"make_shards --source: no .tar shards match {spec!r}; check the path or pattern")
    for url in urls:
        errors: dict[str, int] = {}
        with storage.open_read(url) as stream:
            for raw in iter_tar_samples(stream, url, WANTED_EXTS, errors):
                name = f"{os.path.basename(url)}/{raw['__key__']}"
                ext = next((e for e in IMAGE_EXTS if e in raw), "")
                image = raw.get(ext) if ext else None
                label = raw.get(LABEL_EXT)
                label_text = label.decode("ascii", "replace").strip() if isinstance(label, bytes) else None
                try:
                    caption, reason = decode_caption(raw), None
                except BadSample as bad:
                    caption, reason = None, bad.reason
                assert image is None or isinstance(image, bytes)
                yield Item(name, image, ext, caption, label_text, reason)
        skipped.update(errors)


def list_inputs(source: Path) -> list[tuple[Path, str | None]]:
    if source.is_dir():
        return list(_from_folder(source))
    if source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        return list(_from_table(source))
    raise ValueError(
        f"make_shards --source: {source} is neither a folder of images, a .csv/.jsonl file, nor .tar shards"
    )


def _prepare(job: tuple[Item, int, ImageLimits]) -> tuple[bytes, str, str | None] | str:
    """Resize/crop one image to JPEG bytes (with its caption and conversion), or return why it was skipped."""
    item, resolution, limits = job
    if item.reason is not None:
        return item.reason
    if item.caption is None or not item.caption.strip():
        return "missing_caption" if item.caption is None else "empty_caption"
    if item.image is None:
        return "missing_image"
    try:
        data = item.image.read_bytes() if isinstance(item.image, Path) else item.image
    except OSError:
        return "unreadable_file"
    try:
        image, conversion = decode_image_converted({item.image_ext: data}, limits)
    except BadSample as bad:
        return bad.reason
    image = resize_crop_flip_image(image, resolution, np.random.default_rng(0), random_crop=False, flip_prob=0.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), item.caption.strip(), conversion


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def make_shards(
    source: str,
    out: Path,
    resolution: int = 512,
    samples_per_shard: int = 1000,
    min_image_side: int | None = None,
    max_image_pixels: int = 64_000_000,
    alpha_background: str = "white",
    num_workers: int = 1,
    class_folders: bool = False,
    caption_template: str = "a photo of a {label}",
) -> DatasetManifest:
    """Write shards of `samples_per_shard` samples and a manifest; report what was skipped, converted and unpaired.

    Args:
        source: Folder of images with .txt captions, a .csv/.jsonl with path and caption columns, or tar shards
            to re-shard (a .tar file, a folder of them, a glob or brace pattern; local, s3:// or hf://).
        out: Output folder for the shards and manifest.json.
        resolution: Side of the square images written (shorter side resized, then center crop).
        samples_per_shard: Samples per tar file.
        min_image_side: Skip images whose shorter side is smaller (default: resolution // 2).
        max_image_pixels: Skip images with more pixels than this (decompression-bomb guard).
        alpha_background: Colour that transparent images are flattened on.
        num_workers: Processes that decode and resize images.
        class_folders: `source` has one subfolder per class; write class labels (`.cls`) and the class list.
        caption_template: With class_folders, the caption of an image that has no .txt (`{label}`: class name).
    """
    if samples_per_shard < 1 or resolution < 8:
        raise ValueError("make_shards: --samples_per_shard must be >= 1 and --resolution >= 8")
    limits = ImageLimits(
        min_side=resolution // 2 if min_image_side is None else min_image_side,
        max_pixels=max_image_pixels,
        background=parse_colour(alpha_background, "make_shards --alpha_background"),
    )
    skipped: Counter[str] = Counter()
    unpaired: list[str] = []
    classes: list[str] | None = None
    if is_shard_source(str(source)):
        if class_folders:
            raise ValueError("make_shards --class_folders: needs a folder of class subfolders, not tar shards")
        items: Iterator[Item] = _from_shards(str(source), Storage(), skipped)
    else:
        folder = Path(source)
        inputs = list_inputs(folder)
        classes = class_names(folder) if class_folders else None
        unpaired = captions_without_image(folder) if folder.is_dir() else []
        items = iter(_items(folder, inputs, classes, caption_template))
    out.mkdir(parents=True, exist_ok=True)
    converted: Counter[str] = Counter()
    sink = ShardSink(out, samples_per_shard, resolution)
    num_written = 0
    with Pool(num_workers) if num_workers > 1 else _Serial() as pool:
        for chunk in _chunks(items, 64 * max(1, num_workers)):  # bounded: shards may hold more than memory does
            results = pool.imap(_prepare, [(item, resolution, limits) for item in chunk], chunksize=8)
            for item, result in zip(chunk, results, strict=True):
                if isinstance(result, str):
                    skipped[result] += 1
                    log.info("skipped %s: %s", item.name, result)
                    continue
                jpeg, caption, conversion = result
                if conversion is not None:
                    converted[conversion] += 1
                sink.write(_sample(num_written, jpeg, caption, item, classes))
                num_written += 1
    if num_written == 0:
        raise ValueError(f"make_shards: no usable image in {source} (skipped: {dict(skipped)})")
    manifest = sink.close(dict(skipped), classes, converted=dict(converted))
    no_caption = skipped.get("missing_caption", 0)
    print(
        f"wrote {num_written} samples in {len(manifest.shards)} shards to {out}; skipped {sum(skipped.values())}: "
        f"{dict(sorted(skipped.items()))}; converted {dict(sorted(converted.items())) or 'none'}; "
        f"images without a caption: {no_caption}; captions without an image: {len(unpaired)}"
        + (f" ({', '.join(unpaired[:5])}{', ...' if len(unpaired) > 5 else ''})" if unpaired else "")
    )
    return manifest


def _items(folder: Path, inputs: list[tuple[Path, str | None]], classes: list[str] | None, template: str) -> list[Item]:
    items = []
    for path, caption in inputs:
        label = path.relative_to(folder).parts[0] if classes is not None else None
        if label is not None and caption is None:
            caption = template.format(label=label)
        name = str(path.relative_to(folder)) if folder.is_dir() else str(path)
        items.append(Item(name, path, path.suffix.lower().lstrip("."), caption, label))
    return items


def _sample(index: int, jpeg: bytes, caption: str, item: Item, classes: list[str] | None) -> dict:
    sample: dict = {
        "__key__": f"{index:09d}",
        "jpg": jpeg,
        "txt": caption,
        "json": {"caption": caption, "source": item.name},
    }
    if classes is not None and item.label is not None:
        label_index = classes.index(item.label)
        sample["cls"] = str(label_index)
        sample["json"] |= {"label": label_index, "class_name": item.label}
    elif item.label is not None and item.label.isdigit():  # a re-sharded labelled shard keeps its labels
        sample["cls"] = item.label
        sample["json"]["label"] = int(item.label)
    return sample


class _Serial:
    """Pool stand-in for num_workers=1 (no processes)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(fn, items, chunksize: int = 1):
        return map(fn, items)
