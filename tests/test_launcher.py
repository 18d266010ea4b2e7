"""scripts/launch.sh: the command lines it builds (dry run, faked Slurm allocations of 2 and 4 nodes), its errors,
the per-node supervisor's signal forwarding (a real `accelerate launch` of 2 processes), `.env` read as python-dotenv
reads it, a token on the command line refused, SIGUSR1 during the start-up and while the node task starts, and the
end-of-run verdict from run_status.json (sfm_dpo/launcher.py)."""

import contextlib
import json
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


@contextlib.contextmanager
def _started(argv: list[str], env: dict):
    """The launcher running in the repo, stdout and stderr together; killed at the end if it is still running."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


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
    with _started(["bash", str(LAUNCH), "--node-task", cmd], _env(PREEMPT_RESEND_S="2")) as proc:
        deadline = time.time() + 90
        while (
            subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).returncode and time.time() < deadline
        ):
            time.sleep(0.2)
        time.sleep(3)  # the workers exist but still ignore USR1
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert (tmp_path / "rank0").read_text() == "USR1" and (tmp_path / "rank1").read_text() == "USR1", out
    assert "ChildFailedError" not in out


# ---- .env, tokens, a signal at start-up, the end-of-run verdict ----

SECRET = "hf_" + "Zq7" * 12  # shaped like a Hub token


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """The repo's layout around the real launcher, all links to the checkout, so that a test can give it its own .env
    (and no .venv) without touching the checkout's."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in {".env", ".venv", ".git", "logs", "outputs", "scripts"}:
            (root / entry.name).symlink_to(entry)
    for entry in (REPO / "scripts").iterdir():
        (root / "scripts" / entry.name).symlink_to(entry)
    return root


def test_dotenv_follows_python_dotenv_and_never_overrides_the_caller(sandbox, tmp_path):
    """Values with spaces, `$`, backticks and `${VAR}` come through as python-dotenv reads them (as train_dpo.py does);
    a variable the caller set wins; .env may name VENV and SITE_PROFILE; a token in a file others can read warns, and
    no value is printed."""
    seen = tmp_path / "seen"
    site = tmp_path / "site.sh"  # a site profile is sourced after .env: it sees what the launcher exported
    site.write_text(f'printf "%s\\n" "$WANDB_NOTES" "$WANDB_PROJECT" "$SFM_T_PATH" "$HF_TOKEN" > {seen}\n')
    venv = Path(sys.executable).parents[1]
    env_file = sandbox / ".env"
    env_file.write_text(
        "WANDB_NOTES=lr sweep $5 `id` $(id)  # unquoted: a comment after two spaces\n"
        "WANDB_PROJECT=from-dotenv\n"
        'SFM_T_PATH="${SFM_T_BASE}/with space"\n'
        f"SITE_PROFILE={site}\n"
        f"VENV={venv}\n"
        f"HF_TOKEN={SECRET}\n"
    )
    env_file.chmod(0o644)
    env = _env(WANDB_PROJECT="from-shell", SFM_T_BASE="/base")
    del env["VENV"]  # named by .env alone
    env.pop("SITE_PROFILE", None)
    result = subprocess.run(
        ["bash", str(sandbox / "scripts" / "launch.sh"), "--dry-run", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen.read_text().splitlines() == ["lr sweep $5 `id` $(id)", "from-shell", "/base/with space", SECRET]
    assert f" site       {site}   python {venv.resolve()}/bin/python" in result.stdout  # the activated venv
    assert "kept from the environment: WANDB_PROJECT" in result.stdout
    assert "holds HF_TOKEN and is readable by group/others (mode 644): run `chmod 600 .env`" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_dotenv_exports_and_permission_warning(tmp_path):
    from sfm_dpo.launcher import dotenv_exports, permission_warning

    env_file = tmp_path / ".env"
    env_file.write_text("A=1\nB=two words\nC=${A}-x\nBAD.KEY=3\nWANDB_API_KEY=\nIFS=x\nREPO=org/name\n")
    lines, names, kept = dotenv_exports(env_file, {"A": "caller"}, shell_variables=["IFS", "REPO", "B_NOT_IN_FILE"])
    # BAD.KEY is no shell name, IFS and REPO are the launcher shell's: warned, not exported. An empty value is a
    # value (dotenv sets it, so do we).
    assert names == ["B", "C", "WANDB_API_KEY"] and kept == ["A"]
    # The shell reads the lines back to the same values (bash, not shlex, is the reference).
    script = "\n".join(lines) + '\nprintf "%s|%s" "$B" "$C"'
    assert subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout == "two words|caller-x"
    env_file.chmod(0o644)
    assert permission_warning(env_file) is None  # WANDB_API_KEY is empty: no secret in it
    env_file.write_text("HUGGING_FACE_HUB_TOKEN=hf_x\n")
    for mode, warns in ((0o600, False), (0o640, True), (0o604, True), (0o644, True)):
        env_file.chmod(mode)
        warning = permission_warning(env_file)
        assert (warning is not None) == warns, oct(mode)
        assert not warning or f"HUGGING_FACE_HUB_TOKEN and is readable by group/others (mode {mode:03o})" in warning
        assert not warning or "hf_x" not in warning


@pytest.mark.parametrize(
    "args",
    [
        ["--dry-run", "demo", "--hub_token", SECRET],
        ["--dry-run", "demo", "--max_steps", "2", f"--hub_token={SECRET}"],
        ["--dry-run", "demo", "--hub-token", SECRET],
        ["think", "--hub_model_id", SECRET],  # a token pasted in the wrong place, not a dry run
    ],
)
def test_token_on_the_command_line_is_refused_and_never_printed(args):
    result = subprocess.run(
        ["bash", str(LAUNCH), *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "Put it in .env" in result.stderr and "HF_TOKEN=" in result.stderr and "Nothing was launched" in result.stderr
    )
    assert SECRET not in result.stdout + result.stderr
    assert "RUN:" not in result.stdout and "=====" not in result.stdout  # refused before the header


def test_usr1_during_start_up_exits_75_before_training(tmp_path):
    """A signal during the start-up (.env, site profile, the config probe) is kept, and the launcher stops before
    starting training: exit 75 locally, nothing lost. A second signal is the same request."""
    output_dir = tmp_path / "out"
    with _started(["bash", str(LAUNCH), "demo", "--output_dir", str(output_dir)], _env()) as proc:
        time.sleep(0.3)  # the config probe alone takes seconds
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert out.count("SIGUSR1 during start-up: not starting training") == 1, out
    assert "PREEMPTED: before training started, nothing to save; run the same command again to resume" in out
    assert "on USR1    checkpoint, then exit 75 (not under Slurm)" in out
    assert not output_dir.exists()  # training never started


def _write_status(output_dir: Path, **status) -> None:
    """As a writer must: a complete file or none (temporary name, then rename)."""
    tmp = output_dir / ".run_status.json.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, output_dir / "run_status.json")


def test_outcome_is_done_only_when_this_run_said_done(tmp_path):
    from sfm_dpo.launcher import fingerprint, outcome

    status = tmp_path / "run_status.json"
    before = fingerprint(status)
    assert outcome(tmp_path, 0, before) == (
        "failed", f"FAILED: no {status}: training ended (exit code 0) before it could say how it ended",
    )  # fmt: skip
    _write_status(tmp_path, state="done", stage="push", message="pushed")
    assert outcome(tmp_path, 0, before) == ("done", f"DONE: model saved to {tmp_path}")
    verdict, line = outcome(tmp_path, 1, before)
    assert verdict == "failed" and line.startswith("FAILED: exit code 1 after")

    before = fingerprint(status)  # a new launch in the same folder, which then dies without a word
    assert outcome(tmp_path, 0, before) == (
        "failed", f"FAILED: {status} is from an earlier run; this one ended (exit code 0) without writing it",
    )  # fmt: skip
    _write_status(tmp_path, state="failed", stage="push", message="403 Forbidden:\n  no write access")
    assert outcome(tmp_path, 0, before) == (
        "failed", "FAILED at push: 403 Forbidden: no write access (state 'failed', exit code 0)",
    )  # fmt: skip
    _write_status(tmp_path, state="preempted", stage="reference pass", message="shard 3 of 8 kept")
    assert outcome(tmp_path, 1, before) == ("preempted", "PREEMPTED during reference pass: shard 3 of 8 kept")
    _write_status(tmp_path, state="running", stage="final save", message="final save started")  # then killed
    assert outcome(tmp_path, 1, before) == (
        "failed", "FAILED during final save: training ended (exit code 1) in the middle of it (final save started)",
    )  # fmt: skip
    _write_status(tmp_path, state="done", stage="push", message="pushed", job_id="41")  # the job that holds the folder
    assert outcome(tmp_path, 0, before, job_id="42")[1].startswith(f"FAILED: {status} was written by job 41, not this")
    assert outcome(tmp_path, 0, before, job_id="41")[0] == "done"
    status.write_text('{"state": "do')  # a writer that did not write atomically, killed
    verdict, line = outcome(tmp_path, 0, before)
    assert verdict == "failed" and line.startswith(f"FAILED: unreadable {status} (JSONDecodeError")


def test_usr1_as_training_starts_ends_in_exit_75_and_kills_no_worker(demo_assets, tmp_path):
    """A real local launch of the demo, signalled the moment the launcher has started its node task: the signal
    waits for the node task's handler (the "ready" file) and for the workers' (their SigCgt), reaches each worker
    once, training stops at its next stage boundary with nothing lost, exit 75. Offered every second here, a signal
    re-sent to a worker that has already returned would kill it in its interpreter's shutdown (Python then restores
    the default action): train_dpo.py FAILED, exit -10, with the marker already written."""
    output_dir = tmp_path / "out"
    argv = [
        "bash", str(LAUNCH), "demo", "--model_name_or_path", str(demo_assets["model"]),
        "--dataset_name", str(demo_assets["think"]), "--output_dir", str(output_dir),
    ]  # fmt: skip
    with _started(argv, _env(PREEMPT_RESEND_S="1")) as proc:
        deadline = time.monotonic() + 120
        while subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "launch.sh --node-task"], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    summary = re.findall(r"^ PREEMPTED: (.*)$", out, re.M)
    # Stopped at a stage boundary ("nothing lost"), or, had the signal come later, at a step with its checkpoint.
    assert len(summary) == 1 and "run the same command again to resume (exit 75)" in summary[0], out
    assert "ChildFailedError" not in out and "(SIGUSR1)" not in out and "exit code  0 " in out, out
