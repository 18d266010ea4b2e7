"""PreemptionCallback: SIGUSR1 -> checkpoint at the next step end, stop, requeue marker; resume gives the same weights.

Also the 2-rank DeepSpeed ZeRO-2 job (real `accelerate launch`, gloo on the CPU) that checks what only shows with
several ranks: two signals that reach one rank while a periodic checkpoint is written stop both after it, with no
second save, and a NaN loss on one rank skips the step (DeepSpeed's overflow check) on both. The full Slurm path
(launcher, srun, requeue) is in test_slurm.py.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from sfm_dpo.checkpoints import is_complete, latest_complete_checkpoint
from sfm_dpo.preemption import REQUEUE_MARKER_ENV, PreemptionCallback, requeue_on_preemption
from tests.test_checkpoints import GuardedTrainer, tiny_trainer, weights

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:  # other test sessions may share this machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SignalAt(TrainerCallback):
    """Sends SIGUSR1 to this process while optimizer step `step` (1-based) runs, as Slurm would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_usr1_checkpoints_stops_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    marker = tmp_path / "logs" / ".requeue-1"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    reference = tiny_trainer(tmp_path / "ref", max_steps=6, save_steps=100)
    reference.train()

    preemption = PreemptionCallback()
    try:
        first = tiny_trainer(tmp_path / "run", callbacks=[SignalAt(3), preemption], max_steps=6, save_steps=100)
        first.train()
    finally:
        preemption.uninstall()
    assert preemption.preempted and preemption.requested_by == "SIGUSR1"
    assert first.state.global_step == 3
    assert is_complete(tmp_path / "run" / "checkpoint-3")
    assert marker.read_text() == "3\n"

    checkpoint = latest_complete_checkpoint(tmp_path / "run")
    assert checkpoint == str(tmp_path / "run" / "checkpoint-3")
    second = tiny_trainer(tmp_path / "run", max_steps=6, save_steps=100)
    second.train(resume_from_checkpoint=checkpoint)
    assert second.state.global_step == 6
    expected, got = weights(reference.model), weights(second.model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_no_signal_no_preemption(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    preemption = PreemptionCallback()
    try:
        trainer = tiny_trainer(tmp_path / "run", callbacks=[preemption], max_steps=3, save_steps=2)
        trainer.train()
    finally:
        preemption.uninstall()
    assert not preemption.preempted and trainer.state.global_step == 3
    assert not marker.exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # uninstall restored pytest's handler


class SignalWhileSaving(GuardedTrainer):
    """Counts its checkpoints; sends SIGUSR1 to this process `times` times while the checkpoint of step `at` is being
    written (model written, optimizer not yet), as Slurm or the launcher's re-send would."""

    at, times = 4, 2

    def _save_checkpoint(self, model, trial):
        self.saved_steps = getattr(self, "saved_steps", []) + [self.state.global_step]
        super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGUSR1)
        super()._save_optimizer_and_scheduler(output_dir)


@pytest.mark.parametrize("when", ["during step 3", "during the periodic save of step 4"])
def test_one_save_per_preemption_whenever_the_signals_come(tmp_path, monkeypatch, when):
    """Two signals in a row, during a step or while a periodic checkpoint is written: one checkpoint, then stop."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    during_save = "save" in when
    preemption = PreemptionCallback()
    callbacks = [preemption] if during_save else [SignalAt(3), SignalAt(3), preemption]
    try:
        trainer = tiny_trainer(
            tmp_path / "run", trainer_cls=SignalWhileSaving, callbacks=callbacks, max_steps=8, save_steps=4
        )
        trainer.at = 4 if during_save else -1
        trainer.train()
    finally:
        preemption.uninstall()
    step = 4 if during_save else 3
    assert preemption.preempted and trainer.state.global_step == step
    assert trainer.saved_steps == [step]  # not a second one at the next step end
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [f"checkpoint-{step}"]
    assert is_complete(tmp_path / "run" / f"checkpoint-{step}")
    assert marker.read_text() == f"{step}\n"


class SignalWhileLoading(GuardedTrainer):
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_while_resuming_stops_before_the_first_step_and_requeues(tmp_path, monkeypatch):
    """A signal during the checkpoint load (or DeepSpeed's start-up) stops before the first step, with nothing new to
    save; `requeue_on_preemption` turns it into the requeue marker and exit 0."""
    marker = tmp_path / "marker"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    tiny_trainer(tmp_path / "run", max_steps=2, save_steps=2).train()

    trainers = []

    @requeue_on_preemption
    def main():
        preemption = PreemptionCallback()
        try:
            trainers.append(
                tiny_trainer(
                    tmp_path / "run", trainer_cls=SignalWhileLoading, callbacks=[preemption], max_steps=6, save_steps=2
                )
            )
            trainers[0].train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
        finally:
            preemption.uninstall()
        return 1  # training went on

    assert main() == 0  # what the launcher sees
    assert trainers[0].state.global_step == 2  # no step trained
    assert marker.read_text().startswith("stopped during start-up")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


TWO_RANKS = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from transformers import TrainerCallback
from sfm_dpo.preemption import PreemptionCallback
from tests.test_checkpoints import GuardedTrainer, tiny_trainer, weights

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])

class RankOnePoison(GuardedTrainer):
    saves = []
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if rank == 1 and self.state.global_step + 1 == 2:  # NaN loss (and gradients) on rank 1, step 2
            loss = loss * float("nan")
        return loss
    def _save_checkpoint(self, model, trial):
        self.saves.append(self.state.global_step)
        super()._save_checkpoint(model, trial)
    def _save_optimizer_and_scheduler(self, output_dir):
        if rank == 1 and self.state.global_step == 4:  # only rank 1, twice, while the periodic save of step 4 runs
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
        super()._save_optimizer_and_scheduler(output_dir)

class Probe(TrainerCallback):
    snaps = {}
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snaps[state.global_step] = weights(model)

preemption, probe = PreemptionCallback(), Probe()
trainer = tiny_trainer(
    out / "run", trainer_cls=RankOnePoison, callbacks=[probe, preemption], max_steps=8, save_steps=4
)
trainer.train()
same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
engine = trainer.model_wrapped
(out / f"rank{rank}.json").write_text(json.dumps({
    "engine": type(engine).__name__,
    "stage": engine.zero_optimization_stage(),
    "nan_step_skipped": same(probe.snaps[2], probe.snaps[1]),
    "next_step_trained": not same(probe.snaps[3], probe.snaps[2]),
    "nonfinite_steps": trainer.nonfinite_steps,
    "preempted": preemption.preempted,
    "stopped_at": trainer.state.global_step,
    "saves": trainer.saves,
}))
torch.distributed.destroy_process_group()  # left up, gloo's threads can abort the interpreter's exit
"""


def test_two_deepspeed_zero2_ranks_agree_on_preemption_during_a_save_and_nan_skip(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would turn DeepSpeed off
    env[REQUEUE_MARKER_ENV] = str(tmp_path / "marker")
    result = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
            str(script), str(tmp_path), str(REPO),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,  # ranks that disagree hang
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["engine"] == "DeepSpeedEngine" and got["stage"] == 2, got
        # DeepSpeed's overflow check skipped the step everywhere; our guard counted it on both ranks.
        assert got["nan_step_skipped"] and got["next_step_trained"] and got["nonfinite_steps"] == 1, got
        # Rank 0 never got the signals but stopped at the same step; the periodic checkpoint they came during served,
        # no second one was written at the next step end.
        assert got["preempted"] and got["stopped_at"] == 4 and got["saves"] == [4], got
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4"]
    assert is_complete(tmp_path / "run" / "checkpoint-4")
    assert (tmp_path / "marker").read_text() == "4\n"


def test_local_launcher_stops_on_usr1_and_exits_for_a_rerun(demo_assets, tmp_path):
    """Without Slurm (`bash scripts/launch.sh demo`): SIGUSR1 to the launcher -> complete checkpoint, exit 75."""
    output_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_USE_CPU"))}
    proc = subprocess.Popen(
        [
            "bash", "scripts/launch.sh", "demo", "--model_name_or_path", str(demo_assets["model"]),
            "--dataset_name", str(demo_assets["think"]), "--output_dir", str(output_dir),
            "--save_steps", "1000", "--logging_steps", "1",
        ],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "'loss'" in line:  # training runs: preempt it
                proc.send_signal(signal.SIGUSR1)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert proc.returncode == 75, log[-5000:]  # sfm_dpo.preemption.REQUEUE_EXIT_CODE
    summary = [line for line in lines if "PREEMPTED: checkpoint at step" in line]
    assert len(summary) == 1 and "run the same command again to resume" in summary[0], log[-5000:]
    step = int(summary[0].split("step ")[1].split()[0])
    assert is_complete(output_dir / f"checkpoint-{step}")
    assert latest_complete_checkpoint(output_dir) == str(output_dir / f"checkpoint-{step}")
    assert not (output_dir / "model.safetensors").exists()  # no final save for a preempted run
    assert "ChildFailedError" not in log


# train_dpo.main with SIGUSR1 sent to one rank (rank 1; the only process when not distributed) at the start of a stage,
# as Slurm would: only the timing is arranged, the handler, the checks and the requeue are train_dpo's own.
STAGE_SIGNAL = r"""
import os, signal, sys
sys.path.insert(0, os.getcwd())
stage, rank = sys.argv.pop(1), int(os.environ.get("RANK", "1"))
import train_dpo
from sfm_dpo import fast_path
from sfm_dpo.config import make_parser

def signalled(fn):
    def wrapped(*args, **kwargs):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return fn(*args, **kwargs)
    return wrapped

if stage == "data preparation":
    train_dpo.prepare_dataset = signalled(train_dpo.prepare_dataset)
elif stage == "reference pass":  # each forward of the pass, on rank 1
    real = fast_path.reference_logps_fn
    fast_path.reference_logps_fn = lambda *args, **kwargs: signalled(real(*args, **kwargs))
code = train_dpo.main(*make_parser().parse_args_and_config())
import torch.distributed as dist
if dist.is_initialized():  # left up, gloo's threads abort one interpreter exit in three or so (SIGABRT)
    sys.exit(f"train_dpo.main returned {code} with the process group still up")
sys.exit(code)
"""


def _train_dpo(demo_assets, tmp_path, output_dir, stage: str | None, processes: int) -> subprocess.CompletedProcess:
    script = tmp_path / "stage_signal.py"
    script.write_text(STAGE_SIGNAL)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would turn DeepSpeed off
    env[REQUEUE_MARKER_ENV] = str(tmp_path / "marker")
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(_free_port()),
        ]  # fmt: skip
    args = [
        "--config", "configs/demo.yaml", "--model_name_or_path", str(demo_assets["model"]),
        "--dataset_name", str(demo_assets["think"]), "--output_dir", str(output_dir), "--max_train_samples", "96",
        "--max_steps", "3", "--save_steps", "100", "--logging_steps", "1",
    ]  # fmt: skip
    return subprocess.run(
        [*launcher, str(script), stage or "none", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip


def test_usr1_during_data_preparation_stops_at_the_boundary_and_requeues(demo_assets, tmp_path):
    """One process: the signal during the data preparation stops the job at the next stage boundary, before the
    reference pass, with the requeue marker and exit 0."""
    output_dir = tmp_path / "run"
    result = _train_dpo(demo_assets, tmp_path, output_dir, "data preparation", processes=1)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert (
        tmp_path / "marker"
    ).read_text() == "stopped during the model load and the data preparation, nothing lost\n"
    assert "Reference log-probs" not in log and "Running training" not in log
    assert not list(output_dir.glob("checkpoint-*"))


def test_usr1_during_the_reference_pass_keeps_its_rows_and_the_requeued_job_trains(demo_assets, tmp_path):
    """2 DeepSpeed ZeRO-2 ranks, the signal on rank 1 during the reference pass: both stop there (no step, no
    checkpoint), with the requeue marker and exit 0; the finished rows are kept, and the next launch computes only the
    rest and trains from step 1 = ln 2 (the kept reference values are right). Both launches leave main with the
    process group destroyed, on the requeue return as on the normal one."""
    output_dir = tmp_path / "run"
    stopped = _train_dpo(demo_assets, tmp_path, output_dir, "reference pass", processes=2)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0, log[-5000:]
    assert (tmp_path / "marker").read_text() == "stopped during reference pass, nothing lost\n"
    kept = re.search(r"Reference pass stopped for preemption: (\d+) of (\d+) rows are kept", log)
    assert kept and 0 < int(kept.group(1)) < int(kept.group(2)), log[-5000:]
    assert "Running training" not in log and not list(output_dir.glob("checkpoint-*"))
    (tmp_path / "marker").unlink()

    resumed = _train_dpo(demo_assets, tmp_path, output_dir, None, processes=2)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    assert f"{kept.group(1)} of {kept.group(2)} rows already computed" in log, log[-5000:]
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["world_size"] == 2
    assert summary["first_and_last"]["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert not (tmp_path / "marker").exists()
