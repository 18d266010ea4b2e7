"""scripts/launch.sh: the command lines it builds (dry run, faked Slurm allocations of 2 and 4 nodes), its errors,
the per-node supervisor's signal forwarding (a real `accelerate launch` of 2 processes), and the thin wrappers."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:  # other test sessions may share this machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH = REPO / "scripts" / "launch.sh"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_GPUS_ON_NODE")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SFM_", "GPUS_PER_NODE", "MASTER_"))}
    env["VENV"] = str(Path(sys.executable).parents[1])
    env.update(extra)
    return env


def dry_run(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH), "--dry-run", *args],
        cwd=REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory) -> str:
    """`scontrol show hostnames` needs a parsable slurm.conf, not a running cluster."""
    if shutil.which("scontrol") is None:
        pytest.fail("scontrol not installed: run scripts/install_slurm.sh")
    conf = tmp_path_factory.mktemp("conf") / "slurm.conf"
    conf.write_text(
        "ClusterName=x\nSlurmctldHost=localhost\nNodeName=gpu-a[01-20] CPUs=2\nPartitionName=p Nodes=ALL\n"
    )
    return str(conf)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu-a[07,09]", ["gpu-a07", "gpu-a09"]),
        ("gpu-a[07,09-10],gpu-b001", ["gpu-a07", "gpu-a09", "gpu-a10", "gpu-b001"]),
    ],
)
def test_multi_node_command_lines(slurm_conf, nodelist, hosts):
    n = len(hosts)
    result = dry_run(
        "think",
        "--model_name_or_path", "some-org/sfm-7b-v2",
        "--run_name", "sweep 1 'quoted'",
        SLURM_CONF=slurm_conf, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(n),
        SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", SFM_CUDA_DEVICES="4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"nodes      {n} {nodelist}" in out
    assert f"processes  {4 * n} = {n} x 4  on GPU" in out
    assert "output_dir outputs/dpo/sfm-7b-v2" in out  # the per-model derivation, asked from Python

    srun = shlex.split(re.search(r"^RUN: (.*)$", out, re.M).group(1))
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert {f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(srun)
    assert srun[-4:-1] == ["bash", str(LAUNCH), "--node-task"]
    assert "--machine_rank $SLURM_PROCID" in srun[-1]  # expanded by each node's task, not here

    nodes = re.findall(r"^NODE (\d+) \(SLURM_PROCID=(\d+)\): (.*)$", out, re.M)
    assert [int(rank) for _, rank, _ in nodes] == list(range(n))
    ports = set()
    for _, rank, command in nodes:
        argv = shlex.split(command)
        assert argv[:4] == ["accelerate", "launch", "--config_file", "accelerate_config.yaml"]
        assert _flag(argv, "--num_machines") == str(n)
        assert _flag(argv, "--num_processes") == str(4 * n)
        assert _flag(argv, "--machine_rank") == rank
        assert _flag(argv, "--main_process_ip") == hosts[0]
        assert _flag(argv, "--rdzv_backend") == "c10d"
        assert _flag(argv, "--deepspeed_multinode_launcher") == "standard"
        ports.add(_flag(argv, "--main_process_port"))
        script = argv.index("train_dpo.py")
        assert argv[script:] == [
            "train_dpo.py", "--config", "configs/think.yaml",
            "--model_name_or_path", "some-org/sfm-7b-v2", "--run_name", "sweep 1 'quoted'",
        ]  # fmt: skip
    assert len(ports) == 1 and 1024 < int(ports.pop()) < 65536


def test_fake_slurm_gpus_take_the_cpu_path(slurm_conf):
    # The test cluster's GPUs: Slurm lists 4, torch sees none. Two nodes, so 2 x 2 CPU processes.
    result = dry_run(
        "demo",
        SLURM_CONF=slurm_conf, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3", MASTER_PORT="29511",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no usable GPU (torch sees none; Slurm lists 4, fake or not visible)" in result.stdout
    assert "processes  4 = 2 x 2  on CPU" in result.stdout
    argv = shlex.split(re.search(r"^NODE 1 \(SLURM_PROCID=1\): (.*)$", result.stdout, re.M).group(1))
    assert _flag(argv, "--num_processes") == "4" and _flag(argv, "--main_process_port") == "29511"
    assert "ACCELERATE_USE_CPU" not in result.stdout  # it would silently turn DeepSpeed off


def test_local_gpus_without_slurm():
    result = dry_run("instruct", "--max_steps", "10", SFM_CUDA_DEVICES="4")
    assert result.returncode == 0, result.stderr
    assert "RUN: bash " in result.stdout and "srun" not in result.stdout
    argv = shlex.split(re.search(r"^NODE 0 \(SLURM_PROCID=unset\): (.*)$", result.stdout, re.M).group(1))
    assert _flag(argv, "--num_processes") == "4" and _flag(argv, "--num_machines") == "1"
    assert argv[argv.index("train_dpo.py") :] == [
        "train_dpo.py",
        "--config",
        "configs/instruct.yaml",
        "--max_steps",
        "10",
    ]
    assert "output_dir outputs/dpo_instruct" in result.stdout


def test_unknown_recipe_and_bad_arguments_fail_before_launching():
    result = dry_run("thinking")
    assert result.returncode != 0
    assert "no recipe configs/thinking.yaml (have: demo instruct think )" in result.stderr
    result = dry_run("demo", "--learning_rat", "1e-6")
    assert result.returncode != 0
    assert "does not parse" in result.stderr and "--learning_rat" in result.stderr
    assert "RUN:" not in result.stdout
    # A GPU recipe on a host without a usable GPU: refused up front, not a traceback from inside the launch.
    result = dry_run("think")
    assert result.returncode != 0 and "RUN:" not in result.stdout
    assert "no usable GPU here, and configs/think.yaml trains on GPUs (use_cpu false)" in result.stderr


WORKER = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
time.sleep(float(sys.argv[2]))  # USR1 is ignored (inherited) until the handler exists: the supervisor re-sends
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
(out / f"ready{os.environ['RANK']}").touch()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.1)
(out / f"rank{os.environ['RANK']}").write_text("USR1" if got else "timeout")
"""


def test_node_task_forwards_usr1_to_workers_and_survives(tmp_path):
    """A real `accelerate launch` of 2 processes: SIGUSR1 to the supervisor reaches both workers (which install their
    handler only after the signal was first sent), the agent ignores it, everything exits 0."""
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = (
        f"accelerate launch --config_file accelerate_config.yaml --num_processes 2 --num_machines 1 "
        f"--main_process_port {_free_port()} {tmp_path}/worker.py {tmp_path} 6"
    )
    proc = subprocess.Popen(
        ["bash", str(LAUNCH), "--node-task", cmd], cwd=REPO, env=_env(PREEMPT_RESEND_S="2"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while (
            subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).returncode and time.time() < deadline
        ):
            time.sleep(0.2)
        time.sleep(3)  # the workers exist but still ignore USR1
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert (tmp_path / "rank0").read_text() == "USR1" and (tmp_path / "rank1").read_text() == "USR1", out
    assert "ChildFailedError" not in out
