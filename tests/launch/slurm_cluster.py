"""A real two-node Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd
(`n1`, `n2`, one CPU each, on loopback ports), every file under one directory.

Debian's `slurm-wlm` and `munge` packages provide the daemons (`make test` installs them when
it runs as root); see `../shared/docs/environment.md` for the recipe. All daemons run as root
(SlurmUser=root), as CI does. `SlurmCluster.stop()` ends every daemon it started, whatever
state they are in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return (
            f"Slurm test cluster unavailable: {', '.join(missing)} not installed (`make test` "
            "installs slurm-wlm and munge with apt-get when run as root)"
        )
    if os.geteuid() != 0:
        return "Slurm test cluster unavailable: its daemons (slurmd runs jobs) need root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


CONF = """\
ClusterName=switchall-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 RealMemory=4000
PartitionName=main Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> str:
        proc = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self, timeout: float = 60) -> SlurmCluster:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = r / "munge"
        subprocess.run(
            [
                _which("munged"),
                "--force",  # as root, with its files in a directory of its own
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--log-file={munge}/munged.log",
                f"--pid-file={munge}/munged.pid",
                f"--seed-file={munge}/munged.seed",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        ctld, p1, p2 = _free_ports(3)
        self.conf.write_text(
            CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=ctld,
                port1=p1,
                port2=p2,
                root=r,
            )
        )
        subprocess.run([_which("slurmctld")], env=self.env, check=True, timeout=30)
        for node in ("n1", "n2"):
            subprocess.run([_which("slurmd"), "-N", node], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t %D", check=False)
            if out.split() == ["idle", "2"]:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm test cluster did not come up: sinfo says {out!r}")

    def stop(self) -> None:
        """End every job and daemon of this cluster, politely first (`scancel`, `scontrol
        shutdown`), then by signal: each process whose command line or environment names this
        cluster's directory (the daemons, job steps and tasks all carry its SLURM_CONF)."""
        try:
            jobs = self.run("squeue", "-h", "-o", "%i", timeout=15, check=False).split()
            if jobs:
                self.run("scancel", *jobs, timeout=15, check=False)
                self._wait(lambda: not self.run("squeue", "-h", check=False).strip(), 15)
            self.run("scontrol", "shutdown", timeout=15, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
        # munged is not part of the shutdown: wait for the others, then signal what is left.
        self._wait(lambda: not self.processes(but="munged"), 10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                _signal(pid, sig)
            self._wait(lambda: not self.processes(), 5)

    def processes(self, but: str | None = None) -> list[int]:
        """Live processes that belong to this cluster (see `stop`), less those named `but`."""
        marker = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                text = cmdline + (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in text and not (but and but.encode() in cmdline.split(b"\0")[0]):
                found.append(int(entry.name))
        return found

    @staticmethod
    def _wait(done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if done():
                    return
            except (OSError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    # ---------------------------------------------------------------- jobs
    def job_state(self, job: str) -> str:
        """The job's state as scontrol reports it (PENDING, RUNNING, COMPLETED, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False)
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job: str, name: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job, check=False)
        for field in out.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return None

    def release(self, job: str) -> None:
        """Make a requeued job eligible at once instead of after Slurm's requeue delay."""
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

    def logs(self) -> str:
        text = []
        for f in sorted((self.root / "log").glob("*.log")):
            text.append(f"--- {f.name}\n" + f.read_text()[-3000:])
        return "\n".join(text)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
