"""`SFMDPOTrainer`: TRL's `DPOTrainer`, kept as the engine, with the few things our runs need on top.

- It takes the dataset that `sfm_dpo.data` already tokenized (prompt truncation and pair limits are ours, see there).
- Checkpoints are atomic and non-finite steps are skipped (the mixins' modules say how).
- It logs the length-normalized rewards next to TRL's. TRL's `rewards/*` are beta x the SUMMED log-ratio whatever
  the loss; OLMo 3's `sigmoid_norm` (open-instruct `dpo_norm`) optimizes beta x the per-token MEAN log-ratio, so
  `rewards_norm/*` are the numbers the loss actually sees.
"""

import contextlib
import logging

import torch
from trl import DPOTrainer

from .checkpoints import AtomicCheckpointMixin
from .nonfinite import NonFiniteGuardMixin

logger = logging.getLogger(__name__)

PRETOKENIZED_COLUMNS = {"prompt_ids", "chosen_ids", "rejected_ids"}


def normalized_reward_metrics(
    beta: float,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-pair length-normalized rewards (shape [pairs] each): beta * (summed policy - reference log-prob) /
    completion tokens, the quantity inside TRL 1.16's `sigmoid_norm` loss."""
    chosen = beta * chosen_logratios / chosen_tokens.clamp(min=1)
    rejected = beta * rejected_logratios / rejected_tokens.clamp(min=1)
    return {
        "rewards_norm/chosen": chosen,
        "rewards_norm/rejected": rejected,
        "rewards_norm/margins": chosen - rejected,
        "rewards_norm/accuracies": (chosen > rejected).float(),
    }


@contextlib.contextmanager
def _capture_log_probs(module, store: list):
    """Collects the per-token `log_probs` of each fused-head forward of `module` (TRL calls the model with
    `fused_lm_head=True`; the output's `log_probs` are [batch, seq - 1], zero outside completions)."""
    if module is None:
        yield
        return

    def hook(_module, _args, output):
        if getattr(output, "log_probs", None) is not None:
            store.append(output.log_probs.detach())

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SFMDPOTrainer(AtomicCheckpointMixin, NonFiniteGuardMixin, DPOTrainer):
    """Atomic checkpoints (`sfm_dpo.checkpoints`) and the non-finite step guard (`sfm_dpo.nonfinite`, keyword
    `max_consecutive_nonfinite`) come from the mixins."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if PRETOKENIZED_COLUMNS <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        policy_logps, ref_logps = [], []
        ref_module = None if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
        with (
            _capture_log_probs(self.accelerator.unwrap_model(model), policy_logps),
            _capture_log_probs(ref_module, ref_logps),
        ):
            result = super()._compute_loss(model, inputs, return_outputs)
        self._log_normalized_rewards(inputs, policy_logps, ref_logps)
        return result

    def _log_normalized_rewards(self, inputs, policy_logps, ref_logps) -> None:
        if not policy_logps or self.ld_alpha is not None:
            return
        mode = "train" if self.model.training else "eval"
        seq_len = inputs["completion_mask"].size(1) - 1
        policy = policy_logps[0][:, -seq_len:].sum(dim=1)
        if "ref_chosen_logps" in inputs:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(policy)
        elif ref_logps:
            ref = ref_logps[0][:, -seq_len:].sum(dim=1)
        else:
            return
        tokens = inputs["completion_mask"][:, 1:].sum(dim=1)
        chosen_ratio, rejected_ratio = (policy - ref).chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        metrics = normalized_reward_metrics(self.beta, chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens)
        for name, values in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(values).mean().item())
