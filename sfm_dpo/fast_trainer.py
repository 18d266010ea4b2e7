"""`FastDPOTrainer`: `SFMDPOTrainer` on the padding-free packed forward with token-budget micro-batches.

TRL's DPOTrainer stays the engine (Trainer loop, optimizer, DeepSpeed, checkpoints, TRL's fused LM head); only the
data path and the forward change:
- `get_train_dataloader`: `TokenBudgetBatchSampler` micro-batches, packed by `PackedPreferenceCollator` (one row, no
  pad token).
- `_compute_loss`: `sfm_dpo.packing.packed_forward` on the policy (and the reference, unless the batch carries
  precomputed `ref_chosen_logps` / `ref_rejected_logps`), then TRL 1.16's `sigmoid` / `sigmoid_norm` losses
  (trl/trainer/dpo_trainer.py `_compute_loss`) and the same metrics, pair-weighted over the logging window.

`args.padding_free` (TRL's own flag, which TRL 1.16 ignores) selects the path: false gives SFMDPOTrainer's stock
padded behaviour, for comparison.
"""

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from transformers.trainer_callback import ExportableState, TrainerCallback
from trl.models.utils import disable_gradient_checkpointing

from .attention import apply_backend, select_backend_for_model, shared_prompt_supported
from .evaluation import PackedEvaluationMixin
from .packing import (
    REF_COLUMNS,
    PackedPreferenceCollator,
    PlannedDataset,
    TokenBudgetBatchSampler,
    dataset_pair_tokens,
    packed_forward,
)
from .trainer import SFMDPOTrainer, normalized_reward_metrics

logger = logging.getLogger(__name__)

SUPPORTED_LOSSES = ("sigmoid", "sigmoid_norm")
PAIR_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    "rewards_norm/chosen", "rewards_norm/rejected", "rewards_norm/margins", "rewards_norm/accuracies",
    "logratios/chosen", "logratios/rejected",
)  # fmt: skip
TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def _check_supported(args, model) -> None:
    """The packed path computes TRL's sigmoid losses only; everything else fails here, at start-up."""
    unsupported = [loss for loss in args.loss_type if loss not in SUPPORTED_LOSSES]
    problems = []
    if unsupported:
        problems.append(f"loss_type {unsupported} (supported: {SUPPORTED_LOSSES})")
    if args.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type={args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        problems.append("ld_alpha")
    if args.use_weighting:
        problems.append("use_weighting")
    if getattr(args, "sync_ref_model", False):
        problems.append("sync_ref_model")
    if args.router_aux_loss_coef:
        problems.append("router_aux_loss_coef (MoE)")
    if getattr(model, "peft_config", None) is not None:
        problems.append("PEFT models")
    if problems:
        raise ValueError(
            f"The packed fast path (padding_free=True) does not support: {'; '.join(problems)}. Set "
            "--padding_free false to train with stock TRL."
        )


class PackingPlanRecord(TrainerCallback, ExportableState):
    """Keeps, in each checkpoint's trainer_state.json (`stateful_callbacks`), a digest of the pairs of every planned
    step (`TokenBudgetBatchSampler.step_digests`), and stops a resume whose remaining steps of the epoch would train
    other pairs. A resumed Trainer skips the steps already trained by count, so with another plan the rest of the
    epoch is not the rest of the original order: some pairs would train twice in it and others not at all, and
    nothing in the losses would show it. A stop, not a warning: a sweep's requeued jobs resume unattended, and a
    warning in a 20-hour log is a silently wrong result. Changes that keep the pairs of each step (world size, token
    budget, max_steps) pass silently."""

    def __init__(self, step_digests: list[list[str]]):
        self.step_digests = step_digests

    def state(self) -> dict:
        return {"args": {"step_digests": self.step_digests}, "attributes": {}}

    @staticmethod
    def _remaining(step_digests: list[list[str]], global_step: int) -> tuple[int, list[str]]:
        """The epoch a resume at `global_step` is in and the digests of its steps still to come, by the Trainer's
        arithmetic (`Trainer._init_training_state`: epoch = global_step // steps per epoch)."""
        epoch, done = divmod(global_step, len(step_digests[0]))
        return epoch, step_digests[epoch % len(step_digests)][done:]

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)
        if saved is None or "step_digests" not in saved["args"]:
            # A checkpoint from before this record: transformers' next save would fail on a missing key.
            state.stateful_callbacks[name] = self.state()
            if state.global_step > 0:
                logger.warning("The checkpoint has no record of its micro-batch plan; resuming without checking it.")
            return
        saved_digests = saved["args"]["step_digests"]
        if all(state.global_step % len(digests[0]) == 0 for digests in (saved_digests, self.step_digests)):
            return  # a fresh start, or an epoch boundary of both plans: the next epoch is trained from its first step
        epoch, before = self._remaining(saved_digests, state.global_step)
        _, now = self._remaining(self.step_digests, state.global_step)
        horizon = max(state.max_steps - state.global_step, 0)  # the steps this run will train in that epoch
        before, now = before[:horizon], now[:horizon]
        if before != now:
            first = next((i for i, (a, b) in enumerate(zip(before, now)) if a != b), min(len(before), len(now)))
            raise ValueError(
                f"Resuming at step {state.global_step} in {args.output_dir}: this run's plan trains other pairs than "
                f"the checkpoint's from step {state.global_step + first + 1} on (epoch {epoch}). The pairs of a step "
                "come from the seed (data_seed, else seed), the training rows and their token counts, the pairs per "
                "optimizer step (effective_batch_size) and the planner's code: one of them changed since the "
                "checkpoint. Going on would train some pairs of this epoch twice and others not at all. Resume with "
                "the checkpoint's settings, or train its weights as a new run (--model_name_or_path CHECKPOINT_DIR "
                "with a fresh output_dir)."
            )


class SamplerEpoch(TrainerCallback):
    """Sets the sampler's epoch at the start of every epoch, from the Trainer's own arithmetic (epoch = global_step //
    steps per epoch, as `Trainer._init_training_state` derives the epoch to resume in).

    The Trainer's and accelerate's `set_epoch` calls reach a batch sampler through one wrapper at most: after a
    mid-epoch resume on several ranks the loader's sampler is `SkipBatchSampler(BatchSamplerShard(sampler))`
    (accelerate's `skip_first_batches` around `prepare_data_loader`'s shard), and the sampler would stay at epoch 0,
    replaying epoch 0's order in place of the rest of the epoch it resumes in."""

    def __init__(self, sampler: TokenBudgetBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(state.global_step // self.sampler.steps_per_epoch)


class ContinueTokenCount(TrainerCallback):
    """A resumed run's `num_tokens` (TRL's running count of trained tokens, kept on the trainer, not in checkpoints) and
    `tokens_per_second` go on from the checkpoint's last logged count, which is in its `log_history`, instead of
    restarting at 0 and under-reporting the run's tokens and rate."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        counts = [entry["num_tokens"] for entry in state.log_history if "num_tokens" in entry and "loss" in entry]
        if counts and state.global_step > 0:
            self.trainer._total_train_tokens = self.trainer._tokens_at_last_log = int(counts[-1])


# Per completion token: how far the policy's summed log-probs on the first micro-batch may be from the cached
# reference's at a fresh start (same weights, another packing: only the kernels' rounding differs). bf16 / fp16 /
# TF32: 0.05 nats, ~50x what bench/README.md measured between the packed bf16 forward (compiled, other row sizes) and
# stock TRL at 1.4B on an H100 (log-probs agree to 1e-4 relative, i.e. ~1e-3 nats per token at the ~10.8 nats per
# token of a random-init model). fp32 rounds 2^16 times finer; the CPU tests see < 1e-6 per token, and 1e-3 leaves
# room for other BLAS kernels. Weights of another model or revision move the log-probs by far more (two random tiny
# models: up to 0.06 per token; trained models: tenths of a nat).
REFERENCE_TOLERANCE_PER_TOKEN = {"fp32": 1e-3, "low_precision": 5e-2}


def reference_tolerance(completion_lengths: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """`[S]` tolerance (nats) of each sequence's summed completion log-prob: the per-token tolerance x its tokens (the
    rounding of a sum grows with its terms; a 1-token sequence keeps one token's worth)."""
    per_token = REFERENCE_TOLERANCE_PER_TOKEN["low_precision" if low_precision else "fp32"]
    return per_token * completion_lengths.float().clamp(min=1)


class FastDPOTrainer(PackedEvaluationMixin, SFMDPOTrainer):
    """`SFMDPOTrainer` with the packed forward. Extra arguments (all keyword):

    attn_backend: "auto" | "varlen" | "flash_attention_2" | "flex" | "sdpa"; probed at start-up, falling back in
        that order when the request does not work here (see `sfm_dpo.attention.select_backend`).
    max_tokens_per_microbatch: token budget of one packed micro-batch (prompt counted once per sequence). None keeps
        `per_device_train_batch_size` pairs per micro-batch (packed, balanced by tokens). With a budget,
        `gradient_accumulation_steps` is replaced by the number of micro-batches the data needs per step.
    pairs_per_step: pairs per optimizer step over all ranks; default per_device x accumulation x world size.
    reference_cache: the folder the precomputed reference log-probs were read from (or written to), named in the
        errors of the start-of-training check that the policy still reproduces them; None when not cached.
    share_prompt: compute each pair's prompt once (`sfm_dpo.packing.pack_pairs`); the attention backend must compute
        the shared layout exactly here (probed; refused otherwise).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        *,
        attn_backend: str = "auto",
        max_tokens_per_microbatch: int | None = None,
        pairs_per_step: int | None = None,
        reference_cache: str | None = None,
        share_prompt: bool = False,
        train_dataset=None,
        data_collator=None,
        **kwargs,
    ):
        if args is None or isinstance(model, str):
            raise ValueError("FastDPOTrainer needs an instantiated model and a DPOConfig.")
        self.packed = bool(args.padding_free)
        self.reference_cache = reference_cache
        self.max_tokens_per_microbatch = max_tokens_per_microbatch  # the eval dataloader packs to it too
        if not self.packed:
            logger.info("padding_free=False: stock TRL padded batches (SFMDPOTrainer), for comparison.")
            super().__init__(
                model, ref_model, args, data_collator=data_collator, train_dataset=train_dataset, **kwargs
            )
            return
        _check_supported(args, model)
        if data_collator is not None:
            raise ValueError("FastDPOTrainer packs its own micro-batches; do not pass a data_collator.")
        if max_tokens_per_microbatch is not None and max_tokens_per_microbatch < 1:
            raise ValueError(f"max_tokens_per_microbatch must be positive, got {max_tokens_per_microbatch}.")

        self.attn_backend = select_backend_for_model(attn_backend, model, args)
        self.share_prompt = share_prompt
        if share_prompt:
            reason = shared_prompt_supported(self.attn_backend, model, args)
            if reason is not None:
                raise ValueError(
                    f"share_prompt=True, but the {self.attn_backend} attention backend does not compute the shared "
                    f"layout here: {reason}. Use another attn_backend or share_prompt=False."
                )
        apply_backend(model, self.attn_backend)
        if ref_model is not None:
            apply_backend(ref_model, self.attn_backend)

        # The step plan, made before the accelerator exists: its micro-batch count becomes gradient_accumulation_steps.
        world_size = args.world_size
        self.pairs_per_step = (
            pairs_per_step or args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
        )
        if args.max_steps > 0:
            steps_per_epoch = math.ceil(len(train_dataset) / self.pairs_per_step)
            num_epochs = math.ceil(args.max_steps / steps_per_epoch)
        else:
            num_epochs = math.ceil(args.num_train_epochs)
        self.batch_sampler = TokenBudgetBatchSampler(
            dataset_pair_tokens(train_dataset),
            self.pairs_per_step,
            world_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_epochs=num_epochs,
            max_tokens_per_microbatch=max_tokens_per_microbatch,
            pairs_per_microbatch=None if max_tokens_per_microbatch else args.per_device_train_batch_size,
            packed_tokens=dataset_pair_tokens(train_dataset, share_prompt=True) if share_prompt else None,
        )
        n_micro = self.batch_sampler.microbatches_per_step
        stats = self.batch_sampler.stats()
        logger.info(
            "Packed batches: %d pairs per optimizer step on %d ranks, %d micro-batches per rank and step (%s), "
            "micro-batch tokens max %d, mean %.0f%s.",
            self.pairs_per_step, world_size, n_micro,
            f"token budget {max_tokens_per_microbatch}" if max_tokens_per_microbatch
            else f"{args.per_device_train_batch_size} pairs each",
            stats["max_tokens"], stats["mean_tokens"],
            f"; prompts shared: {sum(self.batch_sampler.packed_tokens):,} tokens computed of "
            f"{sum(self.batch_sampler.pair_tokens):,}" if share_prompt else "",
        )  # fmt: skip
        if n_micro != args.gradient_accumulation_steps:
            logger.info(
                "gradient_accumulation_steps: %d -> %d (micro-batches per step).",
                args.gradient_accumulation_steps,
                n_micro,
            )
            _set_gradient_accumulation(args, n_micro)

        # TRL 1.16 warns that padding_free is disabled and pads anyway; it never sees the flag, we do the packing.
        args.padding_free = False
        try:
            with _without_trl_model_hash():
                super().__init__(
                    model, ref_model, args, data_collator=PackedPreferenceCollator(share_prompt),
                    train_dataset=train_dataset, **kwargs,
                )  # fmt: skip
        finally:
            args.padding_free = True
        self._precompute_model_hash = None  # TRL's reference cache name, unused here (`_without_trl_model_hash`)
        if self.ref_model is not None:
            apply_backend(self.accelerator.unwrap_model(self.ref_model), self.attn_backend)
        # Each micro-batch's loss is already scaled by world_size / pairs_in_step (see `_compute_loss`).
        self.loss_is_scaled_for_ga = True
        # Per logging window: [2, metrics] sums and counts, and real tokens, on this rank's device; gathered in `log`.
        self._window = {"train": None, "eval": None}
        self.add_callback(PackingPlanRecord(self.batch_sampler.step_digests()))
        self.add_callback(SamplerEpoch(self.batch_sampler))
        self.add_callback(ContinueTokenCount(self))
        self._reference_check_pending = True  # the first training micro-batch compares the policy with the cache

    # --- data --------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        if not self.packed:
            return super().get_train_dataloader()
        dataloader = torch.utils.data.DataLoader(
            PlannedDataset(self.train_dataset),
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(dataloader)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if not self.packed:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if set(REF_COLUMNS) <= set(dataset.column_names):
            logger.info("Using the reference log-probs already in the %s dataset.", name)
            return dataset
        raise ValueError(
            f"precompute_ref_log_probs=True but the {name} dataset has no {REF_COLUMNS} columns. On the packed path, "
            "compute them with sfm_dpo.ref_cache.load_or_compute(dataset, sfm_dpo.packing.reference_logps_fn(...), "
            "...) before building the trainer, or set precompute_ref_log_probs=False to keep a reference model."
        )

    def _prepare_input(self, data):
        """Moves a packed batch to the device without the Trainer's DeepSpeed cast of floating tensors to the engine's
        dtype: the packed batch's floats are reference log-probs (sums over up to 16k tokens: bf16 would round -941.4
        to -940, and step 1 would no longer be ln 2) and pair weights, which stay float32. Token ids are integers."""
        if not self.packed or not isinstance(data, torch.Tensor):
            return super()._prepare_input(data)
        return data.to(self.args.device)

    # --- loss ----------------------------------------------------------------------------------------------------------

    def _reference_logps(self, inputs):
        if REF_COLUMNS[0] in inputs:
            return inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]
        if self.ref_model is None:
            raise ValueError(
                "No reference: the batch has no precomputed reference log-probs and there is no reference model."
            )
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            ref_logps, _ = packed_forward(self.ref_model, inputs)
        return ref_logps[0::2], ref_logps[1::2]

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.packed:
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:
            raise NotImplementedError("The packed path builds no logits; evaluate with prediction_loss_only=True.")
        mode = "train" if self.model.training else "eval"
        logps, outputs = packed_forward(model, inputs)
        if mode == "train" and self._reference_check_pending:
            self._reference_check_pending = False
            self._check_cached_reference(model, logps.detach(), inputs)
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        ref_chosen_logps, ref_rejected_logps = (x.to(logps) for x in self._reference_logps(inputs))
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        lengths = inputs["completion_lengths"].to(logps)
        chosen_tokens, rejected_tokens = lengths[0::2], lengths[1::2]

        # TRL 1.16 `_compute_loss`, loss types "sigmoid" and "sigmoid_norm" (reverse KL, no weighting).
        per_pair = torch.zeros_like(chosen_logps)
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                delta = chosen_logratios - rejected_logratios
            else:  # sigmoid_norm: per-token mean log-ratios (open-instruct `dpo_norm`)
                delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(
                    min=1
                )
            per_pair = per_pair + loss_weight * -F.logsigmoid(self.beta * delta)

        weights = inputs["pair_weights"].to(logps)
        if mode == "train":
            # Mean over the step's pairs: the Trainer sums micro-batches (loss_is_scaled_for_ga) and DeepSpeed/DDP
            # average the ranks, so scale this micro-batch's sum by world_size / pairs in the step.
            loss = (per_pair * weights).sum() * (self.args.world_size / inputs["pairs_in_step"].to(logps))
        else:
            loss = (per_pair * weights).sum() / weights.sum()

        self._record_metrics(mode, inputs, outputs, weights, chosen_logps, rejected_logps, chosen_logratios,
                             rejected_logratios, chosen_tokens, rejected_tokens)  # fmt: skip
        return loss

    def _check_cached_reference(self, model, logps, inputs) -> None:
        """At a fresh start the policy is the model that made the cached reference, so its log-probs on the first
        micro-batch (`logps`, `[S]`, from the training forward: no extra one) must equal the cached ones up to the
        kernels' rounding (`reference_tolerance`). A cache made by other weights (another model or revision under a
        folder the run reuses) would train every step against the wrong reference. Every rank checks its own first
        micro-batch; the gathered maximum makes all of them agree (and stop together)."""
        if self.reference_cache is None or REF_COLUMNS[0] not in inputs:
            return
        if self.state.global_step > 0:
            logger.info(
                "Reference cache check skipped: resuming at step %d, the policy is no longer the model that made the "
                "reference (%s).", self.state.global_step, self.reference_cache,
            )  # fmt: skip
            return
        cached = torch.stack([inputs[c].to(logps) for c in REF_COLUMNS], dim=1).flatten()  # chosen_0, rejected_0, ...
        lengths = inputs["completion_lengths"].to(logps.device)
        weights = next(self.accelerator.unwrap_model(model).parameters()).dtype
        low_precision = (
            self.args.bf16 or self.args.fp16 or weights in (torch.bfloat16, torch.float16)
            or torch.get_float32_matmul_precision() != "highest"  # TF32 matmuls
        )  # fmt: skip
        difference = (logps - cached).abs()
        local = torch.stack([
            difference.max(), (difference / lengths.clamp(min=1)).max(),
            (difference / reference_tolerance(lengths, low_precision)).max(),
        ])  # fmt: skip
        worst, per_token, excess = self.accelerator.gather(local[None]).amax(0).tolist()
        tolerance = REFERENCE_TOLERANCE_PER_TOKEN["low_precision" if low_precision else "fp32"]
        precision = "bf16/fp16/TF32" if low_precision else "fp32"
        if excess > 1:
            raise RuntimeError(
                f"The cached reference log-probs in {self.reference_cache} were not made by these weights: on the first "
                f"micro-batch of this fresh start the policy's summed completion log-probs differ from the cached ones "
                f"by up to {worst:.3g} nats ({per_token:.3g} per completion token; {precision} rounding allows "
                f"{tolerance:g}). At step 0 the policy is the model that made the reference, so the cache came from "
                f"other weights (another model, revision or checkpoint under the same key). Delete {self.reference_cache} "
                "so that it is recomputed, and check --model_name_or_path / --model_revision (a branch such as main "
                "can move between runs)."
            )
        logger.info(
            "Reference cache check (%s): the policy reproduces the cached reference log-probs of the first micro-batch, "
            "max difference %.2e nats per sequence, %.2e per completion token (tolerance %g per token, %s).",
            self.reference_cache, worst, per_token, tolerance, precision,
        )  # fmt: skip

    # --- metrics -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_metrics(self, mode, inputs, outputs, weights, chosen_logps, rejected_logps, chosen_logratios,
                        rejected_logratios, chosen_tokens, rejected_tokens):  # fmt: skip
        """Adds this micro-batch's sums and counts to the logging window's, on the GPU: no host sync and no
        collective per micro-batch (`log` gathers the window once; ranks hold different numbers of pairs)."""
        chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
        per_pair = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps,
            # Policy minus reference summed log-prob (nats per completion): both falling is DPO's known failure.
            "logratios/chosen": chosen_logratios,
            "logratios/rejected": rejected_logratios,
            "logps/rejected": rejected_logps,
            **normalized_reward_metrics(
                self.beta, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens
            ),
        }
        # Per-token metrics over the completion tokens of real pairs, chosen = even sequences.
        sequence_index = inputs["sequence_index"]
        real = (weights[sequence_index // 2] > 0) & (inputs["shift_labels"][0] != -100)
        chosen = real & (sequence_index % 2 == 0)
        rejected = real & (sequence_index % 2 == 1)
        sums = [(per_pair[k].float() * weights).sum() for k in PAIR_METRICS]
        counts = [weights.sum()] * len(PAIR_METRICS)
        for values, mask in (  # in TOKEN_METRICS order
            (outputs.entropy, real),
            (outputs.mean_logits, chosen),
            (outputs.mean_logits, rejected),
            (outputs.is_top1, chosen),
        ):
            sums.append(values[0].float()[mask].sum() if values is not None else mask.new_zeros((), dtype=torch.float))
            counts.append(mask.sum().float() if values is not None else mask.new_zeros((), dtype=torch.float))
        # Tokens of the real pairs as the data holds them (prompt once per sequence, as stock TRL counts them), however
        # many the row computed: num_tokens and tokens_per_second stay comparable with and without shared prompts.
        real_tokens = (inputs["sequence_tokens"].to(weights) * weights.repeat_interleave(2)).sum()
        local = torch.stack([torch.stack(sums), torch.stack(counts).to(sums[0])])
        local = torch.cat([local, torch.stack([real_tokens, real_tokens]).to(local)[:, None]], dim=1)
        window = self._window[mode]
        self._window[mode] = local if window is None else window + local

    def log(self, logs, start_time=None):
        if self.packed:
            mode = "train" if self.model.training else "eval"
            window, self._window[mode] = self._window[mode], None
            if window is not None:
                sums, counts = self.accelerator.gather(window[None]).sum(0).tolist()
                for key, total, count in zip(PAIR_METRICS + TOKEN_METRICS, sums, counts):
                    self._metrics[mode][key] = [total / count if count > 0 else 0.0]
                if mode == "train":
                    self._total_train_tokens += int(sums[-1])
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def _set_gradient_accumulation(args, steps: int) -> None:
    """Sets `gradient_accumulation_steps` after `TrainingArguments.__post_init__` has copied it into the DeepSpeed
    config: rebuilds that config from the user's file as transformers' own hyper-parameter search does
    (`Trainer._hp_search_setup`). Under `accelerate launch` (no `--deepspeed`) the Trainer fills the config from
    `args` when it builds the accelerator, so setting the field is enough."""
    args.gradient_accumulation_steps = steps
    if getattr(args, "hf_deepspeed_config", None) is not None and args.deepspeed:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


@contextlib.contextmanager
def _without_trl_model_hash():
    """Builds DPOTrainer without its model hash. With precompute_ref_log_probs, TRL 1.16's `DPOTrainer.__init__` hashes
    every weight (`trl.trainer.utils.hash_module`: a CPU copy of the state dict; at 7B, 14 GB copied and ~28 GB hashed
    per rank at every start) to name the file of its own reference log-prob cache (`_precompute_ref_logps`), which the
    packed path replaces by `sfm_dpo.ref_cache`. The call sits inline in `__init__`, so there is no method to
    override: the name it calls is pointed at a placeholder while the parent class builds, and put back after."""
    import trl.trainer.dpo_trainer as dpo_trainer

    real = dpo_trainer.hash_module
    dpo_trainer.hash_module = lambda module: "unused: the packed path keeps its own reference cache"
    try:
        yield
    finally:
        dpo_trainer.hash_module = real
