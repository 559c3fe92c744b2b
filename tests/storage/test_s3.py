"""The s3:// backend against a real S3 API on 127.0.0.1 (moto's server), directly and through a fault proxy."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError

from data_tools.remote import upload, verify
from sdtune.checkpoint.layout import MANIFEST
from sdtune.checkpoint.remote import StorageRemote
from sdtune.data.decode import ImageLimits
from sdtune.data.plan import ShardInfo
from sdtune.data.stream import SampleTransform, ShardStream
from sdtune.storage import Storage, reopen_count
from sdtune.storage.settings import S3Settings
from tests.helpers.runs import run_train, train_config
from tests.helpers.s3_fault_proxy import FaultProxy, Faults


def _object(tmp_path: Path, size: int = 3 * 1024 * 1024 + 7) -> Path:
    path = tmp_path / "object.bin"
    path.write_bytes(np.random.default_rng(0).bytes(size))
    return path


def test_roundtrip_under_r2_rules(tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    """Every operation sdtune uses works when the server refuses the newer checksum headers, as R2 did."""
    local = _object(tmp_path)
    with FaultProxy(int(s3_server.rsplit(":", 1)[1]), Faults(r2_mode=True)) as proxy:
        storage = Storage(S3Settings(endpoint_url=proxy.url, multipart_threshold_mib=1, multipart_chunk_mib=5))
        url = f"s3://{s3_bucket}/ds/part.bin"
        storage.upload(local, url, {"sha256": "x"})  # multipart: 3 MiB over a 1 MiB threshold
        storage.upload(local, f"s3://{s3_bucket}/ds/sub/other.bin")
        assert storage.walk(f"s3://{s3_bucket}/ds") == {"part.bin": local.stat().st_size, "sub/other.bin": 3145735}
        assert storage.expand_urls(f"s3://{s3_bucket}/ds/", ".bin") == [url]
        assert storage.expand_urls(f"s3://{s3_bucket}/ds/p*.bin", ".bin") == [url]
        assert storage.exists(url) and storage.exists(f"s3://{s3_bucket}/ds") and not storage.exists(url + "x")
        assert storage.backend_for(url).head(url)["metadata"] == {"sha256": "x"}
        assert storage.read_bytes(url) == local.read_bytes()
        storage.download(url, tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
        storage.delete([url])
        assert not storage.exists(url)
        with pytest.raises(FileNotFoundError, match="no such object"):
            storage.read_bytes(url)
        assert proxy.faults.counts["r2_rejected"] == 0

        # The proxy's R2 mode is real: botocore's default checksum settings fail against it.
        default = boto3.client(
            "s3", endpoint_url=proxy.url, region_name="auto", config=Config(retries={"max_attempts": 1})
        )
        with pytest.raises(ClientError, match="NotImplemented"):
            default.put_object(Bucket=s3_bucket, Key="ds/default.bin", Body=b"abc")
        assert proxy.faults.counts["r2_rejected"] >= 1


@pytest.mark.parametrize("cut", ["drop", "short"])
def test_reads_reopen_after_cut_bodies(
    tmp_path: Path, s3_server: str, s3_storage: Storage, s3_bucket: str, cut: str
) -> None:
    local = _object(tmp_path)
    s3_storage.upload(local, f"s3://{s3_bucket}/obj.bin")
    with FaultProxy(int(s3_server.rsplit(":", 1)[1]), Faults(cut_first_get=cut)) as proxy:
        storage = Storage(S3Settings(endpoint_url=proxy.url))
        with storage.open_read(f"s3://{s3_bucket}/obj.bin") as stream:
            data = stream.read()
            reopens = reopen_count(stream)
    assert data == local.read_bytes()
    assert proxy.faults.counts[f"cut_{cut}"] == 1 and reopens == 1


def test_server_errors_are_retried_and_counted(tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    local = _object(tmp_path, 100_000)
    with FaultProxy(int(s3_server.rsplit(":", 1)[1]), Faults(error_every=1, errors_first=2)) as proxy:
        storage = Storage(S3Settings(endpoint_url=proxy.url))
        storage.upload(local, f"s3://{s3_bucket}/a.bin")
        assert storage.read_bytes(f"s3://{s3_bucket}/a.bin") == local.read_bytes()
        assert storage.walk(f"s3://{s3_bucket}/") == {"a.bin": 100_000}
    assert proxy.faults.counts["http_503"] >= 3 and proxy.faults.counts["http_500"] >= 3
    assert storage.backend_for("s3://any").stats["retries"] >= 6


def test_missing_credentials_error_names_the_variables(
    s3_settings: S3Settings, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    storage = Storage(s3_settings)  # a new client, which looks up credentials again
    with pytest.raises(PermissionError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        storage.walk(f"s3://{s3_bucket}/")


def test_stream_from_s3_through_faults_equals_local(
    synth_shards: Path, s3_server: str, s3_settings: S3Settings, s3_bucket: str
) -> None:
    upload(synth_shards, f"s3://{s3_bucket}/ds", s3=s3_settings)
    transform = SampleTransform(resolution=64, limits=ImageLimits(min_side=32, max_pixels=10**7))

    def samples(urls: list[str], storage: Storage) -> list[tuple[str, bytes]]:
        shards = [ShardInfo.all_valid(u, 16) for u in urls]
        stream = ShardStream(shards, 4, num_workers=1, rank=0, world_size=1, transform=transform, storage=storage)
        return [(s["key"], s["pixel_values"].numpy().tobytes()) for s in stream]

    local = samples(Storage().expand_urls(str(synth_shards)), Storage())
    faults = Faults(error_every=3, cut_first_get="drop", cut_min_bytes=1024, r2_mode=True)
    with FaultProxy(int(s3_server.rsplit(":", 1)[1]), faults) as proxy:
        storage = Storage(S3Settings(endpoint_url=proxy.url))
        remote = samples(storage.expand_urls(f"s3://{s3_bucket}/ds"), storage)
    assert remote == local and len(local) == 64
    # (a first GET answered 503 is not also cut, so not every shard is cut)
    assert faults.counts["cut_drop"] >= 2 and faults.counts["http_503"] > 0 and faults.counts["r2_rejected"] == 0


def test_upload_skips_identical_and_verify_finds_corruption(
    synth_shards: Path, s3_settings: S3Settings, s3_storage: Storage, s3_bucket: str
) -> None:
    dest = f"s3://{s3_bucket}/datasets/synth"
    assert upload(synth_shards, dest, s3=s3_settings) == {"uploaded": 4, "skipped_identical": 0}
    assert upload(synth_shards, dest, s3=s3_settings) == {"uploaded": 0, "skipped_identical": 4}
    assert len(verify(dest, s3=s3_settings)["ok"]) == 4
    client = s3_storage.backend_for(dest).client()
    shard = sorted(p.name for p in synth_shards.glob("*.tar"))[1]
    client.put_object(Bucket=s3_bucket, Key=f"datasets/synth/{shard}", Body=b"not a tar")
    client.delete_object(
        Bucket=s3_bucket, Key=f"datasets/synth/{sorted(p.name for p in synth_shards.glob('*.tar'))[2]}"
    )
    with pytest.raises(SystemExit):
        verify(dest, s3=s3_settings)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        verify(f"s3://{s3_bucket}/datasets/none", s3=s3_settings)


def _fake_checkpoint(root: Path, tag: str) -> Path:
    folder = root / tag
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(os.urandom(1000))
    (folder / "training_state.safetensors").write_bytes(os.urandom(500))
    (folder / MANIFEST).write_text("{}")
    return folder


def test_remote_keeps_last_k_and_ignores_incomplete(tmp_path: Path, s3_storage: Storage, s3_bucket: str) -> None:
    storage = s3_storage
    remote = StorageRemote(f"s3://{s3_bucket}/run/checkpoints", keep_last=2, storage=storage)
    client = storage.backend_for(remote.url).client()
    # An upload cut short by a kill: files but no manifest, and an unfinished multipart upload.
    storage.upload(_object(tmp_path, 10), f"s3://{s3_bucket}/run/checkpoints/epoch=0000-step=000008/unet/w.safetensors")
    client.create_multipart_upload(Bucket=s3_bucket, Key="run/checkpoints/epoch=0000-step=000008/big")
    remote.prepare()
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert remote.complete_tags() == []
    for step in (16, 32, 48):
        tag = f"epoch=0000-step={step:06d}"
        remote.publish(_fake_checkpoint(tmp_path / "local", tag), tag, "card")
    assert remote.complete_tags() == ["epoch=0000-step=000048", "epoch=0000-step=000032"]
    assert {name.split("/")[0] for name in storage.walk(remote.url)} == set(remote.complete_tags())


@pytest.mark.slow
def test_validate_reads_shards_from_s3_with_the_configs_settings(
    tmp_path: Path, synth_shards: Path, s3_server: str, s3_settings: S3Settings, s3_bucket: str
) -> None:
    """`train.py validate` honours the config's `s3:` section as `fit` does (it was ignored before)."""
    dest = f"s3://{s3_bucket}/datasets/synth"
    upload(synth_shards, dest, s3=s3_settings)
    config = train_config(tmp_path / "run", synth_shards, callbacks=[], data={"val_shards": dest})
    settings = yaml.safe_load(config.read_text())
    settings["data"]["init_args"]["shards"] = dest
    settings["s3"] = {"endpoint_url": s3_server}
    config.write_text(yaml.safe_dump(settings))
    result = run_train(config, subcommand="validate")
    assert "val/loss" in result.stdout + result.stderr, result.stderr[-3000:]
