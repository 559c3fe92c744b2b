"""make_shards from a folder with sidecar captions and from CSV/JSONL; skipped inputs are reported."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.make_shards import make_shards
from data_tools.synth import synth
from sdtune.data.manifest import read_manifest
from sdtune.fileio import sha256_file
from sdtune.storage import Storage
from tests.helpers.corpus import write_foreign_corpus


def test_folder_with_sidecars_and_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = synth(tmp_path / "images", num_images=10, size=64, seed=1)
    (source / "000003.txt").unlink()  # missing caption
    (source / "000004.txt").write_text("  ")  # empty caption
    (source / "000005.png").write_bytes(b"not a png")  # undecodable
    Image.new("RGB", (64, 64)).convert("CMYK").save(source / "cmyk.jpg")
    (source / "cmyk.txt").write_text("a cmyk image")
    Image.new("RGB", (10, 10)).save(source / "tiny.png")
    (source / "tiny.txt").write_text("too small")
    (source / "orphan.txt").write_text("a caption whose image is gone")
    manifest = make_shards(str(source), tmp_path / "shards", resolution=32, samples_per_shard=3)
    assert manifest.num_samples == 8 and [s.num_samples for s in manifest.shards] == [3, 3, 2]
    assert manifest.skipped == {"missing_caption": 1, "empty_caption": 1, "undecodable_image": 1, "too_small": 1}
    assert manifest.converted == {"cmyk": 1}
    summary = capsys.readouterr().out
    assert "images without a caption: 1; captions without an image: 1 (orphan.txt)" in summary
    assert read_manifest(str(tmp_path / "shards"), Storage()).num_samples == 8
    for entry in manifest.shards:
        assert sha256_file(tmp_path / "shards" / entry.name) == entry.sha256
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "shard-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 8
    image = Image.open(io.BytesIO(samples[0]["jpg"]))
    assert image.size == (32, 32)
    assert json.loads(samples[0]["json"])["source"] == "000000.png"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_table_input(tmp_path: Path, suffix: str) -> None:
    synth(tmp_path / "images", num_images=4, size=64, seed=2)
    rows = [{"path": f"images/{i:06d}.png", "caption": f"caption {i}"} for i in range(4)]
    table = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        table.write_text("path,caption\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows))
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = make_shards(str(table), tmp_path / "shards", resolution=32, samples_per_shard=10)
    assert manifest.num_samples == 4
    captions = [s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"))]
    assert captions == [f"caption {i}" for i in range(4)]


def test_bad_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="make_shards --source"):
        make_shards(str(tmp_path / "nothing.txt"), tmp_path / "out")


def test_reshard_foreign_shards(tmp_path: Path) -> None:
    """Tar shards as the source: every convertible image kept and converted, every bad sample reported by
    reason, into smaller shards that the loader trusts without reading them."""
    corpus = write_foreign_corpus(tmp_path / "foreign", tmp_path / "unpickled.txt")
    manifest = make_shards(str(corpus.folder), tmp_path / "small", resolution=64, samples_per_shard=5)
    assert manifest.num_samples == 24 and [s.num_samples for s in manifest.shards] == [5, 5, 5, 5, 4]
    assert manifest.skipped == corpus.skipped
    assert manifest.converted == corpus.converted
    sources = [json.loads(s["json"])["source"] for s in wds.WebDataset(str(tmp_path / "small" / "shard-000000.tar"))]
    assert sources[0] == "00000.tar/000000000"
    assert not corpus.marker.exists()
