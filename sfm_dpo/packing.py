"""Padding-free packed DPO forward.

The chosen and rejected sequences (prompt + completion) of several pairs go into one row `[1, T]`, in the order
chosen_0, rejected_0, chosen_1, rejected_1, ...; position ids restart at 0 for each sequence and the attention backend
(`sfm_dpo.attention`) keeps every sequence to itself, so no pad token is computed and each sequence sees exactly what
it sees alone. The completion log-probs come from TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`), which
projects in `[4096 tokens, 32768 vocab]` tiles and never builds the `[T, vocab]` float32 logits, then are summed per
sequence with one `index_add`.

Labels are given pre-shifted (`shift_labels[t]` is the label of token t + 1 of the same sequence, -100 at its last
token), so no prediction ever crosses a sequence boundary, even for an empty prompt.

Prompt sharing (`share_prompt=True`) computes each pair's prompt once. The rejected sequence keeps only its suffix in
the row: the prompt's last token (whose logits predict the first completion token) and the rejected completion, at
position ids P - 1, P, ... The attention of that suffix reads the prompt's keys and values from the chosen sequence:
the keys are a second layout `kv_index` (the chosen sequence, then its first P - 1 tokens again, then the suffix), with
their own offsets `cu_seq_lens_k`, and the attention is causal from the bottom right (a suffix query at offset i of
its R' tokens sees the P - 1 shared keys and suffix keys 0..i), which is what flash attention's varlen kernels do when
the query and key lengths differ. The attention backends gather the keys and values (`sfm_dpo.attention`), whose
gradient sums into the prompt's tokens from both sequences. Every token computes exactly what it computes unshared,
and a pair costs P + C + R + 1 tokens instead of 2P + C + R.
"""

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _packed_cost(prompt, completions, share_prompt: bool):
    """Tokens a pair costs packed, for ints or numpy arrays of lengths: its prompt twice (once per sequence) and both
    completions; with `share_prompt`, the prompt once and its last token again (see the module docstring)."""
    return prompt + (np.minimum(prompt, 1) if share_prompt else prompt) + completions


def pair_tokens(row: dict, share_prompt: bool = False) -> int:
    """`_packed_cost` of one row."""
    completions = len(row["chosen_ids"]) + len(row["rejected_ids"])
    return int(_packed_cost(len(row["prompt_ids"]), completions, share_prompt))


def pack_pairs(
    rows: Sequence[dict],
    pair_weights: Sequence[float] | None = None,
    pairs_in_step: int | None = None,
    share_prompt: bool = False,
) -> dict[str, Any]:
    """Packs preference rows (`prompt_ids`, `chosen_ids`, `rejected_ids` lists, optionally `ref_chosen_logps` /
    `ref_rejected_logps`) into one row.

    Returns, with B pairs, S = 2B sequences and T tokens:
        input_ids, position_ids, shift_labels: `[1, T]` long (shift_labels -100 outside completions);
        sequence_index: `[T]` long, the sequence (0..S-1, chosen_i = 2i, rejected_i = 2i + 1) of each token;
        cu_seq_lens: `[S + 1]` int32 offsets, max_length: int, the flash-attention varlen kwargs;
        completion_lengths: `[S]` long, completion tokens per sequence (TRL's `completion_mask.sum(1)`);
        sequence_tokens: `[S]` long, prompt + completion tokens of each sequence, as stock TRL computes them (with
            `share_prompt` the row holds fewer; token counts and rates are reported in these);
        pair_weights: `[B]` float, 1 for real pairs, 0 for fillers (see `TokenBudgetBatchSampler`);
        pairs_in_step: `[]` long, pairs in this optimizer step across all ranks (B when not given);
        ref_chosen_logps, ref_rejected_logps: `[B]` float, when the rows carry them.
    With `share_prompt`, also the key layout of the shared prompts (module docstring), K keys:
        kv_index: `[K]` long, the row position of each key; cu_seq_lens_k: `[S + 1]` int32, max_length_k: int.
    """
    if len(rows) == 0:
        raise ValueError("pack_pairs got no rows; a micro-batch holds at least one pair.")
    # Vectorized (numpy): a 64k-token reference micro-batch packs in ~3 ms instead of ~40 ms of list building, which
    # the reference pass would spend with the GPU idle.
    pieces, segment_prompts, segment_starts, sequence_tokens = [], [], [], []
    for row in rows:
        prompt = np.asarray(row["prompt_ids"], dtype=np.int64)
        chosen = np.asarray(row["chosen_ids"], dtype=np.int64)
        rejected = np.asarray(row["rejected_ids"], dtype=np.int64)
        sequence_tokens += [len(prompt) + len(chosen), len(prompt) + len(rejected)]
        # The rejected sequence starts after its first `n_shared` prompt tokens, which it reads as keys of the chosen
        # sequence: all of the prompt but the last token, whose logits predict the first completion token.
        n_shared = max(len(prompt) - 1, 0) if share_prompt else 0
        pieces += [prompt, chosen, prompt[n_shared:], rejected]
        segment_prompts += [len(prompt), len(prompt) - n_shared]
        segment_starts += [0, n_shared]  # a sequence's keys: its shared prompt tokens, then its own
    # [S] tokens of each sequence in the row
    piece_lengths = np.asarray([len(p) for p in pieces]).reshape(-1, 2).sum(1)
    segment_prompts, segment_starts = np.asarray(segment_prompts), np.asarray(segment_starts)
    completion_lengths = piece_lengths - segment_prompts
    if piece_lengths.min() == 0:
        raise ValueError("pack_pairs got an empty sequence (no prompt and no completion).")
    input_ids = np.concatenate(pieces)
    sequence_index = np.repeat(np.arange(len(piece_lengths)), piece_lengths)
    offsets = np.arange(len(input_ids)) - np.repeat(np.cumsum(piece_lengths) - piece_lengths, piece_lengths)
    position_ids = offsets + np.repeat(segment_starts, piece_lengths)
    # shift_labels[t] = the label of token t + 1: that token if it is a completion token of the same sequence.
    predicts_completion = (offsets[1:] >= np.repeat(segment_prompts, piece_lengths)[1:]) & (offsets[1:] > 0)
    shift_labels = np.full(len(input_ids), -100, dtype=np.int64)
    shift_labels[:-1] = np.where(predicts_completion, input_ids[1:], -100)
    batch = {
        "input_ids": torch.from_numpy(input_ids)[None],
        "position_ids": torch.from_numpy(position_ids)[None],
        "shift_labels": torch.from_numpy(shift_labels)[None],
        "sequence_index": torch.from_numpy(sequence_index),
        "cu_seq_lens": _offsets(piece_lengths),
        "max_length": int(piece_lengths.max()),
        "completion_lengths": torch.from_numpy(completion_lengths),
        "sequence_tokens": torch.tensor(sequence_tokens),
        "pair_weights": torch.tensor(pair_weights if pair_weights is not None else [1.0] * len(rows)),
        "pairs_in_step": torch.tensor(pairs_in_step if pairs_in_step is not None else len(rows)),
    }
    if share_prompt:
        starts = np.cumsum(piece_lengths) - piece_lengths
        key_lengths = piece_lengths + segment_starts
        kv_index = []
        for i, n_shared in enumerate(segment_starts[1::2]):
            chosen_start, rejected_start = starts[2 * i], starts[2 * i + 1]
            kv_index += [
                np.arange(chosen_start, chosen_start + piece_lengths[2 * i]),
                np.arange(chosen_start, chosen_start + n_shared),
                np.arange(rejected_start, rejected_start + piece_lengths[2 * i + 1]),
            ]
        batch["kv_index"] = torch.from_numpy(np.concatenate(kv_index))
        batch["cu_seq_lens_k"] = _offsets(key_lengths)
        batch["max_length_k"] = int(key_lengths.max())
    if REF_COLUMNS[0] in rows[0]:
        for column in REF_COLUMNS:
            batch[column] = torch.tensor([float(row[column]) for row in rows])
    return batch


def _offsets(lengths: np.ndarray) -> torch.Tensor:
    """`[len + 1]` int32 cumulative offsets, the flash-attention varlen `cu_seq_lens`."""
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.from_numpy(np.cumsum(lengths))
    return offsets


class PackedPreferenceCollator:
    """Collates rows into one packed row (`pack_pairs`, prompts shared when `share_prompt`). Rows may carry `_weight`
    (0 marks a filler pair) and `_pairs_in_step`, which `PlannedDataset` adds for the token-budget sampler."""

    def __init__(self, share_prompt: bool = False):
        self.share_prompt = share_prompt

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        weights = [row.get("_weight", 1.0) for row in rows]
        pairs_in_step = rows[0].get("_pairs_in_step")
        return pack_pairs(rows, weights, pairs_in_step, share_prompt=self.share_prompt)


def packed_forward(model, batch: dict[str, Any]):
    """One forward of `model` (patched with TRL's fused LM head) on a packed row.

    Returns `(logps, outputs)`: `logps` `[S]` float, the summed completion log-prob of each sequence, and the fused
    head's `FusedCausalLMOutput` (per-token `log_probs`, `entropy`, ... of shape `[1, T]`, 0 outside completions)."""
    cu_seq_lens, max_length = batch["cu_seq_lens"], int(batch["max_length"])
    keys = {}
    if "kv_index" in batch:  # shared prompts: the keys' own layout (module docstring), read by sfm_dpo.attention
        keys = {"kv_index": batch["kv_index"]}
    outputs = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        shift_labels=batch["shift_labels"],
        fused_lm_head=True,
        use_cache=False,
        cu_seq_lens_q=cu_seq_lens,
        cu_seq_lens_k=batch.get("cu_seq_lens_k", cu_seq_lens),
        max_length_q=max_length,
        max_length_k=int(batch.get("max_length_k", max_length)),
        **keys,
    )
    per_token = outputs.log_probs[0]
    n_sequences = batch["completion_lengths"].shape[0]
    # Sums in float32 whatever the model dtype: a 16k-token completion summed in bf16 would lose its last digits.
    logps = per_token.new_zeros(n_sequences, dtype=torch.float32).index_add(
        0, batch["sequence_index"].to(per_token.device), per_token.float()
    )
    return logps, outputs


def packed_logps(model, batch: dict[str, Any]):
    """`(chosen_logps, rejected_logps, n_chosen_tokens, n_rejected_tokens)`, each `[B]`, for a `pack_pairs` batch:
    the public entry point for benchmarks."""
    logps, _ = packed_forward(model, batch)
    lengths = batch["completion_lengths"]
    return logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]


def group_by_tokens(token_counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped, in order, into consecutive runs of at most `max_tokens` tokens (a longer item alone)."""
    groups, current, used = [], [], 0
    for i, n in enumerate(token_counts):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def reference_logps_fn(
    model,
    device: torch.device | str,
    max_tokens: int = 16384,
    context: Callable | None = None,
    share_prompt: bool = False,
) -> Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]]:
    """`compute_fn(rows) -> (chosen_logps, rejected_logps)` (`[len(rows)]` float32, on the CPU, summed over completion
    tokens) for `sfm_dpo.ref_cache.load_or_compute`: the packed forward of `model` (fused head and packed attention
    backend already applied) in eval mode under no_grad, rows sorted by length and packed `max_tokens` at a time.
    `context` (e.g. `accelerator.autocast`) is entered around each forward, as the training step enters it;
    `share_prompt` packs each pair's prompt once (see `pack_pairs`)."""

    def compute_fn(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        cost = [pair_tokens(row, share_prompt) for row in rows]
        order = sorted(range(len(rows)), key=lambda i: cost[i])
        chosen, rejected = torch.empty(len(rows)), torch.empty(len(rows))
        was_training = model.training
        model.eval()
        try:
            for group in group_by_tokens([cost[i] for i in order], max_tokens):
                indices = [order[j] for j in group]
                batch = pack_pairs([rows[i] for i in indices], share_prompt=share_prompt)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with torch.no_grad(), context() if context is not None else contextlib.nullcontext():
                    c, r, _, _ = packed_logps(model, batch)
                chosen[indices], rejected[indices] = c.float().cpu(), r.float().cpu()
        finally:
            model.train(was_training)
        return chosen, rejected

    return compute_fn


# ---------------------------------------------------------------------------------------------------------------------
# Token-budget batching
#
# One optimizer step = `pairs_per_step` pairs (the recipe's effective batch, 128), each pair in a random step as with
# the stock sampler, but stratified by length (`stratified_order`: one pair of every length stratum per step), so all
# steps cost about the same tokens. The step's pairs are dealt to the ranks (equal pair counts, balanced tokens), and
# each rank's share is cut into micro-batches that fit the token budget (first-fit decreasing). DeepSpeed and accelerate
# count a fixed number of micro-batches per optimizer step (`gradient_accumulation_steps`), so every (step, rank) gets
# exactly the same number M: the most any of them needs; the others split their largest micro-batches further, and a
# rank short of pairs (the last, partial step) runs a zero-weight filler pair, whose forward and backward keep the
# collectives in step. The loss of a micro-batch is its pairs' summed loss times world_size / pairs_in_step, so one
# step's gradient is exactly the mean over its pairs, whatever the split (see `FastDPOTrainer`).
# ---------------------------------------------------------------------------------------------------------------------


def dataset_pair_tokens(dataset, share_prompt: bool = False) -> list[int]:
    """`pair_tokens` of every row of a `datasets.Dataset`, read from Arrow list lengths (no row materialized)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:] if dataset._indices is not None else dataset.data.table
    length = {
        name: np.asarray(pc.list_value_length(table.column(name)), dtype=np.int64)
        for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    completions = length["chosen_ids"] + length["rejected_ids"]
    return _packed_cost(length["prompt_ids"], completions, share_prompt).tolist()


def _deal(items: Sequence[int], tokens: Sequence[int], n_bins: int, capacities: Sequence[int]) -> list[list[int]]:
    """Longest-processing-time dealing: items, longest first, each to the bin with the fewest tokens that still has
    room (`capacities` items per bin)."""
    bins, used = [[] for _ in range(n_bins)], [0] * n_bins
    for item in sorted(items, key=lambda i: -tokens[i]):
        open_bins = [b for b in range(n_bins) if len(bins[b]) < capacities[b]]
        best = min(open_bins, key=lambda b: used[b])
        bins[best].append(item)
        used[best] += tokens[item]
    return bins


def _first_fit(items: Sequence[int], tokens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing; an item above the budget gets a bin of its own."""
    bins, used = [], []
    for item in sorted(items, key=lambda i: -tokens[i]):
        for b in range(len(bins)):
            if used[b] + tokens[item] <= max_tokens:
                bins[b].append(item)
                used[b] += tokens[item]
                break
        else:
            bins.append([item])
            used.append(tokens[item])
    return bins


def _split_to(bins: list[list[int]], n_bins: int, tokens: Sequence[int]) -> list[list[int]]:
    """Splits the heaviest multi-pair micro-batch in two (balanced) until there are `n_bins` or none can split."""
    bins = [list(b) for b in bins]
    while len(bins) < n_bins:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            break
        heaviest = max(splittable, key=lambda b: sum(tokens[i] for i in bins[b]))
        bins[heaviest:heaviest + 1] = _deal(bins[heaviest], tokens, 2, [len(bins[heaviest])] * 2)  # fmt: skip
    return bins


def stratified_order(pair_tokens: Sequence[int], pairs_per_step: int, generator: torch.Generator) -> list[int]:
    """A seeded order of all rows whose consecutive `pairs_per_step` slices (the optimizer steps) each hold one pair of
    every length stratum: the rows of the full steps, sorted by tokens, are cut into `pairs_per_step` strata of one
    pair per step, and each stratum is dealt to the steps in a random order. The rows of the last, partial step are
    drawn at random first.

    Every row is still in a random step, but all steps cost nearly the same tokens. With plain slices of a permutation
    the costliest step sets the micro-batch count of every step (`equalize_plan`: gradient accumulation is fixed), and
    the others are split to match it: on Think-shaped data at 16k-token micro-batches, 16 per step on one GPU where 11
    suffice, 13 per rank on 4 GPUs."""
    n_rows = len(pair_tokens)
    permutation = torch.randperm(n_rows, generator=generator).tolist()
    n_full = n_rows // pairs_per_step
    full, last = permutation[: n_full * pairs_per_step], permutation[n_full * pairs_per_step :]
    by_tokens = sorted(range(len(full)), key=lambda k: (pair_tokens[full[k]], k))  # ties in random order
    steps: list[list[int]] = [[] for _ in range(n_full)]
    for start in range(0, len(full), max(n_full, 1)):
        stratum = by_tokens[start : start + n_full]
        for k, step in zip(stratum, torch.randperm(n_full, generator=generator).tolist(), strict=True):
            steps[step].append(full[k])
    return [row for step in steps for row in step] + last


def plan_epoch(
    pair_tokens: Sequence[int],
    pairs_per_step: int,
    world_size: int,
    seed: int,
    epoch: int,
    max_tokens_per_microbatch: int | None = None,
    pairs_per_microbatch: int | None = None,
    packed_tokens: Sequence[int] | None = None,
) -> list[list[list[list[int]]]]:
    """`plan[step][rank]` = that rank's micro-batches (lists of row indices), before `equalize_plan`.

    Steps are consecutive `pairs_per_step` slices of `stratified_order` of `pair_tokens` (the last one partial). Give
    exactly one of `max_tokens_per_microbatch` (first-fit decreasing into the budget) and `pairs_per_microbatch`
    (that many pairs per micro-batch, balanced by tokens). `packed_tokens` (default `pair_tokens`) is what a pair
    costs in a micro-batch, which the ranks and micro-batches are balanced and filled by: with shared prompts, less
    than `pair_tokens`, which keeps deciding the steps, so that the pairs of each step do not depend on sharing."""
    if (max_tokens_per_microbatch is None) == (pairs_per_microbatch is None):
        raise ValueError("Give exactly one of max_tokens_per_microbatch and pairs_per_microbatch.")
    if pairs_per_step < world_size:
        raise ValueError(f"pairs_per_step ({pairs_per_step}) must be at least the world size ({world_size}).")
    order = stratified_order(pair_tokens, pairs_per_step, torch.Generator().manual_seed(seed + epoch))
    cost = pair_tokens if packed_tokens is None else packed_tokens
    plan = []
    for start in range(0, len(order), pairs_per_step):
        step = order[start:start + pairs_per_step]  # fmt: skip
        per_rank = [len(step) // world_size + (r < len(step) % world_size) for r in range(world_size)]
        ranks = _deal(step, cost, world_size, per_rank)
        if max_tokens_per_microbatch is not None:
            plan.append([_first_fit(items, cost, max_tokens_per_microbatch) for items in ranks])
        else:
            plan.append([
                _deal(items, cost, -(-len(items) // pairs_per_microbatch), [pairs_per_microbatch] * len(items))
                if items else [] for items in ranks
            ])  # fmt: skip
    return plan


def equalize_plan(plan, n_microbatches: int, pair_tokens: Sequence[int], filler: int):
    """Gives every (step, rank) exactly `n_microbatches` micro-batches of `(row, weight)` keys, heaviest first: splits
    the largest, and pads with the zero-weight `filler` row where a rank has fewer pairs than micro-batches."""
    equalized = []
    for step in plan:
        ranks = []
        for bins in step:
            if len(bins) > n_microbatches:
                raise ValueError(f"A rank needs {len(bins)} micro-batches, more than {n_microbatches}.")
            bins = _split_to(bins, n_microbatches, pair_tokens)
            bins.sort(key=lambda b: -sum(pair_tokens[i] for i in b))
            keys = [[(i, 1.0) for i in b] for b in bins]
            keys += [[(filler, 0.0)] for _ in range(n_microbatches - len(bins))]
            ranks.append(keys)
        equalized.append(ranks)
    return equalized


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Yields micro-batches of keys `(row, weight, pairs_in_step)` for `PlannedDataset`, for all ranks interleaved
    (step, micro-batch, rank): accelerate's `BatchSamplerShard` deals batch i to rank i % world_size, so each rank
    gets its own micro-batches in order. Every step has `microbatches_per_step` micro-batches on every rank.

    The plans of all `num_epochs` epochs are made up front, so that M (`microbatches_per_step`, which must become
    `gradient_accumulation_steps` before the accelerator exists) covers all of them."""

    def __init__(
        self,
        pair_tokens: Sequence[int],
        pairs_per_step: int,
        world_size: int,
        seed: int,
        num_epochs: int = 1,
        max_tokens_per_microbatch: int | None = None,
        pairs_per_microbatch: int | None = None,
        min_microbatches: int = 1,
        packed_tokens: Sequence[int] | None = None,
    ):
        self.pair_tokens = list(pair_tokens)
        # What each pair costs in a micro-batch (`plan_epoch`): fewer than pair_tokens with shared prompts.
        self.packed_tokens = self.pair_tokens if packed_tokens is None else list(packed_tokens)
        self.pairs_per_step = pairs_per_step
        self.world_size = world_size
        self.epoch = 0
        plans = [
            plan_epoch(
                self.pair_tokens,
                pairs_per_step,
                world_size,
                seed,
                epoch,
                max_tokens_per_microbatch,
                pairs_per_microbatch,
                self.packed_tokens,
            )  # fmt: skip
            for epoch in range(num_epochs)
        ]
        needed = max(len(bins) for plan in plans for step in plan for bins in step)
        self.microbatches_per_step = max(needed, min_microbatches)
        filler = min(range(len(self.packed_tokens)), key=lambda i: self.packed_tokens[i])
        self._plans = [equalize_plan(p, self.microbatches_per_step, self.packed_tokens, filler) for p in plans]
        self.oversized = sum(
            1 for t in self.packed_tokens if max_tokens_per_microbatch is not None and t > max_tokens_per_microbatch
        )
        if self.oversized:
            logger.warning(
                "%d pairs are longer than max_tokens_per_microbatch=%d tokens; each runs alone in its micro-batch.",
                self.oversized, max_tokens_per_microbatch,
            )  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plans[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int):
        """`[step][rank][micro-batch]` -> list of `(row, weight)`. Epochs beyond those planned reuse them cyclically."""
        return self._plans[epoch % len(self._plans)]

    def __iter__(self):
        for step in self.plan(self.epoch):
            n_pairs = sum(weight > 0 for bins in step for b in bins for _, weight in b)
            for g in range(self.microbatches_per_step):
                for rank in range(self.world_size):
                    yield [(row, weight, n_pairs) for row, weight in step[rank][g]]

    def __len__(self) -> int:
        return self.steps_per_epoch * self.microbatches_per_step * self.world_size

    def step_digests(self) -> list[list[str]]:
        """`[epoch][step]`: a digest of the sorted ids of the pairs each step trains (fillers left out). What a resumed
        run must keep: the Trainer skips the steps already trained by count. The pairs of a step come from the seed,
        the rows' token counts and `pairs_per_step` (`stratified_order`); the world size, the token budget, prompt
        sharing and the number of planned epochs only change how the step is split, so they leave the digests alone."""
        return [
            [
                hashlib.sha256(
                    json.dumps(sorted(i for bins in step for b in bins for i, w in b if w > 0)).encode()
                ).hexdigest()[:12]
                for step in plan
            ]
            for plan in self._plans
        ]

    def stats(self) -> dict[str, float]:
        """Token counts per micro-batch over epoch 0's plan, fillers included (what memory must hold)."""
        sizes = [sum(self.packed_tokens[i] for i, _ in b) for step in self._plans[0] for bins in step for b in bins]
        return {"microbatches": len(sizes), "max_tokens": max(sizes), "mean_tokens": sum(sizes) / len(sizes)}


class PlannedDataset(torch.utils.data.Dataset):
    """Row access by `(row, weight, pairs_in_step)` keys: the row's token (and reference) columns plus `_weight` and
    `_pairs_in_step`, which `PackedPreferenceCollator` reads."""

    def __init__(self, dataset):
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"] + [c for c in REF_COLUMNS if c in dataset.column_names]
        self.dataset = dataset.select_columns(columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        row, weight, pairs_in_step = key
        return {**self.dataset[int(row)], "_weight": weight, "_pairs_in_step": pairs_in_step}
