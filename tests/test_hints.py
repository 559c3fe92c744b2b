"""Every command a user is told to run in an error or warning exists, with the flags the message names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from sdtune.command import COMMANDS

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(
    r"(?:\bsdtune|python -m data_tools|\bdata_tools) "  # the program
    r"((?:[a-z][a-z_-]+)(?: [a-z][a-z_-]+)?)"  # command and subcommand
    r"((?: --[a-z_.-]+(?: [^ ;,)`'\"]+)?)*)"  # flags with their values
)


def _messages(path: Path) -> list[str]:
    """The text of every raise and logging call in a module (f-string placeholders as `{}`)."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text())):
        call = node.exc if isinstance(node, ast.Raise) else node
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if isinstance(node, ast.Raise) or name in ("warning", "error", "info", "exception"):
            parts = [n.value for n in ast.walk(call) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            texts.append("".join(parts))
    return texts


def hinted_commands() -> dict[str, set[str]]:
    """`sdtune` subcommand -> flags, from every message under sdtune/ and data_tools/."""
    found: dict[str, set[str]] = {}
    for path in [*REPO.glob("sdtune/**/*.py"), *REPO.glob("data_tools/*.py")]:
        for text in _messages(path):
            for match in COMMAND.finditer(text):
                words = match.group(1).split()
                if not match.group(0).startswith("sdtune"):  # `[python -m ]data_tools x` is `sdtune data x`
                    words = ["data", words[0].replace("_", "-")]
                if words[0] not in COMMANDS:
                    continue  # prose ("an sdtune shard manifest")
                subcommands = COMMANDS[words[0]].targets
                words = words[:2] if "" not in subcommands else words[:1]
                if len(words) > 1 and words[1] not in subcommands:
                    raise AssertionError(f"{path}: a message names `sdtune {' '.join(words)}`, which does not exist")
                flags = set(re.findall(r"--([a-z_.-]+)", match.group(2)))
                found.setdefault(" ".join(words), set()).update(flags)
    return found


def test_every_hinted_command_and_flag_exists() -> None:
    commands = hinted_commands()
    assert {"data index", "data make-shards", "data encode-latents"} <= set(commands), commands
    for command, flags in sorted(commands.items()):
        result = subprocess.run(
            [sys.executable, "-m", "sdtune", *command.split(), "--help"], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 0, f"`sdtune {command} --help`: {result.stderr[-500:]}"
        for flag in flags:
            named = re.search(rf"--{re.escape(flag)}(?![\w.-])", result.stdout)
            assert named, f"`sdtune {command}` has no --{flag} (named in a message)"
