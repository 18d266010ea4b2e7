"""A real single-node Slurm cluster for the tests (pytest plugin: `pytest_plugins = ["tests.slurm_cluster"]`).

Starts munged, slurmctld and slurmd (Debian's Slurm 22.05, installed by scripts/install_slurm.sh) as root, in the
foreground as our own child processes, with a slurm.conf, state and logs under a temporary folder, free ports and a
private munge socket, so that several test sessions on one machine don't meet. Four fake GPUs: gres "devices" that are
links to /dev/null (`Count=N Flags=CountOnly` drains the node in 22.05). Jobs see SLURM_GPUS_ON_NODE=4 and
CUDA_VISIBLE_DEVICES=0,1,2,3 but torch sees no GPU, so the launcher takes its CPU path.

Only the processes started here are stopped, by their pids; jobs still running are cancelled first.

Where the cluster cannot run, the tests that need it fail, naming why: in CI (CI set) and as root, who can run it,
always; a developer without root gets a skip that says the Slurm tests did not run.
"""

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import pytest

DAEMONS = (
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "salloc",
    "srun",
    "scontrol",
    "squeue",
    "scancel",
    "sinfo",
)
FAKE_GPUS = 4
# The CPU layout stated as `slurmd -C` reports it; a mismatch drains the node.
SLURM_CONF = """\
ClusterName=sfmtest
# Job ids name the logs in the repo's logs/: start high and at random, so concurrent test sessions don't collide.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# pgid: linuxproc leaked background processes of finished jobs. No cgroups in this container.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Small MinJobAge: `sbatch --wait` then polls every 2 s instead of backing off to 32 s.
MinJobAge=4
ReturnToService=2
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 \\
    Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    # ---- lifecycle ----
    def start(self) -> None:
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge_socket = self._make_munge_key_and_gpus()
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=root,
                munge_socket=munge_socket,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=self.cpus,
                gpus=FAKE_GPUS,
                first_job_id=random.SystemRandom().randrange(100_000, 60_000_000),  # the tests seed `random`
            )
        )
        self._start_munged_and_slurmctld(munge_socket)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() == "idle", "node idle", 60)

    def _make_munge_key_and_gpus(self) -> Path:
        """A fresh munge key, the fake GPU device files and their gres.conf; returns the munge socket's path (a path
        socket: reachable from network namespaces too)."""
        root = self.root
        for sub in ("munge", "gpus"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge_dir = root / "munge"
        munge_dir.chmod(0o755)
        key = munge_dir / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        for i in range(FAKE_GPUS):
            (root / "gpus" / f"nvidia{i}").symlink_to("/dev/null")
        (root / "gres.conf").write_text(f"Name=gpu File={root}/gpus/nvidia[0-{FAKE_GPUS - 1}]\n")
        return munge_dir / "munge.socket"

    def _start_munged_and_slurmctld(self, munge_socket: Path) -> None:
        munge_dir = munge_socket.parent
        self._spawn(
            "munged",
            [
                "munged", "-F", "--force", f"--socket={munge_socket}", f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
                f"--log-file={munge_dir}/munged.log",
            ],
        )  # fmt: skip
        self._wait_for(lambda: munge_socket.exists(), "munged socket", 10)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])

    def stop(self) -> None:
        if any(p.poll() is None for p in self._procs):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
            self._wait_for(lambda: not self.squeue(), "jobs to end", 30, fail=False)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self._procs.append(proc)
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def _wait_for(self, predicate, what: str, timeout: float, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} died while waiting for {what}:\n{self.logs()}")
            time.sleep(0.25)
        if fail:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")
        return False

    def logs(self) -> str:
        parts = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(path.read_text().splitlines()[-25:]))
        return "\n".join(parts)

    # ---- clients ----
    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)

    def node_state(self) -> str:
        return self.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.strip()

    def squeue(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i %T"]).stdout.split("\n")[:-1]

    def job_field(self, job_id: str, field: str) -> str | None:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        for token in out.split():
            key, _, value = token.partition("=")
            if key == field:
                return value
        return None

    def release_requeued(self, job_id: str, timeout: float = 120) -> None:
        """Wait for the job's requeue; if it then waits (BeginTime, about 2 minutes), start it now. Slurm accepts
        that only once the job shows PENDING (doing it in the same second as the requeue failed the job); a requeued
        job that starts at once needs nothing."""
        self._wait_for(lambda: int(self.job_field(job_id, "Restarts") or 0) >= 1, f"job {job_id} requeued", timeout)
        deadline = time.monotonic() + timeout
        while True:  # REQUEUED / COMPLETING while the first life is torn down, then PENDING, then RUNNING
            state = self.job_field(job_id, "JobState")
            if state in (None, "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                return
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s:\n{self.logs()}"
            if state == "PENDING":
                time.sleep(1)
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            time.sleep(0.5)


def cluster_unavailable(reason: str) -> NoReturn:
    """Fails (CI, or root, who could run the cluster) or, for a developer without root, skips, loudly."""
    if os.environ.get("CI") or os.geteuid() == 0:
        pytest.fail(
            f"the Slurm test cluster cannot run: {reason} (CI={os.environ.get('CI', 'unset')}, uid {os.geteuid()})"
        )
    pytest.skip(f"SLURM TESTS NOT RUN: {reason}; run them as root (CI does, and fails where they cannot run)")


def require_root_and_slurm(why_root: str) -> None:
    """The checks every cluster fixture makes first: root, and the Slurm and munge daemons (`cluster_unavailable`)."""
    if os.geteuid() != 0:
        cluster_unavailable(why_root)
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        cluster_unavailable(f"Slurm/munge not installed (missing {missing}): run `bash scripts/install_slurm.sh`")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    require_root_and_slurm("its daemons run as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
