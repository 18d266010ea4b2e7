"""Builds the trainer train_dpo.py runs: the fast path (packed, padding-free, reference log-probs computed once) or,
with `--padding_free false`, stock TRL behaviour for comparison."""

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType
from trl.trainer.utils import add_fused_lm_head

from . import ref_cache
from .attention import apply_backend, select_backend_for_model, shared_prompt_supported
from .fast_trainer import FastDPOTrainer
from .kernels import compile_decoder_layers, layers_compiled
from .packing import reference_logps_fn
from .recompute import RecomputePlanCallback
from .trainer import SFMDPOTrainer

logger = logging.getLogger(__name__)

REF_BUDGET_FACTOR = 4  # reference-pass tokens per forward, over the training micro-batch budget
REF_CACHE_ENV = "SFM_REF_CACHE"  # the project's shared reference cache, when --ref_cache_dir is not given

# Bump when the packed forward's numerics change, so older caches are not reused.
FORWARD_VERSION = 1


def default_ref_cache_dir(script_args, training_args) -> Path:
    """--ref_cache_dir, else $SFM_REF_CACHE, else `ref_cache` beside the output folder (outputs/dpo ->
    outputs/ref_cache): one cache for the runs of a project, so the points of a sweep (other learning rates, seeds,
    output folders) share one reference pass, hours at 7B. The key holds only what changes the values, so sharing is
    safe."""
    if script_args.ref_cache_dir:
        return Path(script_args.ref_cache_dir)
    if os.environ.get(REF_CACHE_ENV):
        return Path(os.environ[REF_CACHE_ENV])
    return Path(training_args.output_dir).parent / "ref_cache"


def reference_key(model_args, backend: str, precision: str, compiled: bool, digest_dir) -> dict:
    """Exactly what the reference log-probs depend on besides the token ids (which ref_cache fingerprints itself, so
    max_length, truncation and the chat template count through them): the weights' content, the numerics of the
    forward. Not the model's path or name, the learning rate or the output folder, which would stop sweeps sharing."""
    return {
        "weights": ref_cache.model_identity(model_args.model_name_or_path, model_args.model_revision, digest_dir)[
            "weights"
        ],
        "precision": precision,
        "attn_backend": backend,
        "compiled_layers": compiled,
        "forward_version": FORWARD_VERSION,
    }


def reference_precision(bf16: bool, fp16: bool, deepspeed: bool, device: torch.device):
    """`(cast_to, autocast_dtype)` that reproduce the training forward's numerics, or step 0 is not ln 2. Under
    DeepSpeed the engine casts the module to bf16/fp16 and accelerate does not autocast; otherwise accelerate runs the
    forward under autocast (`Accelerator.native_amp`: fp16 off the CPU, bf16 anywhere), fp32 weights."""
    if deepspeed:
        return (torch.bfloat16 if bf16 else torch.float16 if fp16 else None), None
    if bf16:
        return None, torch.bfloat16
    if fp16 and device.type != "cpu":
        return None, torch.float16
    return None, None


def attach_reference_logps(
    model, dataset, script_args, training_args, model_args, tokenizer, backend: str, should_stop=None,
    share_prompt: bool = False,
):  # fmt: skip
    """One data-parallel pass of the (still untrained) model over the data, cached on disk; the trainer then keeps no
    reference model. Returns `(dataset with the reference columns, the cache folder)`. A resumed job finds the cache;
    were it gone, the model loaded here is still the reference (the checkpoint's weights are loaded later, by
    `train()`), so recomputing stays correct. `should_stop()` true (a preemption signal) ends the pass early, its
    finished rows kept, with `sfm_dpo.preemption.Preempted`."""
    ref_cache.check_whole_parameters(getattr(training_args, "deepspeed_plugin", None))
    state = PartialState()
    device = state.device
    deepspeed = state.distributed_type == DistributedType.DEEPSPEED
    cast_to, autocast_dtype = reference_precision(training_args.bf16, training_args.fp16, deepspeed, device)
    if cast_to is not None:
        model.to(cast_to)
    model.to(device)
    apply_backend(model, backend)
    add_fused_lm_head(model)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    )
    # No activations are kept for a backward, so the pass takes 4x the training budget: fewer, larger kernels (+10%
    # tokens/s at 1.4B on an H100, bench/results/20261125-profile_*), a few GiB more than training at 1.5B.
    budget = script_args.ref_tokens_per_batch or REF_BUDGET_FACTOR * (
        script_args.max_tokens_per_microbatch or 2 * training_args.max_length
    )
    compute_fn = reference_logps_fn(model, device, max_tokens=budget, context=autocast, share_prompt=share_prompt)
    cache_dir = default_ref_cache_dir(script_args, training_args)
    precision = f"{model.dtype}{f'+autocast-{autocast_dtype}' if autocast_dtype else ''}"
    # Rank 0 digests the weights (once per file: the digests are stored in the cache) and tells the others.
    digest_dir = cache_dir / ref_cache.DIGEST_FOLDER  # shared with the run identity (train_dpo.py)
    key = ref_cache.from_rank_zero(
        state, lambda: reference_key(model_args, backend, precision, layers_compiled(model), digest_dir)
    )
    info = {"model": model_args.model_name_or_path, "revision": model_args.model_revision}
    dataset, folder = ref_cache.load_or_compute_folder(
        dataset, compute_fn, cache_dir, key, state, token_budget=budget, should_stop=should_stop, info=info
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pass's activation blocks, before DeepSpeed allocates its flat buffers
    return dataset, folder


def build_trainer(
    model,
    train_dataset,
    script_args,
    training_args,
    model_args,
    tokenizer,
    callbacks,
    eval_dataset=None,
    should_stop: Callable[[], bool] | None = None,
):
    """The trainer for this run. `should_stop` (this rank's preemption flag) can end the reference pass early; see
    `attach_reference_logps`."""
    common = dict(
        args=training_args,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        max_consecutive_nonfinite=script_args.max_consecutive_nonfinite,
    )
    if not training_args.padding_free:
        logger.info("--padding_free false: stock TRL padded batches with a reference model (for comparison).")
        if script_args.share_prompt:
            logger.warning("--share_prompt is a fast-path setting: stock TRL batches compute each prompt twice.")
        # TRL loads the reference from the policy's `config._name_or_path` with `args.model_init_kwargs` alone: give
        # it the revision the policy was loaded at, or it would be the branch's newest commit.
        training_args.model_init_kwargs = {
            **(training_args.model_init_kwargs or {}),
            "revision": model_args.model_revision,
        }
        return SFMDPOTrainer(model=model, train_dataset=train_dataset, **common)
    if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
        # Older Trainers divide the (already step-scaled) packed loss by the accumulation steps once more.
        raise RuntimeError(
            f"The fast path needs transformers >= 5.20 (found {transformers.__version__}); upgrade, or pass "
            "--padding_free false for the stock path."
        )
    backend = select_backend_for_model(script_args.attn_backend, model, training_args)
    share_prompt = resolve_share_prompt(script_args.share_prompt, backend, model, training_args)
    if script_args.compile_layers:
        # Before the reference pass, so that it runs compiled too (faster, and the same kernels as training). Under
        # gradient checkpointing the checkpoint stays eager around each compiled layer (sfm_dpo/kernels.py).
        compile_decoder_layers(model)
    reference_cache = None
    if training_args.precompute_ref_log_probs:
        train_dataset, reference_cache = attach_reference_logps(
            model, train_dataset, script_args, training_args, model_args, tokenizer, backend, should_stop, share_prompt
        )
        if eval_dataset is not None:  # the held-out pairs: their own entry of the same cache
            common["eval_dataset"], _ = attach_reference_logps(
                model, eval_dataset, script_args, training_args, model_args, tokenizer, backend, should_stop,
                share_prompt,
            )  # fmt: skip
    # Recompute only the layers the GPU's memory needs (planned once DeepSpeed is up; sfm_dpo/recompute.py).
    budget = script_args.max_tokens_per_microbatch or 2 * training_args.max_length
    common["callbacks"] = [*(callbacks or []), RecomputePlanCallback(script_args.recompute_layers, budget)]
    return FastDPOTrainer(
        model=model,
        train_dataset=train_dataset,
        attn_backend=backend,
        reference_cache=None if reference_cache is None else str(reference_cache),
        max_tokens_per_microbatch=script_args.max_tokens_per_microbatch,
        pairs_per_step=script_args.effective_batch_size,
        share_prompt=share_prompt,
        **common,
    )


def resolve_share_prompt(requested: bool, backend: str, model, training_args) -> bool:
    """`--share_prompt`, unless `backend` does not compute the shared layout exactly on this device (probed): then off,
    with a warning saying why, since the unshared layout computes the same values."""
    if not requested:
        return False
    reason = shared_prompt_supported(backend, model, training_args)
    if reason is not None:
        logger.warning(
            "--share_prompt: off, the %s attention backend cannot share prompts here (%s).", backend, reason
        )
        return False
    logger.info("Shared prompts: each pair's prompt is computed once (%s attention).", backend)
    return True
