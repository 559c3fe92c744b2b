"""model.pretrained: a path that is missing or incomplete, and a Hub id that is not cached offline, are refused in
one line that says what is missing, without opening a socket; a complete folder loads."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.models.components import load_components, load_vae
from tests.helpers.runs import REPO, train_env


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any attempt to open a connection fails the test (and is recorded)."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise AssertionError(f"a network connection was attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-sd"
    load_components("tiny").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("value", ["models/sd15", "./sd15", "~/no-such-sdtune-model", "/no/such/model"])
def test_missing_folder(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/sd15` is a path because ./models exists, not a Hub id
    with pytest.raises(ValueError, match=rf"model.pretrained: folder {value} not found \(relative paths start at"):
        load_components(value)
    assert not no_network


def test_empty_and_incomplete_folders(tmp_path: Path, tiny_folder: Path, no_network: list) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"missing unet/config.json, unet/\*.safetensors, vae/config.json") as err:
        load_components(str(empty))
    assert "\n" not in str(err.value)
    (tiny_folder / "vae" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "vae.safetensors")
    try:
        with pytest.raises(ValueError, match=r"not a complete diffusers model folder: missing vae/\*.safetensors;"):
            load_components(str(tiny_folder))
        with pytest.raises(ValueError, match=r"missing vae/\*.safetensors"):
            load_vae(str(tiny_folder))
    finally:
        (tmp_path / "vae.safetensors").rename(tiny_folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert not no_network


def test_complete_folder_loads(tiny_folder: Path, no_network: list) -> None:
    components = load_components(str(tiny_folder))
    assert components.unet.config.sample_size == load_components("tiny").unet.config.sample_size
    assert load_vae(str(tiny_folder)).config.latent_channels == components.vae.config.latent_channels


def test_uncached_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"someone/some-model is not in the local Hub cache .* HF_HUB_OFFLINE is set"):
        load_components("someone/some-model")
    assert not no_network


def test_cli_says_it_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "sd15"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtune",
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--model.init_args.pretrained",
            str(folder),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        env=train_env({"HF_HUB_OFFLINE": "1"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdtune fit: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"sdtune fit: error: model.pretrained: folder {folder} not found"), errors[0]
    assert "Traceback" not in result.stderr and "Union" not in errors[0]
