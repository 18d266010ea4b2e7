"""Compiled decoder layers (sfm_dpo/kernels.py) compute what the eager layers compute: packed log-probs and every
parameter's gradient, with gradient checkpointing on the compiled side, and the checkpoint layout is unchanged."""

import copy
import random

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from sfm_dpo.attention import apply_backend
from sfm_dpo.kernels import compile_decoder_layers, decoder_layers
from sfm_dpo.packing import pack_pairs, packed_forward
from sfm_dpo.tiny import build_tiny_model


def _rows(rng: random.Random, n: int, vocab: int) -> list[dict]:
    def ids(lo, hi):
        return [rng.randrange(1, vocab) for _ in range(rng.randrange(lo, hi))]

    return [{"prompt_ids": ids(1, 6), "chosen_ids": ids(1, 40), "rejected_ids": ids(1, 40)} for _ in range(n)]


def _saved_bytes(model, batch) -> tuple[torch.Tensor, int]:
    """Packed log-probs, and the bytes autograd keeps for the backward."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps, _ = packed_forward(model, batch)
    return logps, saved[0]


@pytest.mark.parametrize("traced_checkpoint", [False, True], ids=["eager_checkpoint", "traced_checkpoint"])
def test_compiled_layers_match_eager_log_probs_and_gradients(traced_checkpoint):
    # OLMo 3 layout with a window shorter than the sequences: two layer graphs (sliding and full attention).
    eager = build_tiny_model("olmo3", 512, sliding_window=8)
    apply_backend(eager, "sdpa")
    add_fused_lm_head(eager)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled, traced_checkpoint) == len(decoder_layers(compiled))
    assert compile_decoder_layers(compiled, traced_checkpoint) == 0  # already compiled
    compiled.gradient_checkpointing_enable({"use_reentrant": False})
    compiled.train()
    eager.train()
    assert list(compiled.state_dict()) == list(eager.state_dict())

    rng = random.Random(0)
    for n_pairs in (3, 1, 2):  # a new row length, sequence count and longest sequence each time (dynamic shapes)
        batch = pack_pairs(_rows(rng, n_pairs, 512))
        eager_logps, eager_saved = _saved_bytes(eager, batch)
        compiled_logps, compiled_saved = _saved_bytes(compiled, batch)
        torch.testing.assert_close(compiled_logps, eager_logps, rtol=1e-5, atol=1e-4)
        assert compiled_saved < eager_saved / 2  # the checkpoint keeps only the layer inputs (no checkpoint: / 1.5)
        weights = torch.linspace(-1, 1, eager_logps.shape[0])  # a different upstream gradient per sequence
        (eager_logps * weights).sum().backward()
        (compiled_logps * weights).sum().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        eager.zero_grad()
        compiled.zero_grad()


def test_decoder_layers_names_the_model_without_layers():
    class NoLayers(torch.nn.Module):
        base_model_prefix = "model"

    with pytest.raises(ValueError, match="compile_layers false"):
        decoder_layers(NoLayers())
