"""Training against remote storage, end to end: shards streamed from S3 (through injected faults, under R2's
header rules), checkpoints published to S3 and the Hub every epoch, a kill during an upload, a resume on an
empty disk, and no credential anywhere it should not be."""

from __future__ import annotations

import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

from data_tools.remote import upload
from sdtune.checkpoint.layout import list_checkpoints, verify_checkpoint
from sdtune.checkpoint.publish import PUBLISH_LOG
from sdtune.checkpoint.remote import StorageRemote
from sdtune.storage import Storage
from tests.helpers.assertions import read_losses
from tests.helpers.hub_server import HubServer
from tests.helpers.runs import QUICKSTART, kill_when, run_train, train_config, with_settings
from tests.helpers.s3_fault_proxy import FaultProxy, Faults

pytestmark = pytest.mark.slow
EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}
DATA_STATS = {"class_path": "sdtune.callbacks.data_stats.DataStats"}
FINAL_STEP = 48  # 3 epochs of 16 batches


def checkpoints(**init_args: object) -> dict:
    args = {"every_n_epochs": 1, "keep_last": 2, "remote_keep_last": 2, **init_args}
    return {"class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint", "init_args": args}


def unet_weights(folder: Path) -> dict:
    return {n: load_file(folder / n / "diffusion_pytorch_model.safetensors") for n in ("unet", "unet_ema")}


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory, synth_shards: Path) -> Path:
    """Uninterrupted, from local shards, no remote: the run every remote variant must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(train_config(run_dir, synth_shards, callbacks=[EMA, checkpoints()], max_epochs=3))
    return run_dir


def test_kill_during_upload_then_resume_on_an_empty_disk(
    tmp_path: Path, synth_shards: Path, s3_server: str, s3_storage: Storage, s3_bucket: str, local_reference: Path
) -> None:
    upload(synth_shards, f"s3://{s3_bucket}/datasets/synth", s3=s3_storage.s3)  # direct, not through the faults
    remote_url = f"s3://{s3_bucket}/runs/r1/checkpoints"
    faults = Faults(error_every=7, cut_first_get="drop", r2_mode=True, put_delay_s=0.05)
    callbacks = [EMA, DATA_STATS, checkpoints(remote=remote_url)]
    with FaultProxy(int(s3_server.rsplit(":", 1)[1]), faults) as proxy:
        # Multipart from 1 MiB, so the 17 MB UNet file is a multipart upload when the kill lands.
        s3_settings = {"endpoint_url": proxy.url, "multipart_threshold_mib": 1, "multipart_chunk_mib": 5}

        def config_for(run_dir: Path) -> Path:
            config = train_config(run_dir, f"s3://{s3_bucket}/datasets/synth", callbacks=callbacks, max_epochs=3)
            return with_settings(config, s3=s3_settings)

        first = tmp_path / "box1" / "run"
        uploading_second = "/runs/r1/checkpoints/epoch%3D0001-step%3D000032/"

        # Killed once a part of a multipart upload of the second checkpoint has arrived (whichever file it is).
        def uploading_a_part() -> bool:
            return any(p.startswith("PUT") and uploading_second in p and "partNumber=" in p for p in faults.paths)

        kill_when(config_for(first), uploading_a_part)
        # The first remote checkpoint is complete; the second one is partial and does not count.
        remote = StorageRemote(remote_url, keep_last=2, storage=s3_storage)
        direct = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        assert remote.complete_tags() == ["epoch=0000-step=000016"]
        assert direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "the kill left a multipart upload"

        second = tmp_path / "box2" / "run"  # a new machine: nothing on local disk
        result = run_train(config_for(second), "--resume", "auto")
    assert "downloaded s3://" in result.stderr and "epoch=0000-step=000016" in result.stderr
    assert "aborted 1 unfinished multipart upload" in result.stderr
    assert not direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert remote.complete_tags() == ["epoch=0002-step=000048", "epoch=0001-step=000032"]

    # Per-step losses after the resume and the final weights equal the uninterrupted local run, bitwise.
    expected, resumed = read_losses(local_reference), read_losses(second)
    assert sorted(resumed) == list(range(16, FINAL_STEP))
    assert all(resumed[step] == [expected[step][0]] for step in resumed)
    (final,) = [r for r in list_checkpoints(second / "checkpoints") if r.step == FINAL_STEP]
    (reference,) = [r for r in list_checkpoints(local_reference / "checkpoints") if r.step == FINAL_STEP]
    assert verify_checkpoint(final.path) is None
    got, want = unet_weights(final.path), unet_weights(reference.path)
    assert all(got[f][k].equal(want[f][k]) for f in want for k in want[f])

    # Faults were met, retried and counted; nothing was refused under R2 rules.
    assert faults.counts["http_503"] > 0 and faults.counts["cut_drop"] > 0 and faults.counts["r2_rejected"] == 0
    reopens = [line for line in (second / "csv").rglob("metrics.csv") for line in line.read_text().splitlines()]
    assert reopens and "data/shard_reopen" in reopens[0]
    publish_log = [yaml.safe_load(line) for line in (second / "checkpoints" / PUBLISH_LOG).read_text().splitlines()]
    published = [r for r in publish_log if r["event"] == "publish"]
    assert len(published) == 2 and all(r["error"] is None for r in published)


SENTINELS = {
    "AWS_ACCESS_KEY_ID": "SENTINELAKIDa1b2c3d4",
    "AWS_SECRET_ACCESS_KEY": "SENTINEL-secret-9f8e7d6c5b4a",
    "HF_TOKEN": "hf_SENTINELtoken0123456789",
    "WANDB_API_KEY": "SENTINELwandb0123456789abcdef0123456789ab",
}


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


@pytest.mark.hub
def test_hub_publishing_resume_from_hub_and_no_secrets_anywhere(
    tmp_path: Path, synth_shards: Path, s3_server: str, s3_bucket: str, local_reference: Path
) -> None:
    run_dir = tmp_path / "run"
    repo = "sdtune-tester/tiny-fine-tune"
    callbacks = [EMA, checkpoints(remote=f"s3://{s3_bucket}/runs/r2/checkpoints", hub_repo=repo, hub_private=True)]
    config = train_config(run_dir, synth_shards, callbacks=callbacks, max_epochs=2)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["logger"] = yaml.safe_load(QUICKSTART.read_text())["trainer"]["logger"]  # wandb, offline
    data["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    config.write_text(yaml.safe_dump(data))
    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy, HubServer() as hub:
        with_settings(config, s3={"endpoint_url": proxy.url})
        hub.state.rate_limit_commits = 1
        env = SENTINELS | {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
        result = run_train(config, env=env)

        # Hub: one commit per checkpoint, a 429 retried, safetensors only, a model card.
        titles = [c.title for c in hub.state.history(repo)]
        assert titles == ["sdtune checkpoint epoch=0001-step=000032", "sdtune checkpoint epoch=0000-step=000016",
                          "initial commit"]  # fmt: skip
        assert hub.state.counts["commit_429"] == 1 and hub.state.counts["lfs_uploads"] > 0
        files = hub.state.repos[repo].resolve("main").files
        assert "README.md" in files and "checkpoints/epoch=0001-step=000032/training_state.safetensors" in files
        assert all(
            p.endswith((".safetensors", ".json", ".jsonl", ".png", ".md")) or p.startswith("tokenizer/") for p in files
        ), sorted(files)
        card = hub.state.file_bytes(repo, "README.md").decode()
        assert "library_name: diffusers" in card and "checkpoints/epoch=0001-step=000032/samples.png" in card

        # The published weights load with plain diffusers and equal the local checkpoint.
        folder = Path(snapshot_download(repo, endpoint=hub.url, cache_dir=tmp_path / "dl", token=False))
        tag = "epoch=0001-step=000032"
        downloaded = UNet2DConditionModel.from_pretrained(folder / "checkpoints" / tag / "unet_ema")
        local = load_file(run_dir / "checkpoints" / tag / "unet_ema" / "diffusion_pytorch_model.safetensors")
        assert all(downloaded.state_dict()[k].equal(v) for k, v in local.items())
        # hub_root's default (newest): the repository root is a complete pipeline of the newest checkpoint.
        root = StableDiffusionPipeline.from_pretrained(folder)
        assert all(root.unet.state_dict()[k].equal(v) for k, v in local.items())
        assert "## The model at the root" in card

        # Secrets: the credentials were used (positive controls) but appear nowhere they could leak.
        assert any(SENTINELS["HF_TOKEN"] in h for h in hub.state.auth_headers)
        assert any(SENTINELS["AWS_ACCESS_KEY_ID"] in h for h in proxy.faults.authorizations)
        needles = [v.encode() for v in SENTINELS.values()]
        assert list((run_dir / "wandb").glob("offline-run-*")), "the offline wandb run is part of the scan"
        assert _files_containing(run_dir, needles) == []
        assert _files_containing(config.parent, needles) == []
        assert not any(n.decode() in result.stdout + result.stderr for n in needles)
        assert not any(n in blob for blob in hub.state.blobs.values() for n in needles)
        assert not any(n.decode() in t for t in titles for n in needles)
        direct = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        keys = [o["Key"] for o in direct.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys and not any(
            n in direct.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys for n in needles
        )

        # A new machine with only the Hub as remote resumes from the Hub's newest checkpoint, exactly.
        fresh = tmp_path / "box2" / "run"
        config2 = train_config(fresh, synth_shards, callbacks=[EMA, checkpoints(hub_repo=repo)], max_epochs=3)
        resumed = run_train(config2, "--resume", "auto", env=env)
        assert f"downloaded hf://{repo}@main/checkpoints/epoch=0001-step=000032" in resumed.stderr
        expected, seen = read_losses(local_reference), read_losses(fresh)
        assert sorted(seen) == list(range(32, FINAL_STEP))
        assert all(seen[step] == [expected[step][0]] for step in seen)
    assert (
        subprocess.run(["grep", "-rl", SENTINELS["HF_TOKEN"], str(tmp_path / "hf")], capture_output=True).stdout == b""
    )
