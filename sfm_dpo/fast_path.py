"""Builds the trainer train_dpo.py runs: the fast path (packed, padding-free, reference log-probs computed once) or,
with `--padding_free false`, stock TRL behaviour for comparison."""

import contextlib
import hashlib
import logging
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType
from trl.trainer.utils import add_fused_lm_head

from . import ref_cache
from .attention import apply_backend, select_backend_for_model
from .fast_trainer import FastDPOTrainer
from .kernels import compile_decoder_layers, layers_compiled
from .packing import reference_logps_fn
from .trainer import SFMDPOTrainer

logger = logging.getLogger(__name__)

REF_BUDGET_FACTOR = 4  # reference-pass tokens per forward, over the training micro-batch budget

# Bump when the packed forward's numerics change, so older caches are not reused.
FORWARD_VERSION = 1


def reference_key(script_args, training_args, model_args, tokenizer, backend: str, dtype, compiled: bool) -> dict:
    """Everything the reference log-probs depend on besides the token ids (which ref_cache fingerprints itself)."""
    return {
        **ref_cache.model_identity(model_args.model_name_or_path, model_args.model_revision),
        "dtype": str(dtype),
        "attn_backend": backend,
        "compiled_layers": compiled,
        "max_length": training_args.max_length,
        "max_prompt_length": script_args.max_prompt_length,
        "overlong_policy": script_args.overlong_policy,
        "chat_template_sha": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16],
        "forward_version": FORWARD_VERSION,
    }


def attach_reference_logps(model, dataset, script_args, training_args, model_args, tokenizer, backend: str):
    """One data-parallel pass of the (still untrained) model over the data, cached on disk; the trainer then keeps no
    reference model. A resumed job finds the cache; were it gone, the model loaded here is still the reference (the
    checkpoint's weights are loaded later, by `train()`), so recomputing stays correct."""
    state = PartialState()
    device = state.device
    # The reference values must come from the very numerics of the training forward, or step 0 is not ln 2: under
    # DeepSpeed bf16 the engine casts the module to bf16 and accelerate does not autocast; otherwise the Trainer runs
    # the forward under bf16 autocast (fp32 layer norms and softmax).
    deepspeed = state.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and training_args.bf16:
        model.to(torch.bfloat16)
    model.to(device)
    apply_backend(model, backend)
    add_fused_lm_head(model)
    use_autocast = training_args.bf16 and not deepspeed and device.type != "cpu"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext
    # No activations are kept for a backward, so the pass takes 4x the training budget: fewer, larger kernels (+10%
    # tokens/s at 1.4B on an H100, bench/results/20261125-profile_*), a few GiB more than training at 1.5B.
    budget = script_args.ref_tokens_per_batch or REF_BUDGET_FACTOR * (
        script_args.max_tokens_per_microbatch or 2 * training_args.max_length
    )
    compute_fn = reference_logps_fn(model, device, max_tokens=budget, context=autocast)
    cache_dir = script_args.ref_cache_dir or str(Path(training_args.output_dir) / "ref_logps")
    precision = f"{model.dtype}{'+autocast-bf16' if use_autocast else ''}"
    key = reference_key(
        script_args, training_args, model_args, tokenizer, backend, precision, compiled=layers_compiled(model)
    )
    dataset = ref_cache.load_or_compute(dataset, compute_fn, cache_dir, key, state, token_budget=budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pass's activation blocks, before DeepSpeed allocates its flat buffers
    return dataset


def build_trainer(model, train_dataset, script_args, training_args, model_args, tokenizer, callbacks):
    common = dict(
        args=training_args,
        processing_class=tokenizer,
        callbacks=callbacks,
        max_consecutive_nonfinite=script_args.max_consecutive_nonfinite,
    )
    if not training_args.padding_free:
        logger.info("--padding_free false: stock TRL padded batches with a reference model (for comparison).")
        return SFMDPOTrainer(model=model, train_dataset=train_dataset, **common)
    if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
        # Older Trainers divide the (already step-scaled) packed loss by the accumulation steps once more.
        raise RuntimeError(
            f"The fast path needs transformers >= 5.20 (found {transformers.__version__}); upgrade, or pass "
            "--padding_free false for the stock path."
        )
    backend = select_backend_for_model(script_args.attn_backend, model, training_args)
    if script_args.compile_layers:
        # Before the reference pass, so that it runs compiled too (faster, and the same kernels as training). Under
        # gradient checkpointing the checkpoint stays eager around each compiled layer (sfm_dpo/kernels.py).
        compile_decoder_layers(model)
    if training_args.precompute_ref_log_probs:
        train_dataset = attach_reference_logps(
            model, train_dataset, script_args, training_args, model_args, tokenizer, backend
        )
    return FastDPOTrainer(
        model=model,
        train_dataset=train_dataset,
        attn_backend=backend,
        max_tokens_per_microbatch=script_args.max_tokens_per_microbatch,
        pairs_per_step=script_args.effective_batch_size,
        **common,
    )
