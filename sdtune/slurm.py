"""`python -m sdtune.slurm render <template> <config.yaml> --nodes N ...`: fill a shipped sbatch template.

The templates hold everything that must be right for preemption and requeue (`--signal=B:USR1@<s>`,
`--requeue`, the USR1 forwarding in slurm/launch.sh, `--resume auto`); this command fills in only the
site-specific values, so nobody edits the tricky parts by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from jsonargparse import auto_cli

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
Template = Literal["single_node", "multi_node_ddp", "multi_node_fsdp", "sweep_array"]
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every `{{name}}`; a placeholder without a value is an error, not an empty string."""
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise ValueError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def render(
    template: Template,
    train_config: str,
    time: str = "24:00:00",
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 8,
    partition: str | None = None,
    account: str | None = None,
    mem: str | None = None,
    job_name: str | None = None,
    run_dir: str | None = None,
    log_dir: str = "logs/slurm",
    setup: str = "source .venv/bin/activate",
    workdir: str | None = None,
    signal_seconds: int = 300,
    fsdp_sharding: str = "HYBRID_SHARD",
    plan: str | None = None,
    out: str | None = None,
) -> Path:
    """Write a ready-to-submit sbatch script and print the sbatch command.

    Args:
        template: single_node, multi_node_ddp, multi_node_fsdp, or sweep_array (one array task per sweep run).
        train_config: The training config (sweep_array: the plan's base config; the plan names each run's).
        time: Time limit, [D-]HH:MM:SS.
        nodes: Nodes (single_node: 1).
        gpus_per_node: GPUs per node (0 for CPU-only tasks, as in the local test cluster).
        tasks_per_node: Tasks per node (default: one per GPU, or 1 without GPUs).
        cpus_per_task: CPU cores per task (DataLoader workers + 1 is a good minimum).
        partition: SLURM partition (default: the cluster's default).
        account: SLURM account to charge.
        mem: Memory per node, e.g. 200G (default: the partition's default).
        job_name: Job name (default: the config's file name).
        run_dir: Checkpoints and logs of the run (default: runs/<job_name>); a requeued job resumes from it.
        log_dir: Folder of the job's stdout/stderr files, one per job id (created now: SLURM does not).
        setup: Shell line that activates the environment on the compute node.
        workdir: The sdtune checkout on the compute nodes (default: this one).
        signal_seconds: USR1 this many seconds before the time limit: enough for one step plus a checkpoint.
        fsdp_sharding: multi_node_fsdp: FULL_SHARD, SHARD_GRAD_OP or HYBRID_SHARD.
        plan: sweep_array: the sweep plan (python -m sdtune.sweep plan ...).
        out: Where to write the script (default: <log_dir>/<job_name>.sbatch).
    """
    config_path = Path(train_config)
    if not config_path.is_file():
        raise ValueError(f"train_config: {train_config} is not a file")
    if not _TIME.match(time):
        raise ValueError(f"--time: {time!r} is not [D-]HH:MM:SS")
    if nodes < 1 or gpus_per_node < 0 or cpus_per_task < 1 or signal_seconds < 30:
        raise ValueError("--nodes >= 1, --gpus_per_node >= 0, --cpus_per_task >= 1 and --signal_seconds >= 30")
    if template == "single_node" and nodes != 1:
        raise ValueError("--nodes: single_node runs on 1 node; use multi_node_ddp or multi_node_fsdp")
    if template == "sweep_array" and not plan:
        raise ValueError("--plan: sweep_array needs the plan written by `python -m sdtune.sweep plan`")
    job_name = job_name or config_path.stem
    tasks = tasks_per_node or max(1, gpus_per_node)
    resource_lines = [f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    resource_lines += [f"#SBATCH --partition={partition}"] if partition else []
    resource_lines += [f"#SBATCH --account={account}"] if account else []
    resource_lines += [f"#SBATCH --mem={mem}"] if mem else []
    array = ""
    if plan:
        from sdtune.sweep import read_plan

        array = f"0-{len(read_plan(Path(plan))['runs']) - 1}"
    target = Path(out) if out else Path(log_dir) / f"{job_name}.sbatch"
    values = {
        "job_name": job_name,
        "nodes": str(nodes),
        "tasks_per_node": str(tasks),
        "cpus_per_task": str(cpus_per_task),
        "time": time,
        "log_dir": str(Path(log_dir).resolve()),
        "signal_seconds": str(signal_seconds),
        "resource_lines": "\n".join(resource_lines),
        "workdir": str(Path(workdir).resolve() if workdir else Path.cwd()),
        "setup": setup,
        "config": str(config_path.resolve()),
        "run_dir": str(Path(run_dir or f"runs/{job_name}").resolve()),
        "fsdp_sharding": fsdp_sharding,
        "plan": str(Path(plan).resolve()) if plan else "",
        "array": array,
    }
    script = fill((TEMPLATE_DIR / f"{template}.sbatch").read_text(), values)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(script)
    target.chmod(0o755)
    print(f"wrote {target}; submit with: sbatch {target}")
    return target


def main() -> None:
    auto_cli({"render": render}, as_positional=True, allow_abbrev=False)


if __name__ == "__main__":
    main()
