"""End to end on a real Slurm cluster (tests/slurm_cluster.py): the real sbatch wrapper, submitted unchanged with
`sbatch --wait`, trains the tiny demo model on the CPU (the cluster's GPUs are fake) under DeepSpeed ZeRO-2.

- a job trains and saves;
- a job sent SIGUSR1 mid-training checkpoints, requeues itself, resumes, and ends with the uninterrupted job's step
  count and exactly its weights (fp32 on the CPU);
- a job with a bad argument fails with a clear message in logs/ and a non-zero exit code.

The think wrapper runs with the demo recipe's values as command-line overrides (the recipe is fixed by the wrapper).
"""

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

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


def sbatch(cluster, *args: str) -> subprocess.Popen:
    """`sbatch --wait` in the background; the job id is its first output line (--parsable)."""
    cpus = str(cluster.cpus)  # the wrapper asks for 32 CPUs per task; this node has fewer
    return subprocess.Popen(
        ["sbatch", "--wait", "--parsable", f"--cpus-per-task={cpus}", *args],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
    return proc.returncode, log.read_text() if log.exists() else f"(no log {log})"


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def expected_steps(output_dir: Path) -> int:
    """One epoch of the pairs actually used, 16 pairs per optimizer step (the demo's effective batch)."""
    report = json.loads((output_dir / "data_report.json").read_text())
    return math.ceil(report["pairs_used"] / 16)


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, demo_assets, tmp_path_factory):  # noqa: F811
    output_dir = tmp_path_factory.mktemp("slurm") / "reference"
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *demo_overrides(demo_assets, output_dir))
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


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, demo_assets, reference_job, tmp_path):  # noqa: F811
    output_dir = tmp_path / "preempted"
    # No periodic checkpoint: the only one before the end is the preemption's.
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *demo_overrides(demo_assets, output_dir, save_steps=1000))
    job_id = job_id_of(proc)
    log_path = REPO / "logs" / f"think-{job_id}.out"
    deadline = time.monotonic() + 300
    while "'loss'" not in (log_path.read_text() if log_path.exists() else ""):  # training has started
        assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
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


def test_bad_config_fails_with_a_clear_message(slurm_cluster, demo_assets, tmp_path):  # noqa: F811
    args = demo_overrides(demo_assets, tmp_path / "bad") + ["--learning_rat", "1e-6"]
    proc = sbatch(slurm_cluster, "scripts/dpo_train.sh", *args)
    job_id = job_id_of(proc)
    rc, log = finish(proc, job_id)
    assert rc != 0, log
    assert "Some specified arguments are not used by the HfArgumentParser: ['--learning_rat', '1e-6']" in log
    assert "[launch] ERROR: configs/think.yaml with arguments" in log and "nothing was launched" in log
    assert not (tmp_path / "bad").exists()
