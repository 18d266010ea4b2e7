"""Held-out evaluation on the packed fast path, and the per-step timing that the run report plots.

`PackedEvaluationMixin` (a base of `FastDPOTrainer`, before `SFMDPOTrainer`) replaces the Trainer's evaluation
dataloader and loop on the packed path:
- `get_eval_dataloader`: every eval pair exactly once, dealt to the ranks (balanced tokens) and packed into the
  training token budget (`packing.plan_epoch` with a single "step" holding all pairs); every rank runs the same number
  of micro-batches (zero-weight fillers, `packing.equalize_plan`), so any collective inside a forward stays in step.
- `evaluation_loop`: the packed forward and `FastDPOTrainer._compute_loss` in "eval" mode on each micro-batch. The
  stock loop cannot be kept: it averages per-batch losses unweighted (our micro-batches hold different numbers of
  pairs, fillers none) and gathers once per batch. Here the loss is the pair-weighted mean over all ranks, and the
  metrics (`rewards/*`, `rewards_norm/*`, `logratios/*`, ...) go through the same pair-weighted logging window as in
  training, logged with TRL's `eval_` prefix by `log`.
- `EvaluateAtEnd`: with an eval dataset, the last step evaluates too, whatever `eval_steps` (before the final
  checkpoint is saved, so its trainer_state.json holds the figures).
- `NoEvaluationTwiceOnResume`: a resumed run's `eval_on_start` skips the step it resumes at when that step's
  evaluation is in the checkpoint's log already.
- `StepTimer` and `log`: each training log gets `step_time_s` (mean wall time of the window's optimizer steps, data
  loading included, evaluation, logging and checkpoints excluded) and `tokens_per_second` (real training tokens of
  all ranks over those seconds).
"""

import logging
import time

import torch
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from .packing import PackedPreferenceCollator, PlannedDataset, dataset_pair_tokens, equalize_plan, plan_epoch

logger = logging.getLogger(__name__)


def plan_eval(
    pair_tokens: list[int],
    world_size: int,
    max_tokens_per_microbatch: int | None = None,
    pairs_per_microbatch: int | None = None,
) -> list[list[list[tuple[int, float]]]]:
    """`plan[rank][micro-batch]` = `(row, weight)` keys: every row once with weight 1 on one rank, the ranks balanced
    by tokens, each rank with the same number of micro-batches (zero-weight copies of the shortest row fill a rank
    short of pairs). Give one of `max_tokens_per_microbatch` and `pairs_per_microbatch`. Deterministic."""
    if not pair_tokens:
        raise ValueError("The eval dataset is empty.")
    (step,) = plan_epoch(
        pair_tokens, max(len(pair_tokens), world_size), world_size, seed=0, epoch=0,
        max_tokens_per_microbatch=max_tokens_per_microbatch, pairs_per_microbatch=pairs_per_microbatch,
    )  # fmt: skip
    n_microbatches = max(1, max(len(bins) for bins in step))
    filler = min(range(len(pair_tokens)), key=lambda i: pair_tokens[i])
    (plan,) = equalize_plan([step], n_microbatches, pair_tokens, filler)
    return plan


class EvalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of `plan_eval`, as `PlannedDataset` keys `(row, weight, pairs_in_step)`. Not sharded
    by accelerate (the dataloader is not `prepare`d): each rank builds its own from the same deterministic plan."""

    def __init__(self, plan, rank: int):
        self.microbatches = plan[rank]

    def __iter__(self):
        n_pairs = sum(weight > 0 for b in self.microbatches for _, weight in b)
        for b in self.microbatches:
            yield [(row, weight, n_pairs) for row, weight in b]

    def __len__(self) -> int:
        return len(self.microbatches)


class EvaluateAtEnd(TrainerCallback):
    """Evaluates after the last optimizer step, like an `eval_steps` boundary would (the Trainer then logs and saves
    in its usual order)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


class NoEvaluationTwiceOnResume(TrainerCallback):
    """`eval_on_start` evaluates the step a run starts at. A resumed run starts at its checkpoint's step, whose
    evaluation its log often holds already (an `eval_steps` boundary or the last step evaluates before the checkpoint
    is saved): the step would be evaluated and logged twice. The Trainer checks `args.eval_on_start` right after
    `on_train_begin` (`Trainer._inner_training_loop`, transformers 5) with no control flag for it, so this turns it off
    there for that one `train()` call, and back on at its end. A step not evaluated yet is evaluated, as asked."""

    def __init__(self):
        self._turned_off = False

    def on_train_begin(self, args, state, control, **kwargs):
        evaluated = any(
            entry.get("step") == state.global_step and any(key.startswith("eval_") for key in entry)
            for entry in state.log_history
        )
        if args.eval_on_start and state.global_step > 0 and evaluated:
            logger.info("Step %d was evaluated before its checkpoint: not again at the start.", state.global_step)
            args.eval_on_start, self._turned_off = False, True

    def on_train_end(self, args, state, control, **kwargs):
        if self._turned_off:
            args.eval_on_start, self._turned_off = True, False


class StepTimer(TrainerCallback):
    """Wall seconds and count of optimizer steps since the last `take()`. The clock restarts after each step and
    after anything else the Trainer does between steps (log, evaluate, save), so those are not counted."""

    def __init__(self):
        self.seconds, self.steps, self._mark = 0.0, 0, time.perf_counter()

    def _restart(self, *args, **kwargs):
        self._mark = time.perf_counter()

    on_train_begin = on_log = on_evaluate = on_save = _restart

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds += now - self._mark
        self.steps += 1
        self._mark = now

    def take(self) -> tuple[float, int]:
        taken = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return taken


class PackedEvaluationMixin:
    """Put before `SFMDPOTrainer` in `FastDPOTrainer`'s bases. Expects `FastDPOTrainer`'s `packed`,
    `max_tokens_per_microbatch`, `share_prompt` and `_compute_loss` (eval mode: the pair-weighted mean of the micro-batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_timer = StepTimer()
        self._tokens_at_last_log = 0
        self.add_callback(self._step_timer)
        if self.eval_dataset is not None:
            self.add_callback(EvaluateAtEnd())
            self.add_callback(NoEvaluationTwiceOnResume())

    # --- data --------------------------------------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset=None):
        if not getattr(self, "packed", False):
            return super().get_eval_dataloader(eval_dataset)
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Evaluation needs an eval dataset: pass --eval_split_ratio.")
        budget = self.max_tokens_per_microbatch
        plan = plan_eval(
            dataset_pair_tokens(dataset, self.share_prompt), self.args.world_size, max_tokens_per_microbatch=budget,
            pairs_per_microbatch=None if budget else self.args.per_device_eval_batch_size,
        )  # fmt: skip
        return torch.utils.data.DataLoader(
            PlannedDataset(dataset),
            batch_sampler=EvalBatchSampler(plan, self.args.process_index),
            collate_fn=PackedPreferenceCollator(self.share_prompt),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # --- loop ----------------------------------------------------------------------------------------------------------

    def evaluate(self, *args, **kwargs):
        """The Trainer's, then the model back in training mode: otherwise the logs after an evaluation at the last step
        (the final `train_runtime`, ...) would be taken for evaluation logs (TRL's `log` reads the mode off the
        model)."""
        was_training = self.model.training
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.model.train(was_training)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        if not getattr(self, "packed", False):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)  # fmt: skip
        if self.is_deepspeed_enabled and self.deepspeed is None:
            raise RuntimeError(
                "evaluate() before train() under DeepSpeed is not supported on the packed path; the held-out split is "
                "evaluated during training (--eval_strategy steps, --eval_on_start) and after its last step."
            )
        # As the stock loop: the bare module under no_grad (no DeepSpeed engine, no DDP wrapper needed).
        model = self._wrap_model(self.model, training=False)
        model.eval()
        logger.info("***** Running %s: %d micro-batches on this rank *****", description, len(dataloader))
        totals = torch.zeros(2, device=self.args.device)  # [loss x pairs, pairs] of this rank
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)  # also adds the micro-batch to the "eval" logging window
            pairs = inputs["pair_weights"].sum().to(totals)
            # A filler-only micro-batch has no pair: its mean loss is 0/0, and counts nothing.
            totals += torch.stack([torch.where(pairs > 0, loss.detach().float() * pairs, 0.0), pairs])
        loss_sum, n_pairs = self.accelerator.gather(totals[None]).sum(0).tolist()
        metrics = {f"{metric_key_prefix}_loss": loss_sum / n_pairs if n_pairs else float("nan"),
                   f"{metric_key_prefix}_pairs": int(n_pairs)}  # fmt: skip
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(n_pairs))

    # --- logging -------------------------------------------------------------------------------------------------------

    def log(self, logs, start_time=None):
        if "loss" in logs and self.model.training:  # a training log (evaluation logs eval_loss)
            seconds, steps = self._step_timer.take()
            tokens = getattr(self, "_total_train_tokens", 0)
            if steps and seconds > 0:
                logs["step_time_s"] = seconds / steps
                logs["tokens_per_second"] = (tokens - self._tokens_at_last_log) / seconds
            self._tokens_at_last_log = tokens
        super().log(logs, start_time)
