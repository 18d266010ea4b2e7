"""Shared prompts (`pack_pairs(share_prompt=True)`): each pair's prompt computed once, the rejected completion reading
the prompt's keys from the chosen sequence. The log-probs and the gradients must be those of each sequence alone.

The references are independent of the packing and attention code: every sequence alone through the stock model
(transformers' sdpa, no packing), full logits, log_softmax, summed over its completion tokens; gradients of a weighted
sum of those."""

import math
import random

import numpy as np
import pytest
import torch
from test_attention_backends import gpu_model
from test_attention_backends import unpacked_logps as stock_logps
from trl.trainer.utils import add_fused_lm_head

from sfm_dpo.attention import apply_backend, probe_backend
from sfm_dpo.packing import (
    PackedPreferenceCollator,
    TokenBudgetBatchSampler,
    dataset_pair_tokens,
    pack_pairs,
    packed_logps,
    pair_tokens,
    reference_logps_fn,
)
from sfm_dpo.tiny import build_tiny_model

VOCAB = 512
ARCHS = ["gpt_neox", "olmo3", "llama"]


def make_rows(n: int, seed: int) -> list[dict]:
    """Prompts of 0, 1 and 2-14 tokens (the edge cases of the shared suffix) and completions longer than olmo3's tiny
    sliding window (8), so that the window crosses from the rejected completion into the shared prompt."""
    rng = random.Random(seed)

    def ids(n_tokens):
        return [rng.randrange(1, VOCAB) for _ in range(n_tokens)]

    prompts = [0, 1, 2] + [rng.randint(3, 14) for _ in range(n - 3)]
    return [
        dict(prompt_ids=ids(p), chosen_ids=ids(rng.randint(1, 20)), rejected_ids=ids(rng.randint(1, 20)))
        for p in prompts
    ]


def shared_logps(model, rows) -> torch.Tensor:
    chosen, rejected, n_chosen, n_rejected = packed_logps(model, pack_pairs(rows, share_prompt=True))
    assert n_chosen.tolist() == [len(r["chosen_ids"]) for r in rows]
    assert n_rejected.tolist() == [len(r["rejected_ids"]) for r in rows]
    return torch.stack([chosen, rejected], dim=1).reshape(-1).double()


def test_shared_layout_by_hand():
    rows = [
        {"prompt_ids": [7, 8, 9], "chosen_ids": [1], "rejected_ids": [2, 3]},
        {"prompt_ids": [], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [10], "chosen_ids": [11], "rejected_ids": [12]},
    ]
    batch = pack_pairs(rows, share_prompt=True)
    x = -100
    #                            c0: 7 8 9 1 | r0: 9 2 3 | c1: 4 5 | r1: 6 | c2: 10 11 | r2: 10 12
    assert batch["input_ids"].tolist() == [[7, 8, 9, 1, 9, 2, 3, 4, 5, 6, 10, 11, 10, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 0, 0, 1, 0, 1]]
    assert batch["shift_labels"].tolist() == [[x, x, 1, x, 2, 3, x, 5, x, x, 11, x, 12, x]]
    assert batch["sequence_index"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 5, 5]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 7, 9, 10, 12, 14]
    # Keys: c0's own, then r0 = c0's first two prompt tokens + its own three; pairs without a shared prefix unchanged.
    assert batch["kv_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert batch["cu_seq_lens_k"].tolist() == [0, 4, 9, 11, 12, 14, 16]
    assert batch["max_length"] == 4 and batch["max_length_k"] == 5
    assert batch["completion_lengths"].tolist() == [1, 2, 2, 1, 1, 1]
    assert batch["sequence_tokens"].tolist() == [4, 5, 2, 1, 2, 2]
    assert [pair_tokens(r, share_prompt=True) for r in rows] == [7, 3, 4]
    assert sum(pair_tokens(r, share_prompt=True) for r in rows) == batch["input_ids"].shape[1]
    unshared = pack_pairs(rows)
    assert "kv_index" not in unshared and unshared["sequence_tokens"].tolist() == [4, 5, 2, 1, 2, 2]
    assert [pair_tokens(r) for r in rows] == [9, 3, 4]
    assert PackedPreferenceCollator(share_prompt=True)(rows)["kv_index"].tolist() == batch["kv_index"].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_logps_and_gradients_equal_each_sequence_alone(arch):
    """fp32 on the CPU, sdpa (forward and backward): log-probs to fp32 rounding, every parameter's gradient of a
    weighted sum of the log-probs to 1e-5 relative (and 2e-6 of the tensor's largest, the fp32 rounding of sums of
    opposite terms: the unshared packed path is off by as much). The weights differ per sequence, so a gradient that reached the
    prompt from only one of its two sequences (or a rejected suffix that missed the shared keys) would show."""
    rows = make_rows(6, seed=1)
    weights = torch.linspace(0.5, 1.5, 2 * len(rows), dtype=torch.float64)
    reference_model = build_tiny_model(arch, VOCAB, seed=3).train()
    reference = stock_logps(reference_model, rows)
    (reference * weights).sum().backward()

    model = build_tiny_model(arch, VOCAB, seed=3).train()
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    got = shared_logps(model, rows)
    torch.testing.assert_close(got, reference.detach(), rtol=1e-6, atol=1e-5)
    (got * weights).sum().backward()
    stock = dict(reference_model.named_parameters())
    for name, parameter in model.named_parameters():
        expected = stock[name].grad
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=2e-6 * expected.abs().max(), msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_computes_the_shared_layout(arch):
    """flex attention's block mask (forward only: eager flex has no CPU backward) gives the same log-probs."""
    rows = make_rows(5, seed=2)
    with torch.no_grad():
        reference = stock_logps(build_tiny_model(arch, VOCAB, seed=3).eval(), rows)
        model = build_tiny_model(arch, VOCAB, seed=3).eval()
        add_fused_lm_head(model)
        apply_backend(model, "flex")
        torch.testing.assert_close(shared_logps(model, rows), reference, rtol=1e-6, atol=1e-5)


def test_probe_checks_the_shared_layout():
    assert probe_backend("sdpa", "cpu", torch.float32, shared_prompt=True) is None
    assert probe_backend("flex", "cpu", torch.float32, need_backward=False, shared_prompt=True) is None
    assert "kv_index" in probe_backend("flash_attention_2", "cpu", torch.bfloat16, shared_prompt=True)


def test_reference_pass_with_shared_prompts():
    """The reference pass packs shared prompts into the same budget and returns the stock values."""
    rows = make_rows(9, seed=4)
    model = build_tiny_model("gpt_neox", VOCAB, seed=3).eval()
    with torch.no_grad():
        reference = stock_logps(model, rows)
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    chosen, rejected = reference_logps_fn(model, "cpu", max_tokens=40, share_prompt=True)(rows)
    got = torch.stack([chosen, rejected], dim=1).reshape(-1).double()
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-5)


def test_sharing_changes_how_steps_split_not_which_pairs_they_hold():
    """The steps are drawn from the unshared token counts; shared prompts (cheaper pairs) fill micro-batches
    further, so fewer are needed, and the step digests (what a resume checks) stay the same."""
    rng = random.Random(5)
    rows = [
        dict(prompt_ids=[1] * rng.randint(50, 400), chosen_ids=[2] * rng.randint(10, 300),
             rejected_ids=[3] * rng.randint(10, 300))
        for _ in range(64)
    ]  # fmt: skip
    unshared = [pair_tokens(r) for r in rows]
    shared = [pair_tokens(r, share_prompt=True) for r in rows]
    common = dict(pairs_per_step=16, world_size=2, seed=0, max_tokens_per_microbatch=2048)
    plain = TokenBudgetBatchSampler(unshared, **common)
    sharing = TokenBudgetBatchSampler(unshared, packed_tokens=shared, **common)
    assert sharing.step_digests() == plain.step_digests()
    assert sharing.microbatches_per_step < plain.microbatches_per_step
    assert sharing.stats()["max_tokens"] <= 2048
    for step in sharing.plan(0):
        for bins in step:
            for b in bins:
                assert len(b) == 1 or sum(shared[i] for i, _ in b) <= 2048


def test_a_shared_prompt_step_equals_the_stock_trl_step(tmp_path):
    """16 pairs = one optimizer step. Stock TRL (4 padded pairs x 4 accumulation steps, with a reference model)
    against the fast path with shared prompts in token-budget micro-batches: equal SGD updates (= equal gradients),
    equal loss, and the tokens counted as the data holds them (the unshared fast path's count)."""
    from test_fast_trainer import assert_close_to_max, build, make_rows, parameters

    from sfm_dpo.fast_trainer import FastDPOTrainer
    from sfm_dpo.trainer import SFMDPOTrainer

    rows = make_rows(16, seed=6, max_completion=40)
    common = dict(loss_type=["sigmoid_norm"], optim="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1,
                  lr_scheduler_type="constant", per_device_train_batch_size=4, gradient_accumulation_steps=4)  # fmt: skip
    stock = build(SFMDPOTrainer, tmp_path / "stock", rows, arch="olmo3", **common)
    fast = {
        share: build(
            FastDPOTrainer,
            tmp_path / f"fast-{share}",
            rows,
            arch="olmo3",
            attn_backend="sdpa",
            max_tokens_per_microbatch=160,
            share_prompt=share,
            **common,
        )  # fmt: skip
        for share in (False, True)
    }
    shared = fast[True]
    assert shared.batch_sampler.stats()["mean_tokens"] < fast[False].batch_sampler.stats()["mean_tokens"]
    assert shared.batch_sampler.step_digests() == fast[False].batch_sampler.step_digests()
    before = parameters(stock.model)
    stock_result = stock.train()
    results = {share: trainer.train() for share, trainer in fast.items()}
    assert results[True].training_loss == pytest.approx(stock_result.training_loss, rel=1e-5)
    after_stock, after_shared = parameters(stock.model), parameters(shared.model)
    for name in before:
        assert_close_to_max(after_shared[name] - before[name], after_stock[name] - before[name], name)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    logged = {share: [e["num_tokens"] for e in t.state.log_history if "loss" in e] for share, t in fast.items()}
    assert logged[True] == logged[False] == [tokens]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_backends_compute_the_shared_layout(arch):
    """On a GPU, in bf16: every backend whose shared-prompt probe passes (torch's varlen among them on torch >=
    2.11) gives the stock per-sequence log-probs, and the same gradients as the unshared packed path."""
    rows = make_rows(6, seed=1)
    reference_model = gpu_model(arch)
    with torch.no_grad():
        reference = stock_logps(reference_model, rows).cpu()
    tested = []
    for backend in ("varlen", "flex", "sdpa"):
        if probe_backend(backend, "cuda", torch.bfloat16, head_dim=16, shared_prompt=True) is not None:
            continue
        grads = []
        for share in (False, True):
            model = gpu_model(arch).train()
            model.load_state_dict(reference_model.state_dict())
            add_fused_lm_head(model)
            apply_backend(model, backend)
            batch = {
                k: v.cuda() if isinstance(v, torch.Tensor) else v
                for k, v in pack_pairs(rows, share_prompt=share).items()
            }
            chosen, rejected, _, _ = packed_logps(model, batch)
            got = torch.stack([chosen, rejected], dim=1).reshape(-1)
            got.sum().backward()
            torch.testing.assert_close(got.detach().double().cpu(), reference, rtol=5e-3, atol=0.1, msg=backend)
            grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
        relative = (grads[0] - grads[1]).norm() / grads[0].norm()
        assert relative < 2e-2, (backend, relative.item())
        tested.append(backend)
    assert "varlen" in tested and "sdpa" in tested


def test_build_trainer_shares_prompts_in_the_reference_pass_and_training(demo_assets, tmp_path, caplog):
    """`--share_prompt` through `fast_path.build_trainer` (what train_dpo.py runs) on the demo's tiny GPT-NeoX: the
    cached reference log-probs equal an unshared pass's, the trainer packs shared prompts, and two optimizer steps
    and the held-out evaluation at the end give the unshared run's losses (fp32)."""
    import logging

    from test_reference_pass import load, run_args, token_rows
    from transformers import AutoTokenizer

    from sfm_dpo import fast_path

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["model"])
    data = token_rows(len(tokenizer), n_rows=16)
    held_out = token_rows(len(tokenizer), n_rows=6, seed=1)
    trainers, computed = {}, {}
    for share in (False, True):
        script_args, training_args, model_args = run_args(
            # Plain SGD: Adam's first steps take the sign of each gradient entry, and entries near 0 flip with the
            # rounding of another packing.
            demo_assets["model"], tmp_path / f"share-{share}", max_steps=2, logging_steps=1, learning_rate=0.5,
            optim="sgd", save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        script_args.share_prompt = share
        script_args.ref_cache_dir = str(tmp_path / f"cache-{share}")
        model = load(demo_assets)
        computed[share] = 0

        def count(module, args, kwargs, output, share=share):
            computed[share] += kwargs["input_ids"].shape[1]

        model.register_forward_hook(count, with_kwargs=True)
        with caplog.at_level(logging.INFO, logger="sfm_dpo"):
            trainers[share] = fast_path.build_trainer(model, data, script_args, training_args, model_args, tokenizer,
                                                      [], eval_dataset=held_out)  # fmt: skip
    # The reference passes (the only forwards so far: training and held-out pairs) computed each pair's prompt once.
    assert computed == {
        share: sum(dataset_pair_tokens(data, share)) + sum(dataset_pair_tokens(held_out, share)) for share in computed
    }
    assert computed[True] < computed[False]
    assert "Shared prompts: each pair's prompt is computed once (sdpa attention)" in caplog.text
    assert trainers[True].data_collator.share_prompt and not trainers[False].data_collator.share_prompt
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(trainers[True].train_dataset[column], trainers[False].train_dataset[column],
                                   rtol=1e-6, atol=1e-5)  # fmt: skip
    losses, evaluations = {}, {}
    for share, trainer in trainers.items():
        trainer.train()
        losses[share] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        evaluations[share] = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(losses[True]) == 2 and losses[True][0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert trainers[True].get_eval_dataloader().collate_fn.share_prompt
    assert len(evaluations[True]) == 1 and evaluations[True] == pytest.approx(evaluations[False], rel=1e-5)
    assert abs(evaluations[True][0] - math.log(2)) > 1e-3  # trained away from the reference: the equality says much


def test_share_prompt_is_turned_off_with_a_warning_where_the_backend_cannot(tmp_path, caplog):
    """transformers' flash_attention_2 path does not gather the shared keys: `--share_prompt` is then off, said why."""
    import logging

    from trl import DPOConfig

    from sfm_dpo.fast_path import resolve_share_prompt

    model = build_tiny_model("llama", VOCAB, seed=0)
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING, logger="sfm_dpo"):
        assert resolve_share_prompt(True, "flash_attention_2", model, args) is False
    assert "--share_prompt: off" in caplog.text and "kv_index" in caplog.text
    assert resolve_share_prompt(True, "sdpa", model, args) is True
    assert resolve_share_prompt(False, "sdpa", model, args) is False
