"""Packed forward == unpacked forward, per architecture and attention backend, and the backend probing/fallback.

The reference is independent of the packing code: each sequence alone through the stock model (sdpa, no packing),
full logits, log_softmax, summed over its completion tokens."""

import importlib.util
import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from sfm_dpo.attention import IMPLEMENTATIONS, apply_backend, probe_backend, select_backend
from sfm_dpo.packing import pack_pairs, packed_logps
from sfm_dpo.tiny import build_tiny_model, tiny_config

VOCAB = 512
ARCHS = ["gpt_neox", "olmo3", "llama"]


def make_rows(n: int, seed: int) -> list[dict]:
    """Sequences of 14-40 tokens: longer than olmo3's tiny sliding window (8), so the window matters."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [dict(prompt_ids=ids(4, 12), chosen_ids=ids(10, 28), rejected_ids=ids(10, 28)) for _ in range(n)]


def unpacked_logps(model, rows) -> torch.Tensor:
    """`[2B]` summed completion log-probs, chosen_0, rejected_0, ..., one stock forward per sequence (with grad when
    the caller's mode has it)."""
    out = []
    for row in rows:
        for completion in (row["chosen_ids"], row["rejected_ids"]):
            ids = torch.tensor([row["prompt_ids"] + completion], device=model.device)
            logits = model(ids).logits[0, :-1].double()
            token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            # A completion token at sequence position t >= 1 is predicted by position t - 1; an empty prompt's first
            # completion token has no predictor (as in the packed path: nothing to condition on).
            out.append(token_logps[max(len(row["prompt_ids"]) - 1, 0) :].sum())
    return torch.stack(out)


def packed(model, rows) -> torch.Tensor:
    with torch.no_grad():
        chosen, rejected, n_chosen, n_rejected = packed_logps(model, pack_pairs(rows))
    assert n_chosen.tolist() == [len(r["chosen_ids"]) for r in rows]
    assert n_rejected.tolist() == [len(r["rejected_ids"]) for r in rows]
    return torch.stack([chosen, rejected], dim=1).reshape(-1).double()


@pytest.fixture(scope="module")
def rows():
    return make_rows(4, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["sdpa", "flex", "stock_sdpa"])
def test_packed_equals_unpacked(arch, backend, rows):
    """fp32 on CPU. `stock_sdpa` is transformers' own sdpa fed packed position ids (it then builds the block mask
    itself, masking_utils `find_packed_sequence_indices`): a second packed implementation next to ours. flex runs
    forward only here (eager flex has no CPU backward)."""
    reference = unpacked_logps(build_tiny_model(arch, VOCAB, seed=3).eval(), rows)
    model = build_tiny_model(arch, VOCAB, seed=3).eval()
    add_fused_lm_head(model)
    if backend != "stock_sdpa":
        apply_backend(model, backend)
        assert model.config._attn_implementation == IMPLEMENTATIONS[backend]
    got = packed(model, rows)
    # Sums of ~30 log-probs of about -6 each (~ -170): fp32 rounding is ~1e-7 of that.
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-5)


def test_the_sliding_window_is_applied(rows):
    """Same olmo3 weights without sliding windows give other log-probs (so the test above checks the window), and
    the packed forward follows the config either way."""
    windowed = build_tiny_model("olmo3", VOCAB, seed=3).eval()
    config = tiny_config("olmo3", VOCAB)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    full = AutoModelForCausalLM.from_config(config).eval()
    full.load_state_dict(windowed.state_dict())
    reference_windowed, reference_full = unpacked_logps(windowed, rows), unpacked_logps(full, rows)
    assert (reference_windowed - reference_full).abs().max() > 1e-3
    add_fused_lm_head(full)
    apply_backend(full, "sdpa")
    torch.testing.assert_close(packed(full, rows), reference_full, rtol=1e-6, atol=1e-5)


def test_gradients_flow_only_within_each_sequence():
    """d(log-prob of sequence 0) / d(input embeddings of sequence 1) is exactly 0: nothing leaks across the packed
    boundary, in any layer."""
    rows = make_rows(2, seed=1)
    model = build_tiny_model("llama", VOCAB, seed=3)
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    batch = pack_pairs(rows)
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    cu = batch["cu_seq_lens"]
    outputs = model(
        inputs_embeds=embeddings, position_ids=batch["position_ids"], shift_labels=batch["shift_labels"],
        fused_lm_head=True, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_length"],
        max_length_k=batch["max_length"],
    )  # fmt: skip
    first = outputs.log_probs[0, : cu[1]].sum()
    first.backward()
    grad = embeddings.grad[0].abs().sum(-1)
    assert grad[: cu[1]].sum() > 0
    assert grad[cu[1] :].sum() == 0


def test_the_trainer_repeating_the_choice_logs_it_once(caplog):
    """build_trainer selects from "auto", then FastDPOTrainer validates the backend it was handed: one notice."""
    with caplog.at_level(logging.INFO, logger="sfm_dpo.attention"):
        chosen = select_backend("auto", "cpu", torch.float32)
        assert select_backend(chosen, "cpu", torch.float32) == chosen
    assert caplog.text.count("Packed attention backend") == 1 and caplog.text.count("falling back") == 1


def test_cpu_selection_falls_back_and_logs_why(caplog):
    """On this CPU machine: no varlen kernel, no flash-attn, and eager flex has no backward, so training gets sdpa;
    a reference (no-grad) pass can use flex. Each skipped backend is logged with its reason."""
    with caplog.at_level(logging.INFO, logger="sfm_dpo.attention"):
        assert select_backend("auto", "cpu", torch.float32) == "sdpa"
    text = caplog.text
    assert "falling back to 'sdpa'" in text
    assert "varlen:" in text and "flash_attention_2:" in text and "flex:" in text
    assert "Packed attention backend: sdpa" in text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sfm_dpo.attention"):
        assert select_backend("varlen", "cpu", torch.float32, need_backward=False) == "flex"
    assert "'varlen' is not usable" in caplog.text

    assert select_backend("sdpa", "cpu", torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="No packed attention backend"):
        select_backend("auto", "cpu", torch.float32, candidates=("varlen", "flash_attention_2"))
    with pytest.raises(ValueError, match="attn_backend"):
        select_backend("flash_attention_3", "cpu", torch.float32)


def test_probe_reasons_on_cpu():
    assert probe_backend("sdpa", "cpu", torch.float32) is None
    assert probe_backend("flex", "cpu", torch.float32, need_backward=False) is None
    assert "backward" in probe_backend("flex", "cpu", torch.float32, need_backward=True)
    assert probe_backend("varlen", "cpu", torch.bfloat16) is not None
    assert "flash-attn" in probe_backend("flash_attention_2", "cpu", torch.bfloat16)


def gpu_model(arch: str):
    """The tiny config with head_dim 16: the flash kernels need head_dim % 8 == 0 (the tiny models have 4)."""
    config = tiny_config(arch, VOCAB)
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(config).eval().cuda().to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_backends_match_unpacked(arch, rows):
    """On a GPU, every backend that the probe accepts matches the unpacked forward in bf16; torch >= 2.10 has
    varlen, which must be among them."""
    reference_model = gpu_model(arch)
    reference = unpacked_logps(reference_model, rows).cpu()
    tested = []
    for backend in ("varlen", "flash_attention_2", "flex", "sdpa"):
        if probe_backend(backend, "cuda", torch.bfloat16, head_dim=16) is not None:
            continue
        model = gpu_model(arch)
        model.load_state_dict(reference_model.state_dict())
        add_fused_lm_head(model)
        apply_backend(model, backend)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in pack_pairs(rows).items()}
        with torch.no_grad():
            chosen, rejected, _, _ = packed_logps(model, batch)
        got = torch.stack([chosen, rejected], dim=1).reshape(-1).double().cpu()
        # bf16: sums of ~30 log-probs of ~ -6 agree to ~1e-3 relative.
        torch.testing.assert_close(got, reference, rtol=5e-3, atol=0.1, msg=backend)
        tested.append(backend)
    assert "sdpa" in tested
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        assert "varlen" in tested
