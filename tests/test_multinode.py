"""Multi-node for real: `sbatch --nodes=2 scripts/dpo_train.sh` on the 2-node cluster of tests/multinode_cluster.py.

The real wrapper, submitted unchanged with the demo recipe's values as overrides (tests/test_slurm.py), runs the
launcher's multi-node path: one `accelerate launch` per node through srun, MASTER_ADDR the allocation's first node,
c10d rendezvous there, DeepSpeed ZeRO-2 over gloo between the nodes' own addresses, SIGUSR1 forwarded to every node,
requeue and resume. One CPU process per node (CPU_PROCESSES=1, the launcher's CPU fallback; the GPUs are fake).

- The reference: the same arguments as a 1-node batch job of 2 processes (tests/test_slurm.py's uninterrupted job,
  fixture `reference_job`, whose periodic checkpoints change no number). Same world size, same global batch: every
  step's logged numbers and the final weights must be the same.
- One 2-node job is sent SIGUSR1 mid-training (`scancel --signal=USR1 --batch`): the launcher forwards it to both
  nodes, both ranks save their part of one checkpoint, the job requeues itself and the second life resumes and
  finishes. Its step log (both lives, from trainer_state.json) and its final weights equal the reference's, exactly
  (fp32 on the CPU).
- In another 2-node job node 2's training process is killed: the whole job fails within a bounded time (the
  survivor does not hang in a collective), and is not requeued.
"""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.multinode_cluster import multinode_cluster  # noqa: F401  (the fixture)
from tests.test_slurm import SBATCH_TIMEOUT, demo_overrides, final_weights, job_id_of, sbatch

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
# The demo's 15 steps last ~5 s: the signal and the kill, sent once step 1 is logged, land during training.
TRAIN_ARGS = {"save_steps": 1000}  # no periodic checkpoint: the only one before the end is the preemption's
FAIL_WITHIN_S = 90  # the kill test: from the kill to the job's end (gloo's own timeout would be 30 minutes)
# torch elastic's agent (`accelerate launch ...`) starts each worker as `python -u train_dpo.py ...`; the worker's own
# children (data loading) have its command line too.
AGENT, WORKER = "accelerate launch", r"python\S* -u train_dpo\.py"
WALL_CLOCK = re.compile(r"time|per_second")  # logged measurements of time, which differ from run to run


def step_log(output_dir: Path) -> list[dict]:
    """The logged numbers of every optimizer step (trainer_state.json's log_history, both lives of a resumed run)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def computed(entries: list[dict]) -> list[dict]:
    """The entries without wall-clock measurements (step_time_s, tokens_per_second...) and TRL's num_tokens."""
    return [
        {key: value for key, value in entry.items() if key != "num_tokens" and not WALL_CLOCK.search(key)}
        for entry in entries
    ]


def submit_two_node_job(cluster, assets: dict, output_dir: Path):
    proc = sbatch(
        cluster, "--nodes=2", "--export=ALL,CPU_PROCESSES=1",
        "scripts/dpo_train.sh", *demo_overrides(assets, output_dir, **TRAIN_ARGS),
    )  # fmt: skip
    return proc, job_id_of(proc)


def job_log(job_id: str) -> str:
    """The job's log. srun interleaves the nodes' output in chunks that may split a UTF-8 character (tqdm's bars)."""
    path = REPO / "logs" / f"think-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log {path})"


def wait_for_training(proc, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while "'loss'" not in job_log(job_id):  # step 1 is logged: training runs
        assert time.monotonic() < deadline and proc.poll() is None, job_log(job_id)
        time.sleep(0.25)


def finish(proc, job_id: str) -> tuple[int, str]:
    try:
        proc.wait(timeout=SBATCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, job_log(job_id)


def test_two_node_job_matches_one_node_and_resumes_after_usr1(
    multinode_cluster,  # noqa: F811
    demo_assets,
    reference_job,
    tmp_path,
):
    cluster = multinode_cluster
    assert reference_job["rc"] == 0, reference_job["log"]
    one_node_run = reference_job["output_dir"]
    output_dir = tmp_path / "two-node"
    proc, job_id = submit_two_node_job(cluster, demo_assets, output_dir)
    wait_for_training(proc, job_id)
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    cluster.release_requeued(job_id)
    rc, log = finish(proc, job_id)
    assert rc == 0, log

    first = cluster.nodes[0]
    lives = log.split("(requeued 1x)")
    assert len(lives) == 2, log  # the second life's header: SLURM_RESTART_COUNT=1
    for life in lives:
        assert "processes  2 = 2 x 1  on CPU" in life, log
        assert f"nodes      2 {first[:-1]}[1-2]" in life and f"(master {first}:" in life, log
    # The signal reached both nodes: srun passed it to the step's task on each (each node's slurmd says so), whose
    # supervisor signals the training process. Both ranks stopped together, at least one on its own signal (the
    # other may reach the step end's all-reduce of the flag before its own signal, and then names another rank).
    for node in cluster.nodes:
        assert re.search(rf"Sent signal 10 to StepId={job_id}\.0\b", cluster.slurmd_log(node)), cluster.logs()
    assert lives[0].count("Preemption requested (") == 2, log
    assert "Preemption requested (SIGUSR1 on this rank)" in lives[0], log
    preempted = [line for line in log.splitlines() if "PREEMPTED: checkpoint at step" in line]
    assert len(preempted) == 1 and f"requeueing job {job_id}" in preempted[0], log
    step = int(preempted[0].split("step ")[1].split()[0])
    checkpoint = output_dir / f"checkpoint-{step}"
    assert f"Resuming from {checkpoint}" in lives[1], log
    for rank in (0, 1):  # ZeRO-2: each rank saves its own optimizer shard
        assert (checkpoint / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").exists()
    assert f"DONE: model saved to {output_dir}" in lives[1], log

    reference = step_log(one_node_run)
    assert 0 < step < len(reference), log
    # Every step's loss, grad norm, rewards, learning rate...: exactly. TRL's running `num_tokens` is not in the
    # checkpoint (DPOTrainer._total_train_tokens): a resumed life counts from 0 again, so it is compared up to the
    # preemption only.
    got = step_log(output_dir)
    assert [entry["num_tokens"] for entry in got[:step]] == [entry["num_tokens"] for entry in reference[:step]]
    assert computed(got) == computed(reference)
    expected, resumed = final_weights(one_node_run), final_weights(output_dir)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the 1-node run"


def test_a_killed_node_fails_the_whole_job_without_requeue(multinode_cluster, demo_assets, tmp_path):  # noqa: F811
    cluster = multinode_cluster
    proc, job_id = submit_two_node_job(cluster, demo_assets, tmp_path / "killed")
    wait_for_training(proc, job_id)
    second = cluster.nodes[1]
    processes = cluster.node_processes(second)
    workers = [
        pid
        for pid, (ppid, argv) in processes.items()
        if re.search(WORKER, argv) and ppid in processes and AGENT in processes[ppid][1]
    ]
    assert len(workers) == 1, f"no single training process on {second}: {processes}"
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    rc, log = finish(proc, job_id)
    took = time.monotonic() - killed_at

    assert rc != 0, log
    assert took < FAIL_WITHIN_S, f"the job took {took:.0f} s to end after the kill:\n{log}"
    assert any(line.startswith(" FAILED") for line in log.splitlines()), log  # the launcher's summary
    assert "PREEMPTED" not in log, log
    assert "(requeued" not in log, log
    # A requeued job would be back in the queue (pending); this one is gone, or shown finished.
    assert cluster.job_field(job_id, "Restarts") in (None, "0"), cluster.run(["scontrol", "show", "job", job_id])
    assert not (REPO / "logs" / f".requeue-{job_id}").exists()
