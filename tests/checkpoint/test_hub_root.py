"""The Hub repository's root pipeline (`hub_root`), against the Hub-protocol server with the real client: the best
checkpoint by an eval.json metric takes the root and a worse one does not, a restarted publisher remembers the
root, a LoRA checkpoint's root UNet has the adapter fused in, and the root loads with plain diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import snapshot_download

from sdtune.checkpoint.hub_root import RootRule, replaces_root
from sdtune.models.components import load_components
from tests.helpers.hub_server import HubServer
from tests.helpers.runs import REPO, train_env

REPO_ID = "sdtune-tester/root"

# Runs in its own process: huggingface_hub reads HF_ENDPOINT when it is imported.
PUBLISH = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from sdtune.checkpoint.hub_root import RootRule
    from sdtune.checkpoint.layout import write_manifest
    from sdtune.checkpoint.remote import HubRemote
    from sdtune.models.sd_finetune import SDFineTune
    from sdtune.storage import Storage

    work, mode, rule = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    scores = [float(s) for s in sys.argv[4].split(",")]
    module = SDFineTune(pretrained="tiny", train_mode=mode, lora_rank=4)
    remote = HubRemote(REPO_ID, "main", 2, Storage(), True, True, RootRule.parse(rule), module.save_base_pipeline)
    remote.prepare()
    print("ROOT_AT_START", json.dumps(remote.root_state))
    for index, fd in enumerate(scores):
        step = int(sys.argv[5]) + 8 * index
        tag = f"epoch={step // 8:04d}-step={step:06d}"
        torch.manual_seed(step)
        with torch.no_grad():
            for param in module.trainable_parameters().values():
                param.add_(torch.randn_like(param) * 0.05)
        folder = work / "checkpoints" / f".publish-{tag}"
        folder.mkdir(parents=True)
        module.export_weights(folder, "_ema")
        (folder / "eval.json").write_text(json.dumps({"metrics": {"fd": fd}, "higher_is_better": {"fd": False}}))
        write_manifest(folder, {"epoch": step // 8, "step": step, "base_model": "tiny", "train_mode": mode})
        remote.publish(folder, tag, "---\\nlibrary_name: diffusers\\n---\\n# root\\n\\n## Samples\\n")
        if mode == "lora":  # what the fused root UNet must compute: the adapter's output on a fixed input
            generator = torch.Generator().manual_seed(0)
            sample = torch.randn(1, 4, 8, 8, generator=generator)
            text = torch.randn(1, 77, module.unet.config.cross_attention_dim, generator=generator)
            with torch.no_grad():
                out = module.unet(sample, torch.tensor([500]), text).sample
            torch.save({"sample": sample, "text": text, "out": out}, work / f"expected-{tag}.pt")
    """
).replace("REPO_ID", repr(REPO_ID))


def publish(hub: HubServer, work: Path, mode: str, rule: str, scores: str, first_step: int) -> str:
    env = train_env({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test", "HF_HOME": str(work)})
    result = subprocess.run(
        [sys.executable, "-c", PUBLISH, str(work), mode, rule, scores, str(first_step)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def root_record(hub: HubServer) -> dict:
    return json.loads(hub.state.file_bytes(REPO_ID, "sdtune_root.json"))


def test_replaces_root_follows_the_rule_and_the_metrics_direction() -> None:
    best_fd = RootRule.parse("best:fd")
    lower = (5.0, False)
    assert replaces_root(best_fd, None, None), "an empty root takes any checkpoint"
    assert replaces_root(best_fd, {"value": 6.0}, lower) and not replaces_root(best_fd, {"value": 4.0}, lower)
    assert replaces_root(best_fd, {"value": None}, lower), "a scored checkpoint replaces an unscored root"
    assert not replaces_root(best_fd, {"value": 6.0}, None), "an unscored checkpoint never replaces a scored root"
    assert replaces_root(RootRule.parse("best:checker_all"), {"value": 0.4}, (0.5, True))
    assert replaces_root(RootRule.parse("newest"), {"value": 1.0}, None)
    assert not replaces_root(RootRule.parse("none"), None, None)
    for bad in ("best:", "oldest", "best"):
        with pytest.raises(ValueError, match="hub_root: .* is not none, newest or best:<metric>"):
            RootRule.parse(bad)


@pytest.mark.hub
def test_the_best_checkpoint_by_fd_is_the_root_pipeline_and_stays_so_after_a_restart(tmp_path: Path) -> None:
    with HubServer() as hub:
        out = publish(hub, tmp_path, "full", "best:fd", "10,12,8", 8)
        assert "ROOT_AT_START null" in out
        assert root_record(hub)["checkpoint"] == "epoch=0003-step=000024" and root_record(hub)["value"] == 8.0
        titles = [c.title for c in hub.state.history(REPO_ID)]
        assert len(titles) == 4  # the initial commit and one per checkpoint
        root_unets = [c.files.get("unet/diffusion_pytorch_model.safetensors") for c in hub.state.history(REPO_ID)]
        # Newest first: step 24 (fd 8) took the root, step 16 (fd 12) did not, step 8 (fd 10) did.
        assert root_unets[0] != root_unets[1] and root_unets[1] == root_unets[2] and root_unets[2] is not None
        # The first root commit brought the base model's VAE, text encoder, tokenizer and scheduler.
        first = hub.state.history(REPO_ID)[2].files
        assert {
            "model_index.json",
            "vae/config.json",
            "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json",
        } <= set(first)

        # A restarted publisher reads the root's record: fd 9 does not beat 8, fd 7 does.
        out = publish(hub, tmp_path / "again", "full", "best:fd", "9,7", 32)
        assert '"value": 8.0' in out.split("ROOT_AT_START", 1)[1].splitlines()[0]
        assert root_record(hub)["checkpoint"] == "epoch=0005-step=000040"
        card = hub.state.file_bytes(REPO_ID, "README.md").decode()
        assert "## The model at the root" in card and "`epoch=0005-step=000040`" in card and "(7)" in card

        folder = Path(snapshot_download(REPO_ID, endpoint=hub.url, cache_dir=tmp_path / "dl", token=False))
        pipe = StableDiffusionPipeline.from_pretrained(folder)  # the root alone is a complete pipeline
        history = folder / "checkpoints" / "epoch=0005-step=000040" / "unet_ema"
        from safetensors.torch import load_file

        expected = load_file(history / "diffusion_pytorch_model.safetensors")
        assert all(pipe.unet.state_dict()[k].equal(v) for k, v in expected.items())


@pytest.mark.hub
def test_a_lora_checkpoints_root_unet_has_the_adapter_fused_in(tmp_path: Path) -> None:
    with HubServer() as hub:
        publish(hub, tmp_path, "lora", "newest", "1,1", 8)
        assert root_record(hub)["checkpoint"] == "epoch=0002-step=000016"
        folder = Path(snapshot_download(REPO_ID, endpoint=hub.url, cache_dir=tmp_path / "dl", token=False))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    expected = torch.load(tmp_path / "expected-epoch=0002-step=000016.pt", weights_only=True)
    with torch.no_grad():
        out = pipe.unet(expected["sample"], torch.tensor([500]), expected["text"]).sample
    assert (out - expected["out"]).abs().max() < 1e-4, "the root UNet computes what the base UNet + LoRA computes"
    base = load_components("tiny").unet
    with torch.no_grad():
        plain = base(expected["sample"], torch.tensor([500]), expected["text"]).sample
    assert (plain - expected["out"]).abs().max() > 1e-3, "control: the adapter changes the base UNet's output"
