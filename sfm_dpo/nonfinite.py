"""A non-finite loss or gradient skips the optimizer step, is counted, and stops the run after N in a row.

Where the skip happens depends on the engine, because under DeepSpeed the optimizer steps *inside* backward
(accelerate's `DeepSpeedEngineWrapper.backward` calls `engine.step()`), before any Trainer hook could look at the
gradients:
- DeepSpeed ZeRO-1/2 skips the step itself when the gradients are not finite (its overflow check: always in fp16,
  in bf16 with `bf16.check_grad_overflow`, true by default in deepspeed 0.19, in fp32 through the gradient-norm check
  when `gradient_clipping` > 0) and reports it as `optimizer.step_was_skipped`. We only verify: a step with a
  non-finite loss that DeepSpeed did apply is an error, immediately.
- Without DeepSpeed, the Trainer calls `optimizer.step()` after `on_pre_optimizer_step`; there we drop every gradient
  (`p.grad = None`, which torch optimizers skip) when any rank saw a non-finite loss or gradient.
The decision is all-reduced, so every rank skips (and stops) at the same step.

Both counters (the streak and the total `nonfinite_steps`) live in each checkpoint's trainer_state.json, through
transformers' stateful callbacks (`ExportableState`), and are restored on resume: a streak that spans a requeue
still stops the run, and the total counts the whole run, not this job's part of it.
"""

import logging
import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .preemption import any_rank

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class _NonFiniteCallback(TrainerCallback, ExportableState):
    def __init__(self, trainer: "NonFiniteGuardMixin"):
        self.trainer = trainer
        self.step_bad = False  # agreed by all ranks for the current optimizer step

    def state(self) -> dict:
        streak, total = self.trainer.consecutive_nonfinite_steps, self.trainer.nonfinite_steps
        return {"args": {}, "attributes": {"consecutive_nonfinite_steps": streak, "nonfinite_steps": total}}

    def on_train_begin(self, args, state, control, **kwargs):
        # Read back here rather than through `restore_callback_states_from_checkpoint` (off by default, and it would
        # rebuild the callback from its args, which cannot hold the trainer).
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)
        if saved is None:  # a checkpoint from before the counters were saved: transformers' save needs the key
            if state.global_step > 0:
                logger.warning(
                    "The checkpoint has no non-finite step counters; counting from 0 from step %d.", state.global_step
                )
            state.stateful_callbacks[name] = self.state()
            return
        self.trainer.consecutive_nonfinite_steps = int(saved["attributes"]["consecutive_nonfinite_steps"])
        self.trainer.nonfinite_steps = int(saved["attributes"]["nonfinite_steps"])
        if self.trainer.nonfinite_steps:
            logger.info(
                "Resumed the non-finite step counters at step %d: %d in total, %d in a row.",
                state.global_step, self.trainer.nonfinite_steps, self.trainer.consecutive_nonfinite_steps,
            )  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            return  # the step already happened inside backward; see on_optimizer_step
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local_bad = trainer._loss_nonfinite or not all(bool(torch.isfinite(g).all()) for g in grads)
        self.step_bad = any_rank(local_bad)
        if self.step_bad:
            for p in model.parameters():
                p.grad = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        trainer = self.trainer
        if not trainer.is_deepspeed_enabled:
            return
        loss_bad = any_rank(trainer._loss_nonfinite)
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # synced across ranks by DeepSpeed
        if loss_bad and not skipped:
            raise NonFiniteError(
                f"Step {state.global_step + 1}: the loss was not finite but DeepSpeed applied the update, so the "
                "weights may be corrupt. Enable its overflow check (max_grad_norm > 0 in fp32, "
                "bf16.check_grad_overflow in ds_config.json)."
            )
        self.step_bad = loss_bad or skipped

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._loss_nonfinite = False
        if not self.step_bad:
            trainer.consecutive_nonfinite_steps = 0
            return
        self.step_bad = False
        trainer.consecutive_nonfinite_steps += 1
        trainer.nonfinite_steps += 1
        logger.warning(
            "Step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total, limit %d in a row)",
            state.global_step,
            trainer.consecutive_nonfinite_steps,
            trainer.nonfinite_steps,
            trainer.max_consecutive_nonfinite,
        )
        if trainer.consecutive_nonfinite_steps >= trainer.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"Stopping at step {state.global_step}: {trainer.consecutive_nonfinite_steps} optimizer steps in a "
                f"row had a non-finite loss or gradient (max_consecutive_nonfinite={trainer.max_consecutive_nonfinite})"
                ". The weights were not updated by them; resume from the last checkpoint after fixing the cause "
                "(learning rate, data, precision)."
            )


class NonFiniteGuardMixin:
    """Put before the Trainer class in the bases; accepts `max_consecutive_nonfinite` (default 10) as a keyword.

    Logs `nonfinite_steps` (total skipped so far) with the training metrics.
    """

    def __init__(self, *args, max_consecutive_nonfinite: int = 10, **kwargs):
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        super().__init__(*args, **kwargs)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.consecutive_nonfinite_steps = 0
        self.nonfinite_steps = 0
        self._loss_nonfinite = False  # any micro-batch of the current optimizer step, this rank
        self.add_callback(_NonFiniteCallback(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(loss.item()):
            self._loss_nonfinite = True
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs only, not eval
            logs["nonfinite_steps"] = self.nonfinite_steps
        super().log(logs, *args, **kwargs)
