"""The shard stream: bad samples skipped and counted per reason, seeded order, no pickle decoded, resume."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sdtune.data.decode import ImageLimits
from sdtune.data.stream import ALL_REASONS, EpochResume, SampleTransform, ShardStream
from sdtune.storage import Storage


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle member was (or was not) decoded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(seed: int, size: int = 48) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(array)


def write_bad_corpus(folder: Path, marker: Path) -> tuple[list[str], dict[str, int]]:
    """Two shards mixing valid samples with every kind of bad one; returns valid keys and expected counts."""
    folder.mkdir(parents=True)
    valid: list[str] = []
    expected = dict.fromkeys(ALL_REASONS, 0)
    bad_samples = [
        ("missing_caption", {"png": _encode(_rgb(1), "PNG")}),
        ("empty_caption", {"png": _encode(_rgb(2), "PNG"), "txt": b"   \n"}),
        ("missing_caption", {"png": _encode(_rgb(3), "PNG"), "json": json.dumps({"tags": ["x"]}).encode()}),
        ("bad_caption", {"png": _encode(_rgb(4), "PNG"), "txt": b"\xff\xfe\xfa"}),
        ("undecodable_image", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken"}),
        ("missing_image", {"txt": b"caption without image"}),
        ("bad_mode", {"jpg": _encode(_rgb(5).convert("CMYK"), "JPEG"), "txt": b"cmyk"}),
        ("bad_mode", {"png": _encode(_rgb(6).convert("LA"), "PNG"), "txt": b"la"}),
        ("bad_mode", {"png": _encode(Image.new("I;16", (48, 48), 1000), "PNG"), "txt": b"16 bit"}),
        ("too_small", {"png": _encode(_rgb(7, size=8), "PNG"), "txt": b"tiny"}),
        ("too_large", {"png": _encode(Image.new("RGB", (400, 400)), "PNG"), "txt": b"giant"}),
    ]
    index = 0
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard:06d}.tar")) as writer:
            for i in range(12):
                key = f"s{index:04d}"
                index += 1
                fmt = ("PNG", "JPEG", "WEBP")[i % 3]
                caption = f"sample {key}"
                sample = {"__key__": key, fmt.lower().replace("jpeg", "jpg"): _encode(_rgb(index), fmt)}
                if i % 2:
                    sample["json"] = json.dumps({"caption": caption}).encode()
                else:
                    sample["txt"] = caption.encode()
                if i == 3:  # a pickle member next to a valid sample: must be ignored, never unpickled
                    sample["pyd"] = pickle.dumps(_Boom(str(marker)))
                    sample["pth"] = pickle.dumps(_Boom(str(marker)))
                writer.write(sample)
                valid.append(f"shard-{shard:06d}.tar/{key}")
            for reason, members in bad_samples[shard::2]:
                writer.write({"__key__": f"bad{index:04d}", **members})
                index += 1
                expected[reason] += 1
    # A third shard cut short in the middle of a member: the samples before the cut are kept.
    whole = folder / "whole.tar"
    with wds.TarWriter(str(whole)) as writer:
        for i in range(4):
            writer.write({"__key__": f"t{i}", "png": _encode(_rgb(100 + i), "PNG"), "txt": b"truncated shard"})
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        cut = tar.getmember("t3.png").offset_data + 100  # inside the last sample's image
    (folder / "shard-000002.tar").write_bytes(data[:cut])
    whole.unlink()
    valid += [f"shard-000002.tar/t{i}" for i in range(3)]
    expected["truncated_shard"] = 1
    return valid, expected


def make_stream(folder: Path, seed: int = 0, batch_size: int = 1, counts: list[int] | None = None) -> ShardStream:
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    transform = SampleTransform(resolution=32, limits=ImageLimits(min_side=16, max_pixels=100_000), flip_prob=0.5)
    return ShardStream(
        urls,
        counts or [18, 18, 3],
        batch_size=batch_size,
        num_workers=1,
        rank=0,
        world_size=1,
        transform=transform,
        storage=Storage(),
        seed=seed,
        shuffle_buffer=8,
    )


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, list[str], dict[str, int], Path]:
    marker = tmp_path / "unpickled.txt"
    valid, expected = write_bad_corpus(tmp_path / "shards", marker)
    return tmp_path / "shards", valid, expected, marker


def test_bad_samples_are_skipped_and_counted(corpus) -> None:
    folder, valid, expected, marker = corpus
    # One reader over all three shards, asked for one sample more than the valid ones: it reads the whole
    # first pass (so every bad sample is met and counted) and takes one sample from a second pass.
    stream = make_stream(folder, counts=[len(valid) + 1, 0, 0])
    stream.assignment = [[0, 1, 2]]
    samples = list(stream)
    assert sorted(s["key"] for s in samples[:-1]) == sorted(valid)
    assert not marker.exists(), "a pickle member was unpickled"
    counts = dict(zip(ALL_REASONS, samples[-1]["data_bad"].tolist(), strict=True))
    assert counts["truncated_shard"] == 1 and counts["extra_pass"] == 1
    num_raw_first_pass = len(valid) + sum(expected.values()) - expected["truncated_shard"]
    extra = {r: counts[r] - expected[r] for r in expected if r not in ("truncated_shard", "extra_pass")}
    # Bad samples met in the second pass before its first valid one are counted again, nothing else.
    assert all(v >= 0 for v in extra.values()), counts
    assert sum(extra.values()) == samples[-1]["data_position"] - num_raw_first_pass - 1, counts
    assert all(s["pixel_values"].shape == (3, 32, 32) for s in samples)
    assert all(-1.0 <= float(s["pixel_values"].min()) and float(s["pixel_values"].max()) <= 1.0 for s in samples)
    assert next(s for s in samples if s["key"].endswith("/s0001"))["caption"] == "sample s0001"  # from .json


def test_order_is_seeded(corpus) -> None:
    folder, valid, _, _ = corpus

    def keys(seed: int, epoch: int = 0) -> list[str]:
        stream = make_stream(folder, seed=seed, counts=[len(valid), 0, 0])
        stream.assignment = [[0, 1, 2]]
        stream.epoch = epoch
        return [s["key"] for s in stream]

    first = keys(0)
    assert keys(0) == first
    assert keys(1) != first and sorted(keys(1)) == sorted(first)
    assert keys(0, epoch=1) != first


def test_resume_continues_the_stream(corpus) -> None:
    folder, valid, _, _ = corpus
    stream = make_stream(folder, counts=[len(valid), 0, 0])
    stream.assignment = [[0, 1, 2]]
    full = list(stream)
    k = 10
    stream.resume = EpochResume(
        epoch=0,
        batches_done=k,
        positions={0: full[k - 1]["data_position"]},
        bad_counts={0: full[k - 1]["data_bad"].tolist()},
    )
    rest = list(stream)
    assert [s["key"] for s in rest] == [s["key"] for s in full[k:]]
    assert all(a["pixel_values"].equal(b["pixel_values"]) for a, b in zip(rest, full[k:], strict=True))
    assert rest[-1]["data_bad"].tolist() == full[-1]["data_bad"].tolist()


def test_too_few_shards_for_readers_is_a_clear_error(corpus) -> None:
    folder, _, _, _ = corpus
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    transform = SampleTransform(resolution=32, limits=ImageLimits(16, 100_000))
    with pytest.raises(ValueError, match="data.shards: 3 shard"):
        ShardStream(urls, [18, 18, 3], 1, num_workers=2, rank=0, world_size=2, transform=transform, storage=Storage())


def test_our_shards_read_with_plain_webdataset(synth_shards: Path) -> None:
    dataset = wds.WebDataset(str(synth_shards / "shard-{000000..000003}.tar"), shardshuffle=False)
    samples = list(dataset)
    assert len(samples) == 64
    assert {"jpg", "txt", "json"} <= set(samples[0])
    assert json.loads(samples[0]["json"])["caption"] == samples[0]["txt"].decode()
