"""Every YAML in configs/ parses through the real CLI; each starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.cli import main
from tests.helpers.runs import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "sd15_full.yaml", "sd15_lora.yaml", "sd21_vpred.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# python train.py fit --config configs/" + config.name), first_line
    # --print_config parses and type-checks the whole config (class paths, init args) without building models.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "sdtune.models.SDFineTune" in printed
    assert "sdtune.checkpoint.callback.PeriodicCheckpoint" in printed


def test_bad_option_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.learnin_rate", "1e-4", "--print_config"])
    assert exit_info.value.code != 0
    assert "learnin_rate" in capsys.readouterr().err


def test_vastai_script_checks_credentials_before_doing_anything(tmp_path: Path) -> None:
    import subprocess

    script = REPO / "scripts" / "vastai_onstart.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "SDTUNE_CONFIG": "configs/sd15_lora_r2.yaml", "SDTUNE_WORKDIR": str(tmp_path / "w")}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "AWS_ACCESS_KEY_ID is not set" in result.stderr
    assert not (tmp_path / "w").exists()
