"""The `sdtune` command: every subcommand listed, lazy imports, no abbreviated options, one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.command import COMMANDS, LIGHTNING, main
from tests.helpers.runs import QUICKSTART, REPO, train_env


def sdtune(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sdtune", *args]
    return subprocess.run(command, cwd=REPO, env=train_env(env), capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_and_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in [*LIGHTNING, *COMMANDS]:
        assert f"  {name} " in text, name
    for command in COMMANDS.values():
        assert all(subcommand in text for subcommand in command.targets)
    assert main([]) == 2  # no command: the usage, and a failure


def test_help_and_make_shards_import_neither_torch_nor_diffusers(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 80, 10, 10)).save(tmp_path / "images" / f"{index}.png")
        (tmp_path / "images" / f"{index}.txt").write_text(f"a red square {index}")
    probe = (
        "import sys\n"
        "from sdtune.command import main\n"
        "assert main(['--help']) == 0\n"
        f"assert main(['data', 'make-shards', '--source', {str(tmp_path / 'images')!r}, '--out', "
        f"{str(tmp_path / 'shards')!r}, '--resolution', '32', '--samples_per_shard', '2']) == 0\n"
        "heavy = ('torch', 'diffusers', 'lightning', 'transformers', 'webdataset')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_unknown_commands_and_abbreviated_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["data", "make-shard"]) == 2
    assert "unknown subcommand 'make-shard'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # --samples_per_sh is not --samples_per_shard
        main(["data", "make-shards", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--samples_per_sh", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --samples_per_sh" in capsys.readouterr().err


@pytest.mark.slow
def test_an_abbreviated_trainer_option_is_refused() -> None:
    result = sdtune("fit", "--config", str(QUICKSTART), "--trainer.max_step", "2", "--print_config")
    assert result.returncode == 2 and "unrecognized arguments: --trainer.max_step 2" in result.stderr


def _broken_manifest(tmp_path: Path, shards: Path) -> list[str]:
    folder = tmp_path / "shards"
    folder.mkdir()
    for tar in shards.glob("*.tar"):
        (folder / tar.name).write_bytes(tar.read_bytes())
    (folder / "manifest.json").write_text("{not json")
    return ["--data.init_args.shards", str(folder)]


USER_MISTAKES = {
    "missing shards folder": (lambda tmp, shards: ["--data.init_args.shards", str(tmp / "nowhere")], "data.shards"),
    "unreadable manifest": (_broken_manifest, "unreadable shard manifest"),
    "hub id not available offline": (
        lambda tmp, shards: ["--data.init_args.shards", str(shards), "--model.init_args.pretrained", "nobody/no-model"],
        "model.pretrained: nobody/no-model is not in the local Hub cache",
    ),
    "wrong --resume folder": (
        lambda tmp, shards: ["--data.init_args.shards", str(shards), "--resume", str(tmp)],
        "--resume",
    ),
    "missing S3 credentials": (
        lambda tmp, shards: ["--data.init_args.shards", "s3://bucket/ds", "--s3.endpoint_url", "http://127.0.0.1:9"],
        "credentials",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", list(USER_MISTAKES))
def test_a_user_mistake_is_one_line_and_exit_2(tmp_path: Path, synth_shards: Path, mistake: str) -> None:
    make_args, named = USER_MISTAKES[mistake]
    no_aws = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    env = {"HF_HUB_OFFLINE": "1", "AWS_EC2_METADATA_DISABLED": "true", **no_aws}
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    result = sdtune(*args, *make_args(tmp_path, synth_shards), env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdtune fit: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and named in errors[0], result.stderr[-3000:]
