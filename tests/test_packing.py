"""Packed layout, the chunked LM head's memory, and the token-budget sampler's invariants."""

import hashlib
import json
import random
from collections import Counter

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer.utils import add_fused_lm_head

from sfm_dpo.attention import apply_backend
from sfm_dpo.packing import (
    PackedPreferenceCollator,
    PlannedDataset,
    TokenBudgetBatchSampler,
    dataset_pair_tokens,
    pack_pairs,
    packed_logps,
    pair_tokens,
    reference_logps_fn,
    stratified_order,
)
from sfm_dpo.tiny import build_tiny_model


def test_pack_pairs_layout_by_hand():
    rows = [
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11], "ref_chosen_logps": -1.0,
         "ref_rejected_logps": -2.0},
        {"prompt_ids": [3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_chosen_logps": -3.0,
         "ref_rejected_logps": -4.0},
    ]  # fmt: skip
    batch = pack_pairs(rows)
    #          c0: 7 8 9 | r0: 7 8 10 11 | c1: 3 4 5 | r1: 3 6
    assert batch["input_ids"].tolist() == [[7, 8, 9, 7, 8, 10, 11, 3, 4, 5, 3, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # Label of the NEXT token of the same sequence; the last token of each sequence predicts nothing, so no
    # prediction crosses into the next sequence.
    x = -100
    assert batch["shift_labels"].tolist() == [[x, 9, x, x, 10, 11, x, 4, 5, x, 6, x]]
    assert batch["sequence_index"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 7, 10, 12] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 4
    assert batch["completion_lengths"].tolist() == [1, 2, 2, 1]
    assert batch["pair_weights"].tolist() == [1.0, 1.0] and batch["pairs_in_step"].item() == 2
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]
    assert pair_tokens(rows[0]) == 2 * 2 + 1 + 2

    collated = PackedPreferenceCollator()([dict(rows[0], _weight=0.0, _pairs_in_step=128)])
    assert collated["pair_weights"].tolist() == [0.0] and collated["pairs_in_step"].item() == 128
    with pytest.raises(ValueError, match="no rows"):
        pack_pairs([])


def _pack_by_lists(rows: list[dict]) -> dict[str, list]:
    """The packed layout spelled out with lists, one token at a time: the reference for the vectorized pack_pairs."""
    out = {"input_ids": [], "position_ids": [], "shift_labels": [], "sequence_index": [], "completion_lengths": []}
    for row in rows:
        for completion in (row["chosen_ids"], row["rejected_ids"]):
            ids = list(row["prompt_ids"]) + list(completion)
            is_completion = [False] * len(row["prompt_ids"]) + [True] * len(completion)
            for t, token in enumerate(ids):
                out["input_ids"].append(token)
                out["position_ids"].append(t)
                out["shift_labels"].append(ids[t + 1] if t + 1 < len(ids) and is_completion[t + 1] else -100)
                out["sequence_index"].append(len(out["completion_lengths"]))
            out["completion_lengths"].append(len(completion))
    return out


def test_pack_pairs_matches_the_layout_built_token_by_token():
    rng = random.Random(0)
    for _ in range(20):
        rows = [
            {name: [rng.randrange(1, 1000) for _ in range(rng.choice([0, 1, 2, rng.randrange(3, 60)]))]
             for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for _ in range(rng.randrange(1, 6))
        ]  # fmt: skip
        for row in rows:
            row["prompt_ids"] = row["prompt_ids"] or ([] if row["chosen_ids"] and row["rejected_ids"] else [5])
        batch, want = pack_pairs(rows), _pack_by_lists(rows)
        for name in ("input_ids", "position_ids", "shift_labels"):
            assert batch[name].tolist() == [want[name]] and batch[name].dtype == torch.long, name
        assert batch["sequence_index"].tolist() == want["sequence_index"]
        assert batch["completion_lengths"].tolist() == want["completion_lengths"]
    with pytest.raises(ValueError, match="empty sequence"):
        pack_pairs([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": []}])


class MaxAllocation(TorchDispatchMode):
    """Largest tensor (elements) produced by any op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_lm_head_never_builds_tokens_by_vocab_logits(monkeypatch):
    """Item 4: with TRL's tile sizes shrunk to 128 tokens x 1024 vocab (they are 4096 x 32768), no tensor of the
    packed forward + backward comes near tokens x vocab, while the unfused forward builds exactly that."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 128)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 1024)
    vocab = 8192
    rng = random.Random(0)
    rows = [{k: [rng.randrange(1, vocab) for _ in range(n)] for k, n in (("prompt_ids", 10), ("chosen_ids", 40),
             ("rejected_ids", 30))} for _ in range(2)]  # fmt: skip
    batch = pack_pairs(rows)
    n_tokens = batch["input_ids"].numel()
    model = build_tiny_model("llama", vocab)
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")

    with MaxAllocation() as unfused:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=longest, max_length_k=longest)  # fmt: skip
    assert unfused.largest >= n_tokens * vocab  # the recorder sees the [1, T, V] logits when they exist

    with MaxAllocation() as fused:
        chosen, rejected, _, _ = packed_logps(model, batch)
        (chosen.sum() + rejected.sum()).backward()
    # The largest left are the 128 x 1024 tile, the [vocab, hidden] head gradient and the [heads, T, T] scores.
    assert fused.largest < n_tokens * vocab / 6, (fused.largest, n_tokens * vocab)
    assert model.lm_head.weight.grad.abs().sum() > 0


def check_plan(sampler: TokenBudgetBatchSampler, n_rows: int, budget: int | None, epoch: int = 0):
    """Every pair exactly once, steps of pairs_per_step (the last partial), equal micro-batch counts everywhere,
    equal pair counts per rank (+-1), budgets kept unless a pair alone exceeds it, fillers weigh 0."""
    plan = sampler.plan(epoch)
    seen = Counter()
    for s, step in enumerate(plan):
        assert len(step) == sampler.world_size
        pairs = [sum(w > 0 for b in bins for _, w in b) for bins in step]
        expected = min(sampler.pairs_per_step, n_rows - s * sampler.pairs_per_step)
        assert sum(pairs) == expected
        assert max(pairs) - min(pairs) <= 1
        for bins in step:
            assert len(bins) == sampler.microbatches_per_step
            for b in bins:
                assert len(b) >= 1
                real = [i for i, w in b if w > 0]
                seen.update(real)
                if budget is not None and len(b) > 1:
                    assert sum(sampler.pair_tokens[i] for i, _ in b) <= budget
                assert all(w == 0.0 for _, w in b if _ not in real) and all(w in (0.0, 1.0) for _, w in b)
    assert sorted(seen) == list(range(n_rows)) and set(seen.values()) == {1}
    return plan


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_token_budget_sampler_invariants(world_size):
    rng = random.Random(world_size)
    tokens = [int(rng.lognormvariate(5, 0.8)) + 4 for _ in range(203)]  # long-tailed; 203 = 6 x 32 + 11
    budget = 600
    sampler = TokenBudgetBatchSampler(tokens, 32, world_size, seed=0, num_epochs=2, max_tokens_per_microbatch=budget)
    assert sampler.oversized == sum(t > budget for t in tokens)
    plans = [check_plan(sampler, len(tokens), budget, epoch) for epoch in (0, 1)]
    assert plans[0] != plans[1]  # reshuffled per epoch, deterministically:
    again = TokenBudgetBatchSampler(tokens, 32, world_size, seed=0, num_epochs=2, max_tokens_per_microbatch=budget)
    assert again.plan(1) == plans[1]
    # The stream: (step, micro-batch, rank) order, each key carrying its step's pair count.
    sampler.set_epoch(1)
    stream = list(sampler)
    assert len(stream) == len(sampler) == 7 * sampler.microbatches_per_step * world_size
    assert {key[2] for keys in stream[: sampler.microbatches_per_step * world_size] for key in keys} == {32}
    assert {key[2] for key in stream[-1]} == {11}
    assert stream[world_size] == [(i, w, 32) for i, w in plans[1][0][0][1]]  # step 0, micro-batch 1, rank 0


def test_steps_hold_one_pair_of_every_length_stratum():
    """Each full step takes one row of each stratum of the sorted lengths (rank // steps), in a seeded random step; the
    last partial step takes random rows. So steps cost nearly the same tokens and need fewer micro-batches."""
    rng = random.Random(0)
    tokens = rng.sample(range(50, 5000), 8 * 20 + 5)  # distinct lengths: the strata are exact; 20 steps of 8 + 5
    order = stratified_order(tokens, 8, torch.Generator().manual_seed(3))
    assert sorted(order) == list(range(len(tokens)))
    full = order[:160]
    stratum = {row: k // 20 for k, row in enumerate(sorted(full, key=tokens.__getitem__))}
    steps = [full[s : s + 8] for s in range(0, 160, 8)]
    assert all(sorted(stratum[row] for row in step) == list(range(8)) for step in steps)
    assert stratified_order(tokens, 8, torch.Generator().manual_seed(3)) == order
    again = stratified_order(tokens, 8, torch.Generator().manual_seed(4))
    assert [sorted(again[s : s + 8]) for s in range(0, 160, 8)] != [sorted(step) for step in steps]
    assert sorted(order[160:]) != sorted(
        sorted(range(165), key=tokens.__getitem__)[-5:]
    )  # random rows, not the longest
    # Long-tailed lengths at one micro-batch budget: the costliest step sets the count for all (equalize_plan).
    tokens = [int(rng.lognormvariate(7, 1.0)) + 4 for _ in range(4096)]
    sampler = TokenBudgetBatchSampler(tokens, 128, 4, seed=0, max_tokens_per_microbatch=8192)
    steps_tokens = [sum(tokens[i] for bins in step for b in bins for i, w in b if w) for step in sampler.plan(0)]
    assert max(steps_tokens) < 1.1 * min(steps_tokens)
    permutation = torch.randperm(4096, generator=torch.Generator().manual_seed(0)).tolist()
    plain = [sum(tokens[i] for i in permutation[s : s + 128]) for s in range(0, 4096, 128)]
    assert max(plain) > 1.2 * min(plain)  # what plain slices of a permutation give


def test_fixed_pair_count_sampler():
    """Without a budget: per_device pairs per micro-batch, so accumulation = pairs_per_step / (world x per_device)."""
    tokens = list(range(10, 74))
    sampler = TokenBudgetBatchSampler(tokens, 16, 2, seed=1, pairs_per_microbatch=4)
    assert sampler.microbatches_per_step == 2
    plan = check_plan(sampler, 64, None)
    assert all(len(b) == 4 for step in plan for bins in step for b in bins)


def test_last_partial_step_gets_fillers():
    """5 pairs left for 4 ranks x 2 micro-batches: ranks with one pair run a zero-weight filler (the shortest row)."""
    tokens = [50] * 37 + [3]
    sampler = TokenBudgetBatchSampler(tokens, 32, 4, seed=0, max_tokens_per_microbatch=200)
    assert sampler.microbatches_per_step == 2
    last = check_plan(sampler, 38, 200)[-1]
    fillers = [b for bins in last for b in bins if b[0][1] == 0.0]
    assert fillers and all(b == [(37, 0.0)] for b in fillers)


def test_accelerate_shards_the_stream_by_rank():
    """accelerate's BatchSamplerShard deals micro-batch i to rank i % world: each rank gets exactly its plan."""
    rows = [{"prompt_ids": [1] * (1 + i % 5), "chosen_ids": [2] * (1 + i % 7), "rejected_ids": [3] * (1 + i % 3)}
            for i in range(40)]  # fmt: skip
    dataset = Dataset.from_list(rows)
    tokens = dataset_pair_tokens(dataset)
    assert tokens == [pair_tokens(r) for r in rows]
    assert dataset_pair_tokens(dataset.select(range(39, -1, -1))) == tokens[::-1]
    sampler = TokenBudgetBatchSampler(tokens, 16, 2, seed=0, max_tokens_per_microbatch=40)
    for rank in range(2):
        loader = torch.utils.data.DataLoader(PlannedDataset(dataset), batch_sampler=sampler,
                                             collate_fn=PackedPreferenceCollator())  # fmt: skip
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        batches = list(shard)
        planned = [bins[rank] for bins in sampler.plan(0)]
        expected = [b for step in planned for b in step]
        assert len(batches) == len(expected) == len(shard)
        for batch, keys in zip(batches, expected, strict=True):
            want = pack_pairs([rows[i] for i, _ in keys], [w for _, w in keys])
            assert torch.equal(batch["input_ids"], want["input_ids"])
            assert torch.equal(batch["pair_weights"], want["pair_weights"])


def test_reference_logps_fn_matches_one_packed_batch():
    """compute_fn (sorted, regrouped by tokens) returns rows in their own order, equal to one packed forward."""
    rng = random.Random(2)
    rows = [{k: [rng.randrange(1, 512) for _ in range(rng.randint(2, 30))] for k in
             ("prompt_ids", "chosen_ids", "rejected_ids")} for _ in range(7)]  # fmt: skip
    model = build_tiny_model("gpt_neox", 512)
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    model.train()
    chosen, rejected = reference_logps_fn(model, "cpu", max_tokens=60)(rows)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        want_chosen, want_rejected, _, _ = packed_logps(model, pack_pairs(rows))
    torch.testing.assert_close(chosen, want_chosen, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rejected, want_rejected, rtol=1e-6, atol=1e-5)
    assert chosen.dtype == torch.float32 and not chosen.requires_grad


def test_step_digests_depend_on_the_pairs_of_each_step_only():
    """What a resume must keep: the pairs of each step. They come from the seed, the rows and pairs_per_step, not from
    the world size, the token budget or the number of planned epochs (max_steps), which only change the split."""
    rng = random.Random(5)
    tokens = [int(rng.lognormvariate(5, 0.8)) + 4 for _ in range(100)]
    base = TokenBudgetBatchSampler(tokens, 16, 2, seed=0, num_epochs=2, max_tokens_per_microbatch=600)
    digests = base.step_digests()
    assert len(digests) == 2 and all(len(epoch) == base.steps_per_epoch == 7 for epoch in digests)
    expected = [
        [hashlib.sha256(json.dumps(sorted(i for b in step[0] + step[1] for i, w in b if w > 0)).encode()).hexdigest()
         for step in base.plan(epoch)]
        for epoch in (0, 1)
    ]  # fmt: skip
    assert [[d[:12] for d in epoch] for epoch in expected] == digests
    for same in (
        TokenBudgetBatchSampler(tokens, 16, 4, seed=0, num_epochs=2, max_tokens_per_microbatch=600),
        TokenBudgetBatchSampler(tokens, 16, 1, seed=0, num_epochs=2, max_tokens_per_microbatch=300),
        TokenBudgetBatchSampler(tokens, 16, 2, seed=0, num_epochs=3, pairs_per_microbatch=2),
    ):
        assert same.step_digests()[:2] == digests
    for other in (
        TokenBudgetBatchSampler(tokens, 16, 2, seed=1, num_epochs=2, max_tokens_per_microbatch=600),
        TokenBudgetBatchSampler(tokens, 20, 2, seed=0, num_epochs=2, max_tokens_per_microbatch=600),
        TokenBudgetBatchSampler(tokens[:-1] + [tokens[-1] + 500], 16, 2, seed=0, num_epochs=2,
                                max_tokens_per_microbatch=600),
    ):  # fmt: skip
        assert other.step_digests() != digests
