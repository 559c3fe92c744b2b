"""The shard stream on shards written elsewhere: exact epochs on any reader layout (every valid sample once,
each skip counted once, under its reason), conversions, seeded order, resume, and the epoch plan itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sdtune.data.decode import ImageLimits
from sdtune.data.index import index_shards
from sdtune.data.plan import ShardInfo, plan_epoch, samples_per_reader
from sdtune.data.stream import ALL_REASONS, EVENTS, EpochResume, SampleTransform, ShardStream
from sdtune.storage import Storage
from tests.helpers.corpus import Corpus, write_foreign_corpus

LIMITS = ImageLimits(min_side=32, max_pixels=64_000_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("foreign")
    return write_foreign_corpus(root / "shards", root / "unpickled.txt")


@pytest.fixture(scope="module")
def shard_infos(corpus: Corpus) -> list[ShardInfo]:
    urls = sorted(str(p) for p in corpus.folder.glob("*.tar"))
    scans = index_shards(urls, Storage(), LIMITS, None)
    return [scan.entry.shard_info(url) for scan, url in zip(scans, urls, strict=True)]


def make_stream(
    infos: list[ShardInfo],
    *,
    world_size: int = 1,
    rank: int = 0,
    workers: int = 1,
    batch: int = 1,
    remainder: str = "wrap",
    seed: int = 0,
) -> ShardStream:
    transform = SampleTransform(resolution=32, limits=LIMITS, flip_prob=0.5)
    return ShardStream(
        infos, batch, workers, rank, world_size, transform, Storage(), seed=seed, shuffle_buffer=8, remainder=remainder
    )


def run_epoch(
    infos: list[ShardInfo], world_size: int, workers: int, batch: int, remainder: str, epoch: int = 0
) -> tuple[list[str], Counter]:
    """Every reader of every rank through one epoch: the keys yielded and the counts each reader ended with."""
    keys: list[str] = []
    counts: Counter = Counter()
    for rank in range(world_size):
        stream = make_stream(infos, world_size=world_size, rank=rank, workers=workers, batch=batch, remainder=remainder)
        stream.epoch = epoch
        for worker in range(workers):
            samples = list(stream.worker_samples(worker))
            assert len(samples) == stream.batches_per_worker * batch
            keys += [s["key"] for s in samples]
            counts.update(dict(zip(ALL_REASONS, samples[-1]["data_bad"].tolist(), strict=True)))
    return keys, counts


@pytest.mark.parametrize(
    ("world_size", "workers", "batch", "remainder"),
    [(1, 1, 1, "wrap"), (2, 2, 3, "wrap"), (1, 4, 2, "drop"), (2, 2, 4, "drop"), (3, 2, 4, "wrap"), (1, 2, 4, "wrap")],
)
def test_every_valid_sample_once_per_epoch_and_every_skip_once(
    corpus: Corpus, shard_infos: list[ShardInfo], world_size: int, workers: int, batch: int, remainder: str
) -> None:
    """3 shards (24 valid samples) on 1 to 8 readers: the readers share shards by sample index; `wrap`
    repeats exactly the shortfall, `drop` leaves out exactly the remainder; skips and conversions are counted
    once per epoch, over two epochs, and no pickle is ever loaded."""
    num_readers = world_size * workers
    used = samples_per_reader(24, num_readers, batch, remainder) * num_readers
    for epoch in range(2):
        keys, counts = run_epoch(shard_infos, world_size, workers, batch, remainder, epoch)
        assert len(keys) == used
        if remainder == "wrap":
            assert set(keys) == set(corpus.valid), "a valid sample was never yielded"
            assert len(keys) - len(set(keys)) == used - 24, "repeats beyond the stated wrap-around"
        else:
            assert len(set(keys)) == len(keys) and set(keys) <= set(corpus.valid)
        skipped = {
            r: counts[r] for r in ALL_REASONS if counts[r] and r not in EVENTS and not r.startswith("converted_")
        }
        assert skipped == corpus.skipped, f"epoch {epoch}"
        if remainder == "wrap":  # every sample yielded: each conversion counted once, repeats not again
            assert {r.removeprefix("converted_"): n for r, n in counts.items() if r.startswith("converted_") and n} == (
                corpus.converted
            )
        assert all(counts[e] == 0 for e in EVENTS), "an extra pass or reopen on local shards"
    assert not corpus.marker.exists(), "a pickle member was unpickled"


def test_drop_leaves_out_a_different_window_each_epoch(shard_infos: list[ShardInfo]) -> None:
    left_out = [set(run_epoch(shard_infos, 1, 2, 5, "drop", epoch)[0]) for epoch in range(3)]
    assert all(len(keys) == 20 for keys in left_out)
    assert len({frozenset(keys) for keys in left_out}) > 1


def test_samples_are_converted_and_decoded(corpus: Corpus, shard_infos: list[ShardInfo]) -> None:
    stream = make_stream(shard_infos, batch=24)
    samples = {s["key"]: s for s in stream.worker_samples(0)}
    assert sorted(samples) == sorted(corpus.valid)
    assert all(s["pixel_values"].shape == (3, 32, 32) for s in samples.values())
    assert all(
        -1.0 <= float(s["pixel_values"].min()) <= float(s["pixel_values"].max()) <= 1.0 for s in samples.values()
    )
    captions = {s["caption"]: s for s in samples.values()}
    cyan = [
        captions[f"a {kind} image"]["pixel_values"].mean(dim=(1, 2))
        for kind in ("cmyk_adobe", "cmyk_plain", "cmyk_icc")
    ]
    for colour in cyan:  # (0, 255, 255) in [-1, 1], whichever way the CMYK was stored
        assert colour[0] < -0.8 and colour[1] > 0.8 and colour[2] > 0.8, colour
    assert next(s for k, s in samples.items() if k.endswith("/000000002"))["caption"] == "sample 000000002"  # .json


def test_order_is_seeded(shard_infos: list[ShardInfo]) -> None:
    def keys(seed: int, epoch: int = 0) -> list[str]:
        stream = make_stream(shard_infos, seed=seed, batch=4)
        stream.epoch = epoch
        return [s["key"] for s in stream.worker_samples(0)]

    first = keys(0)
    assert keys(0) == first
    assert keys(1) != first and sorted(keys(1)) == sorted(first)
    assert keys(0, epoch=1) != first


@pytest.mark.parametrize("stop", [1, 5, 9])
def test_resume_continues_the_stream(shard_infos: list[ShardInfo], stop: int) -> None:
    """Two workers of one rank over 3 shards: after `stop` batches, a resumed stream yields the rest exactly."""
    stream = make_stream(shard_infos, workers=2, batch=2)
    full = {w: list(stream.worker_samples(w)) for w in range(2)}
    batches = [full[b % 2][(b // 2) * 2 : (b // 2) * 2 + 2] for b in range(stream.batches_per_worker * 2)]
    done = batches[:stop]
    last = {b % 2: done[b][-1] for b in range(stop)}  # each worker's last consumed sample
    stream.resume = EpochResume(
        epoch=0,
        batches_done=stop,
        positions={w: s["data_position"] for w, s in last.items()},
        bad_counts={w: s["data_bad"].tolist() for w, s in last.items()},
    )
    rest = {w: list(stream.worker_samples(w)) for w in range(2)}  # physical w plays logical (w + stop) % 2
    resumed = [
        rest[(b - stop) % 2][((b - stop) // 2) * 2 : ((b - stop) // 2) * 2 + 2] for b in range(stop, len(batches))
    ]
    assert [[s["key"] for s in b] for b in resumed] == [[s["key"] for s in b] for b in batches[stop:]]
    assert all(
        a["pixel_values"].equal(b["pixel_values"])
        for x, y in zip(resumed, batches[stop:], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    for physical in range(2):  # each reader ends with the counts of the uninterrupted epoch
        if rest[physical]:
            logical = (physical + stop) % 2
            assert rest[physical][-1]["data_bad"].tolist() == full[logical][-1]["data_bad"].tolist()


def test_too_few_samples_for_the_readers_is_a_clear_error(shard_infos: list[ShardInfo]) -> None:
    with pytest.raises(ValueError, match=r"data.batch_size: 24 valid samples .* 8 readers .* data.remainder: wrap"):
        make_stream(shard_infos, world_size=2, workers=4, batch=4, remainder="drop")


def _random_shards(rng: np.random.Generator) -> list[ShardInfo]:
    shards = []
    for index in range(int(rng.integers(1, 6))):
        num_raw = int(rng.integers(0, 40))
        bad = {int(p): "undecodable_image" for p in np.flatnonzero(rng.random(num_raw) < 0.2)}
        shards.append(ShardInfo(f"s{index}.tar", num_raw - len(bad), num_raw, bad))
    return shards


def test_plan_partitions_every_epoch(seed: int = 0) -> None:
    """200 random layouts: the kept ranges cover each valid sample once (plus the stated repeats), and the
    counted ranges cover each bad sample exactly once."""
    rng = np.random.default_rng(seed)
    checked = 0
    while checked < 200:
        shards = _random_shards(rng)
        total = sum(s.num_valid for s in shards)
        readers, batch, remainder = int(rng.integers(1, 9)), int(rng.integers(1, 5)), str(rng.choice(["wrap", "drop"]))
        if total == 0 or samples_per_reader(total, readers, batch, remainder) == 0:
            continue
        plan = plan_epoch(shards, readers, batch, remainder, seed=3, epoch=int(rng.integers(0, 5)))
        valid_seen: Counter = Counter()
        bad_counted: Counter = Counter()
        for reader in range(readers):
            kept = 0
            for segment in plan.segments[reader]:
                shard = shards[segment.shard]
                for position in range(segment.raw_start, segment.raw_end):
                    if position in shard.bad:
                        bad_counted[(segment.shard, position)] += segment.count
                    else:
                        valid_seen[(segment.shard, position)] += 1
                        kept += 1
            for segment in plan.counted_only[reader]:
                for position in range(segment.raw_start, segment.raw_end):
                    if position in shards[segment.shard].bad:
                        bad_counted[(segment.shard, position)] += 1
            assert kept == plan.per_reader
        all_bad = {(i, p) for i, s in enumerate(shards) for p in s.bad}
        assert set(bad_counted) == all_bad and set(bad_counted.values()) <= {1}
        assert sum(valid_seen.values()) == plan.per_reader * readers
        assert sum(n - 1 for n in valid_seen.values()) == plan.repeated
        assert len(valid_seen) == total - plan.dropped
        checked += 1


def test_our_shards_read_with_plain_webdataset(synth_shards: Path) -> None:
    dataset = wds.WebDataset(str(synth_shards / "shard-{000000..000003}.tar"), shardshuffle=False)
    samples = list(dataset)
    assert len(samples) == 64
    assert {"jpg", "txt", "json"} <= set(samples[0])
    assert json.loads(samples[0]["json"])["caption"] == samples[0]["txt"].decode()
