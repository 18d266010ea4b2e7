"""A real 2-node Slurm cluster on this one machine (pytest plugin: `from tests.multinode_cluster import
multinode_cluster`).

The single-node cluster of tests/slurm_cluster.py (its munged, slurmctld, slurm.conf settings, fake GPUs and client
helpers), with two slurmd instead of one, each a node of its own: its own network namespace, an address on a veth
pair into a bridge this fixture makes in the root namespace, and its own hostname (a UTS namespace), so that what a
job resolves or binds on a node (the launcher's MASTER_ADDR, torch elastic's rendezvous host check, gloo's device)
is that node's address. slurmctld and the test's clients reach the nodes through the bridge; `/etc/hosts` gets one
line per node (added here, removed at the end).

    bridge sfb<tag> 10.213.X.1/24 (root namespace: slurmctld, sbatch)
      |-- veth -- netns sfm<tag>n1: 10.213.X.11, hostname sfm<tag>n1, slurmd -N sfm<tag>n1
      `-- veth -- netns sfm<tag>n2: 10.213.X.12, hostname sfm<tag>n2, slurmd -N sfm<tag>n2

The namespaces have no route beyond the bridge: traffic goes to loopback or to these addresses only. The tag and the
subnet are random, so concurrent test sessions don't meet. Everything made here is removed at the end, on failure
too: jobs, daemons, every process still in a node's namespace (with proctrack/pgid a job's background processes may
outlive it: found by namespace, killed by pid), the namespaces, the bridge and the /etc/hosts lines.

Each slurmd starts through `nsenter --net=/run/netns/NAME`, not `ip netns exec`, which mounts a /sys without cgroups
(slurmd 22.05 then exits: "Unable to initialize cgroup plugin").
"""

import contextlib
import fcntl
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    FAKE_GPUS,
    SLURM_CONF,
    SlurmCluster,
    _free_port,
    cluster_unavailable,
    require_root_and_slurm,
)

NODES = 2
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# sfm-multinode-test"
TOOLS = ("ip", "nsenter", "unshare", "hostname")
# The single-node settings replaced here (those that name the node or its address, and slurmd's log level); everything
# else of SLURM_CONF is kept.
PER_NODE_KEYS = ("SlurmctldHost", "SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile", "SlurmdDebug", "NodeName")


def _sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _free_subnet() -> int:
    """X of a 10.213.X.0/24 that no interface here uses (another test session's bridge, the host's own)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    rng = random.SystemRandom()  # the tests seed `random`
    for _ in range(50):
        x = rng.randrange(1, 255)
        if f" 10.213.{x}." not in used:
            return x
    raise RuntimeError(f"no free 10.213.X.0/24 subnet (ip -4 addr:\n{used})")


def multinode_conf(single_node_conf: str, controller: str, root: Path, nodes: dict[str, str], cpus: int) -> str:
    """tests/slurm_cluster.py's slurm.conf with `SlurmctldHost=controller` and one NodeName per {node: address}.

    Both slurmd use the same SlurmdPort (each has a namespace of its own) and per-node spool, pid and log files (%n
    is the node name). Fails if the single-node conf stops naming a setting replaced here (it would be kept twice).
    """
    lines = single_node_conf.splitlines()
    kept, dropped, continuation = [], set(), False
    for line in lines:
        key = line.split("=", 1)[0]
        if continuation or key in PER_NODE_KEYS:
            dropped.add(key if not continuation else "NodeName")
            continuation = line.endswith("\\")
            continue
        kept.append(line)
    missing = set(PER_NODE_KEYS) - dropped
    if missing:
        raise RuntimeError(
            f"tests/slurm_cluster.py's SLURM_CONF no longer sets {sorted(missing)}: update this fixture"
        )
    kept += [
        f"SlurmctldHost={controller}",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        # debug: each node's slurmd logs the signals it delivers to a step's tasks ("Sent signal 10 to StepId=J.0").
        "SlurmdDebug=debug",
    ]
    for node, address in nodes.items():
        kept.append(
            f"NodeName={node} NodeAddr={address} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} "
            f"ThreadsPerCore=1 Gres=gpu:{FAKE_GPUS} State=UNKNOWN"
        )
    return "\n".join(kept) + "\n"


class MultiNodeCluster(SlurmCluster):
    """SlurmCluster with NODES slurmd, each in a network and UTS namespace of its own (see the module docstring)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.tag = "".join(random.SystemRandom().choices("abcdefghjkmnpqrstuvwxyz23456789", k=4))
        self.nodes = [f"sfm{self.tag}n{i}" for i in range(1, NODES + 1)]  # = the namespaces' names
        self.bridge = f"sfb{self.tag}"
        self.subnet: int | None = None
        self._namespaces: list[str] = []
        self._veths: list[str] = []
        self._bridge_made = False
        self._hosts_lines: list[str] = []

    def address(self, node: str) -> str:
        return f"10.213.{self.subnet}.{11 + self.nodes.index(node)}"

    # ---- lifecycle ----
    def start(self) -> None:
        root = self.root
        self._make_network()
        self._add_hosts_lines()
        for sub in ("state", *(f"spool/{node}" for node in self.nodes)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Both nodes share the fake GPU files (the wrapper asks for --gpus-per-node=4).
        munge_socket = self._make_munge_key_and_gpus()
        single_node = SLURM_CONF.format(
            host=self.host,
            root=root,
            munge_socket=munge_socket,
            ctld_port=_free_port(),  # slurmctld listens on every address of the root namespace, the bridge's too
            slurmd_port=_free_port(),
            cpus=self.cpus,
            gpus=FAKE_GPUS,
            first_job_id=random.SystemRandom().randrange(100_000, 60_000_000),
        )
        # The bridge's address: 127.0.0.1 is each namespace's own loopback there.
        controller = f"{self.host}(10.213.{self.subnet}.1)"
        nodes = {node: self.address(node) for node in self.nodes}
        self.conf.write_text(multinode_conf(single_node, controller, root, nodes, self.cpus))
        self._start_munged_and_slurmctld(munge_socket)
        for node in self.nodes:
            # nsenter and unshare exec: the pid of this Popen is slurmd's. Its jobs inherit both namespaces.
            inner = f"hostname {node} && exec slurmd -D -N {node} -f {self.conf}"
            self._spawn(
                f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "sh", "-c", inner]
            )
        self._wait_for(lambda: self.node_state() == "idle", f"nodes {self.nodes} idle", 60)

    def stop(self) -> None:
        steps = (super().stop, self._kill_namespace_processes, self._remove_network, self._remove_hosts_lines)
        errors = []
        for step in steps:  # every step runs, whatever failed before it
            try:
                step()
            except Exception as error:  # noqa: BLE001  (reported below, after the rest is cleaned up)
                errors.append(f"{step.__name__}: {error!r}")
        if errors:
            raise RuntimeError("multinode cluster cleanup failed: " + "; ".join(errors))

    # ---- network ----
    def _make_network(self) -> None:
        self.subnet = _free_subnet()
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _sh("ip", "addr", "add", f"10.213.{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes, start=1):
            host_end, node_end = f"sfv{self.tag}{i}", f"sfe{self.tag}{i}"  # interface names: 15 characters at most
            _sh("ip", "netns", "add", node)
            self._namespaces.append(node)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._veths.append(host_end)
            _sh("ip", "link", "set", node_end, "netns", node)
            _sh("ip", "link", "set", host_end, "master", self.bridge)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "-n", node, "addr", "add", f"{self.address(node)}/24", "dev", node_end)
            _sh("ip", "-n", node, "link", "set", node_end, "up")
            _sh("ip", "-n", node, "link", "set", "lo", "up")

    def node_processes(self, node: str) -> dict[int, tuple[int, str]]:
        """{pid: (parent pid, command line)} of the processes on `node` (in its network namespace)."""
        inode = os.stat(f"/run/netns/{node}").st_ino
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.stat(proc / "ns" / "net").st_ino != inode:
                        continue
                    argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):  # gone meanwhile
                    continue
                found[int(proc.name)] = (ppid, argv)
        return found

    def _kill_namespace_processes(self) -> None:
        """SIGKILL what is still in the nodes' namespaces (all of it ours: what jobs and stopped daemons left)."""
        deadline = time.monotonic() + 10
        while pids := [pid for node in self._namespaces for pid in self.node_processes(node)]:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} still in the nodes' namespaces after SIGKILL")
            time.sleep(0.2)

    def _remove_network(self) -> None:
        while self._veths:  # deleting one end deletes the pair (a namespace's own goes with it, but asynchronously)
            _sh("ip", "link", "del", self._veths.pop())
        while self._namespaces:
            _sh("ip", "netns", "del", self._namespaces.pop())
        if self._bridge_made:
            _sh("ip", "link", "del", self.bridge)
            self._bridge_made = False

    # ---- /etc/hosts ----
    def _add_hosts_lines(self) -> None:
        self._hosts_lines = [f"{self.address(node)} {node} {HOSTS_MARK} {self.tag}" for node in self.nodes]
        with _locked_hosts() as hosts:
            text = hosts.read()
            hosts.seek(0, os.SEEK_END)
            hosts.write(("" if text.endswith("\n") or not text else "\n") + "\n".join(self._hosts_lines) + "\n")

    def _remove_hosts_lines(self) -> None:
        if not self._hosts_lines:
            return
        with _locked_hosts() as hosts:
            lines = hosts.read().splitlines(keepends=True)
            hosts.seek(0)
            hosts.write("".join(line for line in lines if line.rstrip("\n") not in self._hosts_lines))
            hosts.truncate()  # in place: /etc/hosts may be a bind mount, which a rename would not update
        self._hosts_lines = []

    # ---- clients, diagnostics ----
    def node_state(self) -> str:
        """The nodes' common state ("idle"), or all of their states when they differ."""
        states = set(self.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split())
        return states.pop() if len(states) == 1 else " ".join(sorted(states))

    def slurmd_log(self, node: str) -> str:
        return (self.root / f"slurmd-{node}.log").read_text(errors="replace")

    def logs(self) -> str:
        names = ["munge/munged.log", "slurmctld.log", "slurmctld.stdout"]
        names += [f"slurmd-{node}.{ext}" for node in self.nodes for ext in ("log", "stdout")]
        parts = []
        for name in names:
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(path.read_text().splitlines()[-25:]))
        return "\n".join(parts)


@contextlib.contextmanager
def _locked_hosts():
    """/etc/hosts open for update under an exclusive lock (another test session may edit it at the same time)."""
    with open(HOSTS_FILE, "r+") as hosts:
        fcntl.flock(hosts, fcntl.LOCK_EX)  # released when the file closes
        yield hosts


@pytest.fixture(scope="module")  # its namespaces and daemons go as soon as the module's tests are done
def multinode_cluster(tmp_path_factory):
    # As the single-node cluster: fails in CI and as root where it cannot run, naming why; skips, loudly, without root.
    require_root_and_slurm("the 2-node cluster needs root (network namespaces, a bridge, /etc/hosts, daemons)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        cluster_unavailable(
            f"missing {missing}: install iproute2 and util-linux (apt-get install iproute2 util-linux)"
        )
    cluster = MultiNodeCluster(tmp_path_factory.mktemp("multinode"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
