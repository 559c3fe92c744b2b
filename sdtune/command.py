"""`sdtune <command>`: one console command for everything sdtune does.

    sdtune fit|validate|test --config X.yaml [--resume auto]     LightningCLI (the same as `python train.py`)
    sdtune data make-shards|index|verify|upload|subsets|encode-latents|synth|digits ...
    sdtune sweep plan|run|report ...      sdtune slurm render ...      sdtune bench ...
    sdtune bench-remote ...               sdtune latent benchmark|report|baselines ...
    sdtune gpu-check --out DIR [--dry_run true]     sdtune tiny-model [--out DIR]
    sdtune eval CHECKPOINT... --prompts FILE --seeds 0,1,2 [--base] --out DIR
    sdtune generate interpolate --a IMG --b IMG [--target IMG --guidance_scale 0.2] --out DIR

Each command's module is imported only when that command runs, so `sdtune --help` and `sdtune data
make-shards` start without torch. A user mistake (a bad path or option value, an unreadable manifest,
missing credentials) prints one line and exits 2; `--debug` or `SDTUNE_DEBUG=1` shows the traceback.
Options are never abbreviated: a misspelt one is refused.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sdtune.logs import setup_logging


@dataclass(frozen=True)
class Command:
    help: str
    targets: dict[str, str]  # subcommand -> "module:function"; {"": ...} for a command without subcommands

    def target(self, subcommand: str) -> Callable:
        module, function = self.targets[subcommand].split(":")
        return getattr(importlib.import_module(module), function)


def _targets(module: str, names: dict[str, str]) -> dict[str, str]:
    return {subcommand: f"{module}:{function}" for subcommand, function in names.items()}


COMMANDS = {
    "data": Command(
        "make, check and move datasets",
        {
            "make-shards": "data_tools.make_shards:make_shards",
            "index": "data_tools.index:index",
            "verify": "data_tools.remote:verify",
            "upload": "data_tools.remote:upload",
            "subsets": "data_tools.subsets:subsets",
            "encode-latents": "data_tools.encode_latents:encode_latents",
            "synth": "data_tools.synth:synth",
            "digits": "data_tools.digits:digits",
        },
    ),
    "sweep": Command(
        "dataset-size sweeps", _targets("sdtune.sweep", {"plan": "plan", "run": "run", "report": "report"})
    ),
    "slurm": Command("sbatch scripts from a config", {"render": "sdtune.slurm:render"}),
    "bench": Command(
        "training, overhead and data-pipeline throughput (bench serve: a load test of sdtune serve)",
        {"": "sdtune.bench:main"},
    ),
    "gpu-check": Command("the recipe table of a CUDA machine (--dry_run true: on CPU)", {"": "sdtune.gpu_check:main"}),
    "bench-remote": Command("S3/R2 loader and checkpoint publishing", {"": "sdtune.bench_remote:main"}),
    "tiny-model": Command(
        "re-train tiny-pretrained from scratch (make tiny-model)", {"": "sdtune.research.tiny_model.recipe:tiny_model"}
    ),
    "latent": Command(
        "latent-space studies",
        {
            "benchmark": "sdtune.latent.benchmark:benchmark",
            "report": "sdtune.latent.report:report",
            "baselines": "sdtune.latent.sklearn_baselines:main",
        },
    ),
}
# Commands with their own argparse parser (positional lists, bare flags): they get the arguments as they are.
RAW = {
    "eval": Command("score checkpoints against each other and the base model", {"": "sdtune.eval.cli:main"}),
    "generate": Command("latent interpolation refined and guided by the UNet", {"": "sdtune.generate.cli:main"}),
    "serve": Command("the web app and generation API on one model", {"": "sdtune.serve.cli:main"}),
    "export": Command("ONNX text encoder and VAE decoder (hybrid client)", {"": "sdtune.serve.onnx_export:main"}),
    "client": Command("hybrid client: encode and decode here, denoise on a server", {"": "sdtune.serve.client:main"}),
}
LIGHTNING = {"fit": "train a model", "validate": "validation loss of a model", "test": "test a model"}


def usage() -> str:
    lines = ["usage: sdtune <command> [options]   (sdtune <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<13} {text} (LightningCLI, as python train.py)" for name, text in LIGHTNING.items()]
    for name, command in {**COMMANDS, **RAW}.items():
        subcommands = " | ".join(n for n in command.targets if n)
        lines.append(f"  {name:<13} {command.help}" + (f": {subcommands}" if subcommands else ""))
    lines += ["", "--debug (or SDTUNE_DEBUG=1) shows the traceback of an error"]
    return "\n".join(lines)


def is_user_error(err: BaseException) -> bool:
    """Errors that mean "fix your input": they get one line, not a traceback."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, ValueError | OSError) or bool(names & {"NoCredentialsError", "PartialCredentialsError"})


# jsonargparse reports an error raised while building a `class_path` object as a failure to match each type of
# the option's Union; the model's own message is the first of those errors.
_UNION_ERRORS = re.compile(r"Does not validate against any of the Union subtypes .*? Errors: - (.*?) - Expected a ")


def user_message(err: BaseException) -> str:
    """One line for the user: the library's message on one line, or the object's own message inside it."""
    message = " ".join(str(err).split())
    match = _UNION_ERRORS.search(message)
    return match.group(1) if match else message


def run(name: str, args: list[str]) -> None:
    """Run one command; only the module of the (sub)command that runs is imported."""
    if name in LIGHTNING:
        from sdtune.cli import main as lightning_main

        lightning_main([name, *args])
        return
    if name in RAW:
        RAW[name].target("")(args)
        return
    if name == "bench" and args[:1] == ["serve"]:  # the load test has its own parser (and a server to start)
        from sdtune.serve.load import main as bench_serve

        bench_serve(args[1:])
        return
    command = COMMANDS[name]
    subcommand = "" if "" in command.targets else (args[0] if args else "")
    if subcommand not in command.targets:
        names = ", ".join(command.targets)
        if subcommand in ("", "-h", "--help"):
            print(f"usage: sdtune {name} <{' | '.join(command.targets)}> [options]  ({command.help})")
            return
        raise ValueError(f"unknown subcommand {subcommand!r}; one of: {names}")
    from jsonargparse import auto_cli

    target, rest = command.target(subcommand), args[1:] if subcommand else args
    auto_cli(target, args=rest, as_positional=name == "slurm", allow_abbrev=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SDTUNE_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in COMMANDS and name not in LIGHTNING and name not in RAW:
        known = ", ".join([*LIGHTNING, *COMMANDS, *RAW])
        print(f"sdtune: unknown command {name!r}; one of: {known}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        run(name, args)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"sdtune {name}: error: {user_message(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
