"""Non-finite loss or gradient: the step leaves the weights untouched, is counted, and N in a row stop the run.

Single process here (the plain-Trainer path: gradients dropped before `optimizer.step()`); the DeepSpeed ZeRO-2 path,
where DeepSpeed's own overflow check skips the step on every rank, runs in test_preemption.py's 2-rank job.
"""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from sfm_dpo.nonfinite import NonFiniteError
from tests.test_checkpoints import GuardedTrainer, tiny_trainer, weights


class PoisonedTrainer(GuardedTrainer):
    """Multiplies the loss of the optimizer steps in `bad_steps` (1-based) by NaN: loss and gradients become NaN, as
    after an overflow. Only the injection is fake; the guard is the real one."""

    bad_steps: set[int] = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step + 1 in self.bad_steps:
            loss = loss * float("nan")
        return loss


class Snapshots(TrainerCallback):
    def __init__(self):
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = weights(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path):
    snapshots = Snapshots()
    trainer = tiny_trainer(tmp_path, trainer_cls=PoisonedTrainer, callbacks=[snapshots], max_steps=5, save_steps=100)
    trainer.bad_steps = {3}
    trainer.train()
    after = snapshots.after_step
    assert _same(after[3], after[2]), "the poisoned step changed the weights"
    assert not _same(after[4], after[3]) and not _same(after[2], after[1]), "healthy steps must train"
    assert all(torch.isfinite(t).all() for t in after[5].values() if t.is_floating_point())
    assert trainer.nonfinite_steps == 1 and trainer.consecutive_nonfinite_steps == 0
    logged = [log["nonfinite_steps"] for log in snapshots.logs if "loss" in log]
    assert logged == [0, 0, 1, 1, 1]


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    snapshots = Snapshots()
    trainer = tiny_trainer(
        tmp_path,
        trainer_cls=PoisonedTrainer,
        callbacks=[snapshots],
        trainer_kwargs={"max_consecutive_nonfinite": 3},
        max_steps=10,
        save_steps=100,
    )
    trainer.bad_steps = {2, 4, 5, 6, 7, 8, 9, 10}  # one isolated bad step, then a run of them
    with pytest.raises(
        NonFiniteError, match=r"Stopping at step 6: 3 optimizer steps in a row .*max_consecutive_nonfinite=3"
    ):
        trainer.train()
    assert trainer.nonfinite_steps == 4
    assert _same(snapshots.after_step[6], snapshots.after_step[3])
    assert all(math.isfinite(t.abs().max().item()) for t in snapshots.after_step[6].values() if t.is_floating_point())


def test_max_consecutive_nonfinite_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be >= 1"):
        tiny_trainer(tmp_path, trainer_kwargs={"max_consecutive_nonfinite": 0})


def test_nonfinite_counters_survive_a_resume(tmp_path):
    """Steps 1, 3 and 4 are bad and the job ends at the checkpoint of step 4 (a requeue); in the resumed job step 5 is
    the third bad step in a row and stops the run, and the total counts all four."""
    kwargs = dict(trainer_cls=PoisonedTrainer, trainer_kwargs={"max_consecutive_nonfinite": 3}, save_steps=4)
    first = tiny_trainer(tmp_path, max_steps=4, **kwargs)
    first.bad_steps = {1, 3, 4, 5}
    first.train()
    assert (first.nonfinite_steps, first.consecutive_nonfinite_steps) == (3, 2)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["_NonFiniteCallback"]["attributes"] == {
        "consecutive_nonfinite_steps": 2,
        "nonfinite_steps": 3,
    }

    resumed = tiny_trainer(tmp_path, max_steps=8, **kwargs)
    resumed.bad_steps = first.bad_steps
    with pytest.raises(NonFiniteError, match=r"Stopping at step 5: 3 optimizer steps in a row"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.nonfinite_steps == 4
