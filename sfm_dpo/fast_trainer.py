"""`FastDPOTrainer`: `SFMDPOTrainer` on the padding-free packed forward with token-budget micro-batches (issue 6).

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

import logging
import math

import torch
import torch.nn.functional as F
from transformers.trainer_callback import ExportableState, TrainerCallback
from trl.models.utils import disable_gradient_checkpointing

from .attention import apply_backend, select_backend_for_model
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
    """Keeps the digest of the micro-batch plan in each checkpoint's trainer_state.json (`stateful_callbacks`) and warns
    when a run resumes with another plan. A resumed Trainer skips the micro-batches already trained by count, so with
    another plan (other seed, data, token budget or planner code) the rest of the epoch is not the rest of the original
    order: some pairs train twice in that epoch and others not at all."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def state(self) -> dict:
        return {"args": {"fingerprint": self.fingerprint}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)
        if saved is None:  # a checkpoint from before this record: transformers' next save would fail on the key
            state.stateful_callbacks[name] = self.state()
            if state.global_step > 0:
                logger.warning("The checkpoint has no record of its micro-batch plan; resuming without checking it.")
        elif saved["args"]["fingerprint"] != self.fingerprint and state.global_step > 0:
            logger.warning(
                "The micro-batch plan differs from the checkpoint's (%s, now %s): the seed, the data, the token budget "
                "or the planner changed. Training goes on from step %d of the new plan, so the rest of this epoch does "
                "not follow the original order (some pairs train twice in it, others not at all).",
                saved["args"]["fingerprint"], self.fingerprint, state.global_step,
            )  # fmt: skip


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
        )
        n_micro = self.batch_sampler.microbatches_per_step
        stats = self.batch_sampler.stats()
        logger.info(
            "Packed batches: %d pairs per optimizer step on %d ranks, %d micro-batches per rank and step (%s), "
            "micro-batch tokens max %d, mean %.0f.",
            self.pairs_per_step, world_size, n_micro,
            f"token budget {max_tokens_per_microbatch}" if max_tokens_per_microbatch
            else f"{args.per_device_train_batch_size} pairs each",
            stats["max_tokens"], stats["mean_tokens"],
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
            super().__init__(
                model, ref_model, args, data_collator=PackedPreferenceCollator(), train_dataset=train_dataset, **kwargs
            )
        finally:
            args.padding_free = True
        if self.ref_model is not None:
            apply_backend(self.accelerator.unwrap_model(self.ref_model), self.attn_backend)
        # Each micro-batch's loss is already scaled by world_size / pairs_in_step (see `_compute_loss`).
        self.loss_is_scaled_for_ga = True
        # Per logging window: [2, metrics] sums and counts, and real tokens, on this rank's device; gathered in `log`.
        self._window = {"train": None, "eval": None}
        self.add_callback(PackingPlanRecord(self.batch_sampler.fingerprint()))

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
        real_tokens = (weights[sequence_index // 2] > 0).sum().float()
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
