"""End to end on a real Slurm cluster (tests/slurm_cluster.py): the real sbatch wrapper, submitted unchanged with
`sbatch --wait`, trains the tiny demo model on the CPU (the cluster's GPUs are fake) under DeepSpeed ZeRO-2.

- a job trains and saves;
- a job sent SIGUSR1 mid-training checkpoints, requeues itself, resumes, and ends with the uninterrupted job's step
  count and exactly its weights (fp32 on the CPU);
- a job with a bad argument fails with a clear message in logs/ and a non-zero exit code;
- a job sent SIGUSR1 during its start-up requeues without starting training, through a `scontrol requeue` that fails
  once (a wrapper first on the job's PATH fails the first call, then execs the real scontrol), and then completes;
- a requeue that never works ends the job loudly with exit 75;
- an interactive allocation (salloc) is never requeued: it exits 75 like a local run.

The think wrapper runs with the demo recipe's values as command-line overrides (the recipe is fixed by the wrapper).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.slurm_cluster import cluster_unavailable

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SBATCH_TIMEOUT = 420


def demo_overrides(assets: dict, output_dir: Path, **extra) -> list[str]:
    """configs/demo.yaml as command-line overrides of the think recipe, pointed at this session's tiny assets."""
    values = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    values.update(
        model_name_or_path=str(assets["model"]),
        dataset_name=str(assets["think"]),
        output_dir=str(output_dir),
        push_to_hub=False,
        logging_steps=1,
    )
    values.update(extra)
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def sbatch(cluster, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`sbatch --wait` in the background; the job id is its first output line (--parsable)."""
    cpus = str(cluster.cpus)  # the wrapper asks for 32 CPUs per task; this node has fewer
    return subprocess.Popen(
        ["sbatch", "--wait", "--parsable", f"--cpus-per-task={cpus}", *args],
        cwd=REPO, env=env or cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def job_id_of(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line.isdigit(), f"sbatch said {line!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
    return line.split(";")[0]


def finish(proc: subprocess.Popen, job_id: str) -> tuple[int, str]:
    try:
        proc.wait(timeout=SBATCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = REPO / "logs" / f"think-{job_id}.out"
    return proc.returncode, log.read_text(errors="replace") if log.exists() else f"(no log {log})"


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def expected_steps(output_dir: Path) -> int:
    """One epoch of the pairs actually trained on (those used, less any held out for evaluation), 16 pairs per
    optimizer step (the demo's effective batch)."""
    split = output_dir / "eval_split.json"
    if split.exists():
        pairs = json.loads(split.read_text())["train_pairs"]
    else:
        pairs = json.loads((output_dir / "data_report.json").read_text())["pairs_used"]
    return math.ceil(pairs / 16)


def run_reference_job(cluster, assets: dict, output_dir: Path) -> dict:
    """The uninterrupted 1-node batch job (2 CPU processes) of the demo's values: fixture `reference_job` of
    tests/conftest.py, run once per session for this module and tests/test_multinode.py."""
    proc = sbatch(cluster, "scripts/dpo_train.sh", *demo_overrides(assets, output_dir))
    job_id = job_id_of(proc)
    rc, log = finish(proc, job_id)
    return {"rc": rc, "log": log, "output_dir": output_dir, "job_id": job_id}


def test_job_trains_and_saves(reference_job):
    log, output_dir = reference_job["log"], reference_job["output_dir"]
    assert reference_job["rc"] == 0, log
    assert f" job        {reference_job['job_id']}" in log  # the launcher's header
    assert "no usable GPU (torch sees none; Slurm lists 4, fake or not visible)" in log
    assert "processes  2 = 1 x 2  on CPU" in log
    assert "DeepSpeed ZeRO-2" in log  # train_dpo.py's summary: the DeepSpeed engine really ran
    assert f"DONE: model saved to {output_dir}" in log
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == expected_steps(output_dir) > 4
    assert (output_dir / "model.safetensors").exists()
    assert any((path / "COMPLETE").exists() for path in output_dir.glob("checkpoint-*"))


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, demo_assets, reference_job, tmp_path):
    output_dir = tmp_path / "preempted"
    # No periodic checkpoint: the only one before the end is the preemption's.
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *demo_overrides(demo_assets, output_dir, save_steps=1000))
    job_id = job_id_of(proc)
    log_path = REPO / "logs" / f"think-{job_id}.out"
    deadline = time.monotonic() + 300
    # errors="replace": a read while the job writes can end inside a multi-byte character of a progress bar
    while "'loss'" not in (log_path.read_text(errors="replace") if log_path.exists() else ""):  # training started
        assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text(errors="replace")
        time.sleep(0.5)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    slurm_cluster.release_requeued(job_id)
    rc, log = finish(proc, job_id)

    assert rc == 0, log
    preempted = [line for line in log.splitlines() if "PREEMPTED: checkpoint at step" in line]
    assert len(preempted) == 1 and f"requeueing job {job_id}" in preempted[0], log
    step = int(preempted[0].split("step ")[1].split()[0])
    total = expected_steps(output_dir)
    assert 0 < step < total, log
    assert "(requeued 1x)" in log  # the second life's header: SLURM_RESTART_COUNT=1
    assert f"Resuming from {output_dir}/checkpoint-{step}" in log
    assert f"DONE: model saved to {output_dir}" in log
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == total

    reference = final_weights(reference_job["output_dir"])
    resumed = final_weights(output_dir)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the uninterrupted run"


def test_bad_config_fails_with_a_clear_message(slurm_cluster, demo_assets, tmp_path):
    args = demo_overrides(demo_assets, tmp_path / "bad") + ["--learning_rat", "1e-6"]
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *args)
    job_id = job_id_of(proc)
    rc, log = finish(proc, job_id)
    assert rc != 0, log
    assert "Some specified arguments are not used by the HfArgumentParser: ['--learning_rat', '1e-6']" in log
    assert "[launch] ERROR: configs/think.yaml with arguments" in log and "nothing was launched" in log
    assert not (tmp_path / "bad").exists()


def failing_scontrol(cluster, folder: Path, failures: int, **extra) -> dict[str, str]:
    """The cluster's environment with a `scontrol` first on PATH whose first `failures` `requeue` calls fail as a
    slurmctld time-out does; every other call, and the later requeues, exec the real scontrol. sbatch passes PATH on
    to the job."""
    real = shutil.which("scontrol")
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "scontrol"
    wrapper.write_text(
        f"""#!/bin/bash
if [[ "$1" == requeue ]]; then
    calls=$(( $(cat {folder}/requeue_calls 2>/dev/null || echo 0) + 1 ))
    echo "$calls" > {folder}/requeue_calls
    if ((calls <= {failures})); then
        echo "slurm_requeue error: Socket timed out on send/recv operation (injected, call $calls)" >&2
        exit 1
    fi
fi
exec {real} "$@"
"""
    )
    wrapper.chmod(0o755)
    return {**cluster.env, "PATH": f"{folder}{os.pathsep}{cluster.env['PATH']}", **extra}


def _launcher_catches_usr1(job_id: str) -> bool:
    """Whether this job's batch shell runs the launcher and has installed its USR1 trap (its first line): SigCgt in
    /proc (the test cluster's one node is this machine)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            environ = (status.parent / "environ").read_bytes().split(b"\0")
            cmdline = (status.parent / "cmdline").read_bytes()
            caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and b"scripts/launch.sh" in cmdline:
            if int(caught.split()[1], 16) & (1 << (10 - 1)):  # SIGUSR1 = 10
                return True
    return False


def signal_at_start(cluster, job_id: str, timeout: float = 60) -> None:
    """SIGUSR1 to the batch shell as soon as the launcher runs: it is still in its start-up (.env, site profile,
    config probe). Not before: Slurm marks the job RUNNING before its script starts, and a signal then finds no shell
    (Slurm's own pre-timeout signal comes minutes into a job)."""
    deadline = time.monotonic() + timeout
    while not _launcher_catches_usr1(job_id):
        assert time.monotonic() < deadline, f"job {job_id}'s launcher did not start:\n{cluster.logs()}"
        time.sleep(0.02)
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)


def test_signal_at_start_up_requeues_through_a_failing_scontrol_and_completes(slurm_cluster, demo_assets, tmp_path):
    output_dir = tmp_path / "early"
    env = failing_scontrol(slurm_cluster, tmp_path / "bin", failures=1)
    proc = sbatch(
        slurm_cluster, "scripts/dpo_train.sh", *demo_overrides(demo_assets, output_dir, max_steps=2), env=env
    )
    job_id = job_id_of(proc)
    signal_at_start(slurm_cluster, job_id)
    slurm_cluster.release_requeued(job_id)
    rc, log = finish(proc, job_id)

    assert rc == 0, log
    assert log.count("SIGUSR1 during start-up: not starting training") == 1, log
    assert f"PREEMPTED: before training started, nothing to save; requeueing job {job_id}" in log
    assert f"on USR1    checkpoint, then scontrol requeue {job_id} (a batch job)" in log
    assert f"scontrol requeue {job_id} failed (try 1 of 5): slurm_requeue error: Socket timed out" in log
    assert f"scontrol requeue {job_id}: try 2 of 5" in log
    assert (tmp_path / "bin" / "requeue_calls").read_text().strip() == "2"
    assert "(requeued 1x)" in log  # the second life, which trains
    assert f"DONE: model saved to {output_dir}" in log
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_requeue_that_never_works_fails_loudly(slurm_cluster, demo_assets, tmp_path):
    env = failing_scontrol(slurm_cluster, tmp_path / "bin", failures=100, SFM_REQUEUE_BACKOFF_S="1 1")
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *demo_overrides(demo_assets, tmp_path / "out"), env=env)
    job_id = job_id_of(proc)
    signal_at_start(slurm_cluster, job_id)
    rc, log = finish(proc, job_id)

    assert rc == 75, log  # sbatch --wait exits with the job's exit code
    assert [f"try {n} of 3" in log for n in (1, 2, 3)] == [True] * 3, log
    assert f"job {job_id} was preempted but could NOT be requeued" in log
    assert "submit the same command again to resume" in log
    assert (tmp_path / "bin" / "requeue_calls").read_text().strip() == "3"


def test_interactive_allocation_is_never_requeued(slurm_cluster, demo_assets, tmp_path):
    """`salloc ... bash scripts/launch.sh`: Slurm's job record says BatchFlag=0, and a preemption exits 75 as a local
    run does, asking to run the same command again."""
    args = demo_overrides(demo_assets, tmp_path / "out")
    proc = subprocess.Popen(
        ["salloc", "--nodes=1", f"--cpus-per-task={slurm_cluster.cpus}", "bash", "scripts/launch.sh", "demo", *args],
        cwd=REPO, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (children := subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        os.kill(int(children.split()[0]), signal.SIGUSR1)  # salloc's child: the launcher, still starting
        out, _ = proc.communicate(timeout=SBATCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out
    assert "an interactive allocation (salloc/srun, BatchFlag=0) is never requeued" in out
    assert "PREEMPTED: before training started, nothing to save; run the same command again to resume" in out
    assert "requeueing" not in out and "scontrol requeue" not in out


def test_cluster_unavailable_fails_in_ci_and_as_root(monkeypatch):
    for ci, uid, outcome in (("true", 1000, pytest.fail.Exception), ("", 0, pytest.fail.Exception),
                             ("", 1000, pytest.skip.Exception)):  # fmt: skip
        monkeypatch.setenv("CI", ci)
        monkeypatch.setattr(os, "geteuid", lambda uid=uid: uid)
        with pytest.raises(outcome, match="its daemons run as root"):
            cluster_unavailable("its daemons run as root")
