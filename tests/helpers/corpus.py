"""Shards as they come from elsewhere: every image mode people scrape, and every way a sample goes bad."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.shard_sink import TarSampleWriter


class Boom:
    """Unpickling this writes a marker file: proof that a pickle member was (or was not) decoded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(seed: int, size: int = 64, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 255, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(array, mode=mode)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _srgb_to_lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    matrix = ((0.4360747, 0.3850649, 0.1430804), (0.2225045, 0.7168786, 0.0606169), (0.0139322, 0.0971045, 0.7141733))
    xyz = [sum(m * c for m, c in zip(row, linear, strict=True)) for row in matrix]
    white = (0.9642, 1.0, 0.8249)

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    fx, fy, fz = (f(v / w) for v, w in zip(xyz, white, strict=True))
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def cmyk_icc_profile() -> bytes:
    """A minimal ICC v2 CMYK output profile (an A2B0 lut8 with 2 grid points, PCS Lab) that maps CMYK to
    the naive formula: enough for littlecms to convert through it (no CMYK profile ships on this machine)."""
    clut = bytearray()
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lab = _srgb_to_lab(((1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)))
                    clut += bytes([round(lab[0] * 255 / 100), *(min(255, max(0, round(v + 128))) for v in lab[1:])])
    ramp = bytes(range(256))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + identity + ramp * 4 + bytes(clut) + ramp * 3
    white = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    text = b"sdtune test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [(b"A2B0", lut), (b"wtpt", white), (b"desc", desc)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"prtrCMYKLab "
        + struct.pack(">6H", 2026, 12, 2, 0, 0, 0)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + bytes(48)
    )
    assert len(header) == 128
    return header + table + data


def without_adobe_marker(jpeg: bytes) -> bytes:
    """A CMYK JPEG without its Adobe APP14 segment (data as stored)."""
    at = jpeg.find(b"\xff\xee")
    length = int.from_bytes(jpeg[at + 2 : at + 4], "big")
    return jpeg[:at] + jpeg[at + 2 + length :]


def decompression_bomb_png(side: int = 30_000) -> bytes:
    """A PNG header declaring side x side pixels (Pillow refuses it on open) with a token of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def convertible_images() -> dict[str, tuple[str, bytes]]:
    """Conversion kind expected -> (extension, bytes), one per kind of image that must be converted, not dropped."""
    cyan = Image.new("CMYK", (64, 64), (255, 0, 0, 0))
    adobe = encode(cyan, "JPEG")  # Pillow writes CMYK JPEGs the Adobe (inverted) way, with the APP14 marker
    inverted = Image.merge("CMYK", [band.point(lambda v: 255 - v) for band in cyan.split()])
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([200, 30, 30] * 128 + [30, 30, 200] * 128)
    palette.info["transparency"] = 1
    la = Image.merge("LA", [Image.new("L", (64, 64), 90), Image.linear_gradient("L").resize((64, 64))])
    return {
        "cmyk_adobe": ("jpg", adobe),
        "cmyk_plain": ("jpg", without_adobe_marker(encode(inverted, "JPEG"))),
        "cmyk_icc": ("jpg", encode(cyan, "JPEG", icc_profile=cmyk_icc_profile())),
        "alpha_la": ("png", encode(la, "PNG")),
        "alpha_rgba": ("png", encode(noise(7, mode="RGBA"), "PNG")),
        "alpha_palette": ("png", encode(palette, "PNG", transparency=1)),
        "high_bit_depth": (
            "png",
            encode(
                Image.linear_gradient("L").resize((64, 64)).convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"
            ),
        ),
    }


CONVERSION_OF = {
    "cmyk_adobe": "cmyk",
    "cmyk_plain": "cmyk",
    "cmyk_icc": "cmyk_icc",
    "alpha_la": "alpha",
    "alpha_rgba": "alpha",
    "alpha_palette": "alpha",
    "high_bit_depth": "high_bit_depth",
}


@dataclass
class Corpus:
    folder: Path
    valid: list[str] = field(default_factory=list)  # shard/key of every sample the loader must yield
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> bad samples
    converted: dict[str, int] = field(default_factory=dict)  # conversion kind -> samples
    marker: Path | None = None


def write_foreign_corpus(folder: Path, marker: Path) -> Corpus:
    """Three shards written without sdtune's tools: 17 plain samples, 7 that need converting (24 valid), 13 bad
    ones and a shard cut inside a member; `.pyd`/`.pth` pickles beside valid samples and alone."""
    folder.mkdir(parents=True)
    corpus = Corpus(folder, marker=marker)
    truncated_jpeg = encode(noise(3), "JPEG")
    bad = [
        ("too_large", {"png": decompression_bomb_png(), "txt": b"a bomb"}),
        ("undecodable_image", {"jpg": b"", "txt": b"zero bytes"}),
        ("undecodable_image", {"jpg": b"<html><body>404 Not Found</body></html>", "txt": b"an html page"}),
        ("undecodable_image", {"jpg": truncated_jpeg[: len(truncated_jpeg) // 2], "txt": b"cut jpeg"}),
        ("missing_caption", {"png": encode(noise(4), "PNG")}),
        ("missing_caption", {"png": encode(noise(5), "PNG"), "json": json.dumps({"tags": ["x"]}).encode()}),
        ("missing_caption", {"pyd": pickle.dumps(Boom(str(marker)))}),
        ("empty_caption", {"png": encode(noise(6), "PNG"), "txt": b"  \n"}),
        ("bad_caption", {"png": encode(noise(8), "PNG"), "txt": b"\xff\xfe\xfa"}),
        ("missing_image", {"txt": b"a caption without its image"}),
        ("too_small", {"png": encode(noise(9, size=8), "PNG"), "txt": b"tiny"}),
        ("undecodable_image", {"webp": b"RIFF\x00\x00\x00\x00WEBPVP8 garbage", "txt": b"bad webp"}),
        ("bad_caption", {"jpg": encode(noise(10), "JPEG"), "json": b"[1, 2]"}),
    ]
    convertible = list(convertible_images().items())
    index = 0
    for shard in range(2):
        name = f"{shard:05d}.tar"  # img2dataset's naming
        writer = TarSampleWriter(folder / name)
        for i in range(7):
            ext = ("png", "jpg", "webp")[i % 3]
            key = f"{index:09d}"
            fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
            sample = {"__key__": key, ext: encode(noise(100 + index), fmt)}
            caption = f"sample {key}"
            sample["json" if i % 2 else "txt"] = json.dumps({"caption": caption}) if i % 2 else caption
            if i == 3:  # pickle members next to a valid sample: ignored, never unpickled
                sample["pyd"] = pickle.dumps(Boom(str(marker)))
                sample["pth"] = pickle.dumps(Boom(str(marker)))
            writer.write(sample)
            corpus.valid.append(f"{name}/{key}")
            index += 1
            if i % 2 == 0 and convertible:  # a convertible image after every other plain one
                kind, (ext, data) = convertible.pop()
                key = f"{index:09d}"
                writer.write({"__key__": key, ext: data, "txt": f"a {kind} image"})
                corpus.valid.append(f"{name}/{key}")
                conversion = CONVERSION_OF[kind]
                corpus.converted[conversion] = corpus.converted.get(conversion, 0) + 1
                index += 1
        for reason, members in bad[shard::2]:
            writer.write({"__key__": f"{index:09d}", **members})
            corpus.skipped[reason] = corpus.skipped.get(reason, 0) + 1
            index += 1
        writer.close()
    assert not convertible
    # A third shard cut short inside a member: the three samples before the cut are kept.
    whole = folder / "whole.tar.tmp"
    writer = TarSampleWriter(whole)
    for i in range(4):
        writer.write({"__key__": f"{index + i:09d}", "png": encode(noise(200 + i), "PNG"), "txt": "from a cut shard"})
    writer.close()
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        cut = tar.getmember(f"{index + 3:09d}.png").offset_data + 100
    (folder / "00002.tar").write_bytes(data[:cut])
    whole.unlink()
    corpus.valid += [f"00002.tar/{index + i:09d}" for i in range(3)]
    corpus.skipped["truncated_shard"] = 1
    return corpus
