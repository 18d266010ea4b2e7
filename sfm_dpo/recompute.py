"""Recompute only what memory needs: how many decoder layers run under activation checkpointing, chosen at start-up.

Checkpointing every layer costs a third of the training compute (each layer's forward runs twice). At 6.86B on an
H200 with compiled layers and 16k-token micro-batches, training ran at 9,365 tokens/s with all 32 layers recomputed,
9,993 / 10,597 / 11,409 with 24 / 16 / 8, and 12,364 (+32%) with none (`bench/results/20261201-profile_ckpt_*`), while
the activations kept by each un-recomputed layer grew the peak by ~2.7 GiB per 16k tokens. A B200 (183 GB) under
ZeRO-2 on 4 GPUs holds ~38 GB of state per GPU at 7B and has room for all of them; an H100 (80 GB) for about a third.

So: estimate the peak from the ZeRO-2 state per GPU, the optimizer step's transient and the activations of one
micro-batch, and recompute the fewest layers that fit the GPU with a margin. The estimate and the choice are logged.

Why not transformers' own `activation_checkpointing_kwargs={"every_n_layers": n}`: it can only checkpoint 1/n of
the layers (32, 16, 11, 8, ...), and the H100 case wants ~21 of 32; so the Trainer enables checkpointing on every
layer as usual and `RecomputePlanCallback` clears the per-layer flag (`GradientCheckpointingLayer.gradient_checkpointing`)
of the layers that keep their activations.
"""

import logging
from dataclasses import dataclass

from transformers import TrainerCallback

from .kernels import decoder_layers

logger = logging.getLogger(__name__)

GIB = 1024**3

# Saved activations of one decoder layer that is not recomputed, bytes per token: 2 bytes x (11 x hidden + 2.6 x MLP
# width), fitted to the 6.86B GPT-NeoX measurement above (~43 x hidden with a 4 x hidden MLP: 2.68 GiB per 16,384
# tokens); a gated MLP (SwiGLU: gate, up and their product) counts 1.5 x its width (an estimate, not measured).
HIDDEN_FACTOR = 11
MLP_FACTOR = 2.6
# Eager layers keep more intermediate tensors than inductor's fused ones (not measured: a margin).
EAGER_FACTOR = 1.3
# Memory never planned for: CUDA context, allocator fragmentation, the fused head's chunks, collectives' buffers.
RESERVE_FRACTION = 0.10
RESERVE_BYTES = 4 * GIB


@dataclass(frozen=True)
class RecomputePlan:
    layers: int  # decoder layers of the model
    recomputed: int  # the first `recomputed` layers keep only their input and run again in the backward
    estimate: dict  # GiB: static state, optimizer transient, activations, peak, usable
    reason: str

    def describe(self) -> str:
        e = self.estimate
        figures = ", ".join(f"{k} {v:.1f}" for k, v in e.items())
        return f"recompute {self.recomputed} of {self.layers} decoder layers ({self.reason}; estimate GiB: {figures})"


def layer_activation_bytes(config, compiled: bool) -> float:
    """Bytes per token that one decoder layer keeps for its backward when it is not recomputed."""
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    gated = getattr(config, "hidden_act", "") in ("silu", "swish", "swiglu")  # Llama / OLMo-3 MLPs: gate * up
    per_token = 2 * (HIDDEN_FACTOR * hidden + MLP_FACTOR * mlp * (1.5 if gated else 1.0))
    return per_token * (1.0 if compiled else EAGER_FACTOR)


def static_state_bytes(n_params: int, world_size: int, zero_stage: int | None) -> tuple[float, float]:
    """(state kept for the whole run, optimizer step's extra transient) per GPU, bytes, bf16 training with Adam.

    ZeRO-2 (and 1): bf16 weights whole on every GPU (2 B/param), bf16 gradients, fp32 master weights and Adam's two
    moments partitioned (14 B/param over the world). Checked on 2 H100s at 6.86B: 57.5 GiB of state, a 76.7 GiB peak
    set by the optimizer step, i.e. a ~6 B/param / world transient (the fp32 gradient partition and the gather).
    Without DeepSpeed: bf16 weights, gradients and Adam moments (8 B/param), no transient worth counting."""
    if zero_stage in (1, 2):
        return n_params * (2 + 14 / world_size), 6 * n_params / world_size
    return 8 * n_params, 0.0


def plan_recompute(
    config,
    n_params: int,
    tokens_per_microbatch: int,
    gpu_bytes: int,
    world_size: int,
    zero_stage: int | None,
    compiled: bool,
) -> RecomputePlan:
    """The fewest recomputed layers whose estimated peak fits `gpu_bytes` less the reserve. A recomputed layer still
    keeps its input (2 B x hidden per token), and the backward replays one layer at a time (one layer's activations
    on top)."""
    layers = config.num_hidden_layers
    per_layer = layer_activation_bytes(config, compiled) * tokens_per_microbatch
    kept_input = 2 * config.hidden_size * tokens_per_microbatch
    static, transient = static_state_bytes(n_params, world_size, zero_stage)
    usable = gpu_bytes * (1 - RESERVE_FRACTION) - RESERVE_BYTES

    def activations(recomputed: int) -> float:
        return (layers - recomputed) * per_layer + recomputed * kept_input + (per_layer if recomputed else 0)

    fitting = [k for k in range(layers + 1) if static + max(activations(k), transient) <= usable]
    recomputed = fitting[0] if fitting else layers
    reason = "fits" if fitting else "does not fit even with every layer recomputed: all layers, as the safest choice"
    peak = static + max(activations(recomputed), transient)
    estimate = {"static": static / GIB, "transient": transient / GIB, "activations": activations(recomputed) / GIB,
                "peak": peak / GIB, "usable": usable / GIB}  # fmt: skip
    return RecomputePlan(layers=layers, recomputed=recomputed, estimate=estimate, reason=reason)


def apply_recompute(model, recomputed: int) -> None:
    """Keeps activation checkpointing on the first `recomputed` decoder layers only (call after the Trainer enabled
    it on all of them)."""
    for index, layer in enumerate(decoder_layers(model)):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(
                f"{type(layer).__name__} has no per-layer gradient_checkpointing flag; pass --recompute_layers all."
            )
        layer.gradient_checkpointing = index < recomputed


def choose_recompute(request: str, model, tokens_per_microbatch: int, world_size: int, zero_stage, compiled: bool):
    """`--recompute_layers`: "all", a number of layers, or "auto" (planned from this GPU's memory; on a machine
    without a GPU, all layers). Returns the number of recomputed layers and logs the choice."""
    import torch

    layers = len(decoder_layers(model))
    if request == "all":
        return layers
    if request != "auto":
        recomputed = int(request)
        if not 0 <= recomputed <= layers:
            raise ValueError(f"--recompute_layers {recomputed} is outside 0..{layers} (the model's decoder layers).")
        logger.info("Activation checkpointing: recompute %d of %d decoder layers (--recompute_layers).", recomputed,
                    layers)  # fmt: skip
        return recomputed
    if not torch.cuda.is_available():
        logger.info("Activation checkpointing: no GPU to plan for, recomputing all %d decoder layers.", layers)
        return layers
    gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    n_params = sum(p.numel() for p in model.parameters())
    plan = plan_recompute(model.config, n_params, tokens_per_microbatch, gpu_bytes, world_size, zero_stage, compiled)
    logger.info("Activation checkpointing planned for %.0f GiB GPUs: %s. Override with --recompute_layers N|all.",
                gpu_bytes / GIB, plan.describe())  # fmt: skip
    return plan.recomputed


class RecomputePlanCallback(TrainerCallback):
    """Plans and applies the recompute once the Trainer has enabled activation checkpointing on every layer and
    prepared DeepSpeed (`on_train_begin` comes after both). Nothing to do without checkpointing."""

    def __init__(self, request: str, tokens_per_microbatch: int):
        self.request = request
        self.tokens_per_microbatch = tokens_per_microbatch
        self.recomputed: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not getattr(args, "activation_checkpointing", args.gradient_checkpointing):
            return
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, extract_model_from_parallel

        from .kernels import layers_compiled

        accelerator_state = AcceleratorState()
        zero_stage = (
            accelerator_state.deepspeed_plugin.zero_stage
            if accelerator_state.distributed_type == DistributedType.DEEPSPEED
            else None
        )
        module = extract_model_from_parallel(model)
        self.recomputed = choose_recompute(
            self.request, module, self.tokens_per_microbatch, args.world_size, zero_stage, layers_compiled(module)
        )
        apply_recompute(module, self.recomputed)
