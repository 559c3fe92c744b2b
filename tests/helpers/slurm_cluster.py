"""A real one-node SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd from Debian's
slurm-wlm, with their own key, sockets, ports and spool folders under a temp folder (nothing in /etc)."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers.ports import free_port


def _node_name() -> str:
    """This host's name when it resolves (Lightning makes the first node of the job the rendezvous address)."""
    name = socket.gethostname()
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


NODE = _node_name()
SLURM_CONF = """\
ClusterName=sdtune-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> list[str]:
    return [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(tool) is None]


class LocalSlurm:
    """Start with `start()`; `env` is what sbatch/scontrol/scancel need (SLURM_CONF)."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(
            SLURM_CONF.format(root=root, node=NODE, cpus=self.cpus, ctld_port=free_port(), slurmd_port=free_port())
        )
        self._daemon(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={root}/munge.socket",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        )
        self._wait(lambda: (root / "munge.socket").exists(), timeout, "munged")
        self._daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(
            lambda: self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout, timeout, "slurmctld"
        )
        self._daemon("slurmd", "-D", "-N", NODE, "-f", str(self.conf))
        self._wait(
            lambda: re.search(r"State=(IDLE|MIXED)", self.scontrol("show", "node", NODE).stdout) is not None,
            timeout,
            "slurmd",
        )

    def _daemon(self, *command: str) -> None:
        log = (self.root / f"{command[0]}.out").open("w")
        self.processes.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _wait(self, ready, timeout: float, name: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"{name} did not start: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout} s: {self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        files = sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log"))
        return "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in files)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args)

    def sbatch(self, script: Path, *args: str) -> str:
        result = self.run("sbatch", "--parsable", *args, str(script))
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once the job is purged."""
        text = self.scontrol("show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def start_now(self, job_id: str, timeout: float = 60) -> None:
        """SLURM holds a requeued job for about two minutes (BeginTime); release it at once to keep tests short."""
        deadline = time.monotonic() + timeout
        while self.job(job_id).get("JobState") != "PENDING":  # requeued jobs pass through REQUEUED / COMPLETING
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not pending after its requeue: {self.job(job_id)}")
            time.sleep(0.2)
        # slurmd revokes the old run's job credential at the requeue, with 1-second granularity: a run started
        # within the same wall-clock second is killed as "Job credential revoked" (seen once in CI). Start it
        # only once the clock has moved on to a later second.
        release_at = math.floor(time.time()) + 2
        while time.time() < release_at:
            time.sleep(0.1)
        self.scontrol("update", f"JobId={job_id}", "StartTime=now")

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
