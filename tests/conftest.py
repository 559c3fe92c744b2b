"""Fixtures: tiny synthetic shards and digit latents, the local S3 server. Helpers live in tests/helpers."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_tools.make_shards import make_shards
from data_tools.synth import synth
from sdtune.storage import Storage
from sdtune.storage.settings import S3Settings
from tests.helpers.ports import S3_CREDENTIALS, free_port

# A test that uses one of these fixtures needs that real component, and gets its marker (see pyproject.toml).
COMPONENT_FIXTURES = {"s3_server": "s3", "slurm": "slurm"}


# The slowest files (minutes each, measured by `make test --durations`) run first: `make test` hands whole files
# to its two workers in collection order, and a slow file collected last (alphabetically: test_sweep,
# test_slurm, test_quickstart) left one worker running it alone at the end.
SLOW_FILES_FIRST = (
    "tests/checkpoint/test_resume_chains.py",
    "tests/research/test_tiny_model.py",
    "tests/test_gpu_check.py",
    "tests/test_quickstart.py",
    "tests/test_slurm.py",
    "tests/test_sweep.py",
    "tests/generate/test_guided.py",
    "tests/serve/test_serve.py",
    "tests/test_ddp.py",
    "tests/test_fsdp.py",
    "tests/eval/test_eval.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in COMPONENT_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep order


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic 64x64 captioned images in 4 shards of 16, with a manifest."""
    root = tmp_path_factory.mktemp("synth")
    synth(root / "images", num_images=64, size=64, seed=0)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=16)
    return root / "shards"


@pytest.fixture(scope="session")
def one_shard_30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small end of a dataset-size sweep: 30 synthetic 64x64 captioned images in one shard."""
    root = tmp_path_factory.mktemp("thirty")
    synth(root / "images", num_images=30, size=64, seed=3)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=30)
    return root / "shards"


@pytest.fixture(scope="session")
def pink_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's data (as `make quickstart` draws it): 64 pink shapes, a colour tiny-pretrained never
    saw, in 4 shards of 16."""
    root = tmp_path_factory.mktemp("pink")
    shapes = ["circle", "square", "triangle", "diamond", "cross"]
    synth(
        root / "images",
        num_images=64,
        size=64,
        seed=0,
        colors=["pink"],
        shapes=shapes,
        sizes=["small", "medium", "large"],
        jitter=0.15,
    )
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=16)
    return root / "shards"


@pytest.fixture(scope="session")
def digit_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """15 of sklearn's digits per class at 64 px: labelled image shards and latent shards (4x16x16) from
    tiny-pretrained's VAE, a real learned latent space (these digits were in its training set)."""
    from data_tools.digits import digits
    from data_tools.encode_latents import encode_latents

    root = tmp_path_factory.mktemp("digits")
    digits(root / "images", size=64, max_per_class=15)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=50, class_folders=True)
    encode_latents(str(root / "shards"), str(root / "latents"), vae="tiny-pretrained", batch_size=32)
    return root / "shards", root / "latents"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for name, value in S3_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the local S3 server (named after the test, one per parametrization)."""
    import boto3

    readable = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t-{readable}-{zlib.crc32(request.node.nodeid.encode()):08x}"  # parametrized tests differ in the hash
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_settings(s3_server: str) -> S3Settings:
    """S3 settings for the local server, as a config's `s3:` section would give them."""
    return S3Settings(endpoint_url=s3_server)


@pytest.fixture
def s3_storage(s3_settings: S3Settings) -> Storage:
    """The storage an in-process test reads and writes the local S3 server through."""
    return Storage(s3_settings)
