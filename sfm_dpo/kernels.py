"""Kernel-level speed-ups of the packed forward: each decoder layer compiled by `torch.compile`.

Between its matmuls and the attention kernel, an eager decoder layer runs a dozen memory-bound kernels per token block
(layer norm in float32 under autocast, rotary embedding with its float32 cos/sin, bias + GELU or SwiGLU, residual
adds, dtype casts). Inductor fuses them. We compile each layer, not the whole model: the packed row's length, its
sequence count and its longest sequence change with every micro-batch, and a layer's graph is small, compiles in
seconds and is shared by all layers of the same kind (dynamo's `inline_inbuilt_nn_modules` makes parameters graph
inputs, so one graph serves every layer). Module hooks and gradient checkpointing stay outside the compiled forward,
and the parameters and state-dict keys do not change, so checkpoints, DeepSpeed and the final save see the plain
model.

The attention function stays inside the graph: torch's `varlen_attn` is a custom op with a fake implementation; flash
attention 2 and our sdpa/flex references are traced or break the graph on their own.
"""

import functools
import inspect
import logging

import torch
import torch.utils.checkpoint

logger = logging.getLogger(__name__)

# Distinct graphs per layer code: full and sliding-window layers, training and no-grad, with and without
# recompute; room to spare before dynamo gives up and runs a layer eagerly.
RECOMPILE_LIMIT = 64


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.<base_model_prefix>.layers`)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at .{model.base_model_prefix}.layers to compile; pass "
            "--compile_layers false."
        )
    return layers


def _compiled_class(cls: type, traced_checkpoint: bool = False) -> type:
    """A subclass of the layer class whose `forward` runs the original one compiled. Swapping the class, not wrapping
    instances, keeps deepcopy and the state dict as they were. Under gradient checkpointing transformers wraps the
    subclass's `forward` in the checkpoint too (`GradientCheckpointingLayer.__init_subclass__`, outermost wrapper only),
    so the checkpoint stays eager around the compiled forward (`nn.Module.compile` put it inside the graph, where
    dynamo broke the graph). `traced_checkpoint=True` instead traces a non-reentrant checkpoint into the graph,
    PyTorch's supported `compile(checkpoint(fn))` (pytorch/pytorch#143176); it is tested, not the default.

    Measured on an H100 with gradient checkpointing (bench/results/20261125-profile_*ckpt*.json), eager checkpoint
    around the compiled forward: +12% training at 1.41B, +8% training and +17% reference pass at 6.86B. Earlier 6.86B
    runs read 2.2-2.7x slower: each timed 5 micro-batches and one of them recompiled (inductor specializes the first
    graph on rows of >= 8192 tokens for 32-bit indexing, so the first shorter row compiles a second graph, ~9 s), which
    a run pays once."""
    if (cls, traced_checkpoint) not in _COMPILED_CLASSES:
        if traced_checkpoint:
            compiled_forward = torch.compile(_checkpointed(inspect.unwrap(cls.forward)), dynamic=True)
        else:
            compiled_forward = torch.compile(cls.forward, dynamic=True)

        def forward(self, *args, **kwargs):
            return compiled_forward(self, *args, **kwargs)

        if traced_checkpoint:  # set after the class exists, so that transformers does not wrap it in its checkpoint
            compiled_cls = type(cls.__name__, (cls,), {"_sfm_compiled": True})
            compiled_cls.forward = forward
        else:
            compiled_cls = type(cls.__name__, (cls,), {"forward": forward, "_sfm_compiled": True})
        _COMPILED_CLASSES[cls, traced_checkpoint] = compiled_cls
    return _COMPILED_CLASSES[cls, traced_checkpoint]


def _checkpointed(layer_forward):
    """The layer's own forward, under a non-reentrant activation checkpoint when transformers' checkpointing is on
    (`GradientCheckpointingLayer`'s test), for dynamo to trace: `compile(checkpoint(fn))`, pytorch/pytorch#143176."""

    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                functools.partial(layer_forward, self, **kwargs), *args, use_reentrant=False
            )
        return layer_forward(self, *args, **kwargs)

    return forward


_COMPILED_CLASSES: dict[tuple[type, bool], type] = {}


def layers_compiled(model) -> bool:
    """Whether `compile_decoder_layers` has compiled every decoder layer of `model`."""
    return all(getattr(layer, "_sfm_compiled", False) for layer in decoder_layers(model))


def compile_decoder_layers(model, traced_checkpoint: bool = False) -> int:
    """Compiles the forward of every decoder layer of `model` in place (dynamic shapes). Returns how many were
    compiled; calling it again is a no-op. `traced_checkpoint`: under gradient checkpointing, the checkpoint is inside
    the compiled graph (non-reentrant) instead of eager around it."""
    if layers_compiled(model):
        return 0
    layers = decoder_layers(model)
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for layer in layers:
        if not getattr(layer, "_sfm_compiled", False):
            layer.__class__ = _compiled_class(type(layer), traced_checkpoint)
    logger.info(
        "Compiled the forward of %d decoder layers (%s) with torch.compile(dynamic=True).",
        len(layers), type(layers[0]).__name__,
    )  # fmt: skip
    return len(layers)
