"""Token-length analysis of a preference dataset: what each choice of max_length and batching costs, before any GPU
hour is spent. `scripts/analyze_dataset.py` is the command line around it.

Counting is training's own: every pair goes through `sfm_dpo.data.tokenize_pair` and `truncate_pair`, the two
functions `tokenize_dataset` composes for the trainer, once per candidate max_length. We call them directly rather than
`tokenize_dataset` so that only counts are written (not the ids of 150k long pairs, gigabytes of Arrow cache) and so
that every candidate max_length gets the real truncation, degenerate-after-truncation pairs included;
`tests/test_analyze_dataset.py` checks that the counts equal `tokenize_dataset`'s.

Units: a pair is two sequences, prompt + chosen and prompt + rejected. "Pair length" is the longer one, prompt +
max(chosen, rejected) tokens: the number max_length bounds. "Sequence tokens" are what the model computes, prompt
twice: 2 * prompt + chosen + rejected (TRL's `num_tokens` counts these).
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from sfm_dpo.config import gradient_accumulation_for
from sfm_dpo.data import METADATA_COLUMNS, tokenize_pair, truncate_pair

logger = logging.getLogger(__name__)

CANDIDATE_MAX_LENGTHS = (2048, 4096, 8192, 12288, 16384)
PERCENTILES = (50, 90, 95, 99, 100)
ROUND_TO = (256, 1024)
PER_CANDIDATE_COLUMNS = (
    "final_prompt_tokens",
    "final_chosen_tokens",
    "final_rejected_tokens",
    "prompt_truncated",
    "pair_truncated",
    "dropped",
    "identical_after_truncation",
)
STRATEGIES = {
    "pad_to_max_length": "pad every sequence to max_length",
    "random": "pad to the longest of a random micro-batch (stock TRL)",
    "group_by_length": "transformers' group_by_length sampler (sorted mega-batches)",
    "sorted": "micro-batches of length-sorted pairs (ideal grouping)",
    # A padding-free packed forward (sfm_dpo.packing) computes none of the unused room: there it only costs rows.
    "packed": "each step's pairs packed first-fit-decreasing into rows of pack_tokens, unused room counted as padding",
}


@dataclass(frozen=True)
class LengthSettings:
    """Training's truncation settings and the max_lengths to evaluate (the recipe's included)."""

    max_length: int
    max_prompt_length: int | None
    overlong_policy: str
    candidates: tuple[int, ...]
    keep_degenerate_pairs: bool = False

    def __post_init__(self):
        if self.max_length not in self.candidates or list(self.candidates) != sorted(set(self.candidates)):
            raise ValueError(
                f"candidates must be sorted, unique and hold max_length={self.max_length}: {self.candidates}"
            )

    def prompt_limit(self, max_length: int) -> int | None:
        """The recipe's max_prompt_length where training would accept it (below max_length), else half of max_length,
        which a researcher lowering max_length that far would have to choose."""
        if self.max_prompt_length is None or self.max_prompt_length < max_length:
            return self.max_prompt_length
        return max_length // 2


def candidate_lengths(max_length: int, extra: Sequence[int] = ()) -> tuple[int, ...]:
    return tuple(sorted({*CANDIDATE_MAX_LENGTHS, max_length, *extra}))


# ---------------------------------------------------------------------------------------------------------------------
# Counting (the only tokenizer work)


def count_pair(row: dict, tokenizer, settings: LengthSettings) -> dict:
    """Raw token counts of one normalized pair and, per candidate max_length, what training's truncation leaves."""
    raw = tokenize_pair(row, tokenizer)
    out = {
        "num_prompt_tokens": len(raw["prompt_ids"]),
        "num_chosen_tokens": len(raw["chosen_ids"]),
        "num_rejected_tokens": len(raw["rejected_ids"]),
    }
    finals = [
        truncate_pair(raw, length, settings.prompt_limit(length), settings.overlong_policy)
        for length in settings.candidates
    ]
    for side in ("prompt", "chosen", "rejected"):
        out[f"final_{side}_tokens"] = [len(f[f"{side}_ids"]) for f in finals]
    out["prompt_truncated"] = [f["prompt_truncated"] for f in finals]
    out["pair_truncated"] = [f["pair_truncated"] for f in finals]
    out["dropped"] = [f["drop"] for f in finals]
    out["identical_after_truncation"] = [f["identical_after_truncation"] for f in finals]
    return out


def count_tokens(normalized: datasets.Dataset, tokenizer, settings: LengthSettings, num_proc: int | None = None):
    """`normalized` (from `normalize_dataset`) -> a dataset of counts only (see `count_pair`), metadata kept."""
    text_columns = [c for c in normalized.column_names if c not in METADATA_COLUMNS]
    return normalized.map(
        count_pair,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        remove_columns=text_columns,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc="Tokenizing pairs",
    )


def count_arrays(counted: datasets.Dataset, settings: LengthSettings) -> dict[str, np.ndarray | list]:
    """Columns as numpy: raw counts `[N]`, per-candidate columns `[N, K]` (K = len(settings.candidates)), metadata
    columns as lists of values."""
    table = counted.with_format("arrow")[:]
    n, k = table.num_rows, len(settings.candidates)
    arrays = {}
    for name in ("num_prompt_tokens", "num_chosen_tokens", "num_rejected_tokens"):
        arrays[name] = table.column(name).to_numpy().astype(np.int64)
    for name in PER_CANDIDATE_COLUMNS:
        flat = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
        arrays[name] = flat.reshape(n, k)
    for name in METADATA_COLUMNS:
        if name in table.column_names:
            arrays[name] = table.column(name).to_pylist()
    return arrays


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def nearest_rank(values: np.ndarray, q: float) -> int:
    """The smallest value v with at least q% of `values` <= v (nearest-rank percentile, numpy's 'inverted_cdf'):
    a max_length of v keeps q% of the pairs whole. q = 100 is the maximum."""
    if len(values) == 0:
        raise ValueError("No values to take a percentile of.")
    ordered = np.sort(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return int(ordered[rank - 1])


def summarize(values: np.ndarray) -> dict[str, float]:
    out = {("max" if q == 100 else f"p{q}"): nearest_rank(values, q) for q in PERCENTILES}
    out["mean"] = float(np.mean(values))
    return out


def coverage(pair_lengths: np.ndarray, max_length: int) -> float:
    """Share of pairs whose longer sequence fits in max_length untruncated."""
    return float(np.mean(pair_lengths <= max_length))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def recommend_max_length(pair_lengths: np.ndarray, target: float, candidates: Sequence[int]) -> dict:
    """The smallest candidate covering `target` of the pairs (None if none does), and the exact quantile rounded up
    to multiples of 256 and 1024 (kernel- and memory-friendly sizes)."""
    if not 0 < target <= 1:
        raise ValueError(f"The coverage target must be in (0, 1], got {target}.")
    needed = nearest_rank(pair_lengths, target * 100)
    covering = [c for c in sorted(candidates) if coverage(pair_lengths, c) >= target]
    return {
        "coverage_target": target,
        "exact": needed,
        "candidate": covering[0] if covering else None,
        **{f"rounded_{m}": round_up(needed, m) for m in ROUND_TO},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Batching: padded token slots per epoch


def micro_batch_slots(seq_lengths: np.ndarray, order: np.ndarray, pairs_per_micro_batch: int) -> tuple[int, int]:
    """Token slots when consecutive `pairs_per_micro_batch` pairs of `order` form a micro-batch and TRL's collator
    pads its 2B sequences (chosen and rejected stacked in one [2B, T] tensor) to the longest.

    seq_lengths: [N, 2] prompt+chosen and prompt+rejected lengths. Returns (slots, micro-batches)."""
    longest = seq_lengths.max(axis=1)[order]
    n, b = len(longest), pairs_per_micro_batch
    padded = np.zeros(round_up(n, b), dtype=np.int64)
    padded[:n] = longest
    per_batch_max = padded.reshape(-1, b).max(axis=1)
    pairs_in_batch = np.full(len(per_batch_max), b)
    pairs_in_batch[-1] = n - b * (len(per_batch_max) - 1)
    return int(2 * (pairs_in_batch * per_batch_max).sum()), len(per_batch_max)


def first_fit_decreasing(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Packs items (indices into `costs`) into rows of at most `budget` tokens: largest first, each into the first
    row with room. Raises if an item alone exceeds the budget."""
    rows, room = [], []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        if costs[i] > budget:
            raise ValueError(f"An item of {costs[i]} tokens exceeds the packing budget of {budget} tokens.")
        j = next((j for j, r in enumerate(room) if r >= costs[i]), None)
        if j is None:
            rows.append([i])
            room.append(budget - costs[i])
        else:
            rows[j].append(i)
            room[j] -= costs[i]
    return rows


def packed_slots(pair_costs: np.ndarray, order: np.ndarray, pairs_per_step: int, budget: int) -> tuple[int, int]:
    """Packing that keeps OLMo 3's fixed pairs per optimizer step: each step's pairs (consecutive `pairs_per_step`
    of the sampling `order`) are packed first-fit-decreasing into rows of `budget` tokens, unused room counted as
    padding. pair_costs: [N] sequence tokens of each pair (2 * prompt + chosen + rejected). Returns (slots, rows)."""
    rows = 0
    for start in range(0, len(order), pairs_per_step):
        step = order[start : start + pairs_per_step]
        rows += len(first_fit_decreasing(pair_costs[step].tolist(), budget))
    return rows * budget, rows


def padding_overheads(
    seq_lengths: np.ndarray,
    max_length: int,
    pairs_per_micro_batch: int,
    pairs_per_step: int,
    sampler_batch_size: int,
    pack_tokens: int,
    seed: int = 42,
) -> dict[str, dict]:
    """Padded token slots / real tokens - 1 of each batching strategy over one epoch of `seq_lengths` ([N, 2],
    final prompt+chosen and prompt+rejected lengths). `sampler_batch_size` is transformers' LengthGroupedSampler
    batch (per-device batch x gradient accumulation); `pairs_per_step` the effective batch."""
    n = len(seq_lengths)
    real = int(seq_lengths.sum())
    if n == 0 or real == 0:
        raise ValueError("No pair to batch.")
    rng = np.random.default_rng(seed)
    random_order = rng.permutation(n)
    grouped_order = np.asarray(
        get_length_grouped_indices(
            seq_lengths.max(axis=1).tolist(), sampler_batch_size, generator=torch.Generator().manual_seed(seed)
        )
    )
    sorted_order = np.argsort(-seq_lengths.max(axis=1), kind="stable")
    results = {"pad_to_max_length": (2 * n * max_length, -(-n // pairs_per_micro_batch))}
    for name, order in (("random", random_order), ("group_by_length", grouped_order), ("sorted", sorted_order)):
        results[name] = micro_batch_slots(seq_lengths, order, pairs_per_micro_batch)
    costs = seq_lengths.sum(axis=1)
    if costs.max() <= pack_tokens:
        results["packed"] = packed_slots(costs, random_order, pairs_per_step, pack_tokens)
    return {
        name: {"slots": slots, "real_tokens": real, "overhead": slots / real - 1, "micro_batches": batches}
        for name, (slots, batches) in results.items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# The analysis


def _used_mask(arrays: dict, k: int, settings: LengthSettings) -> np.ndarray:
    """Pairs the trainer keeps at candidate k: not dropped, and not made identical by truncation (unless kept)."""
    drop = arrays["dropped"][:, k].copy()
    if not settings.keep_degenerate_pairs:
        drop |= arrays["identical_after_truncation"][:, k]
    return ~drop


def analyze(
    arrays: dict,
    settings: LengthSettings,
    per_device_batch: int,
    world_size: int,
    effective_batch: int,
    coverage_target: float = 0.95,
    pack_tokens: int | None = None,
    tokens_per_second: float | None = None,
    scale: float = 1.0,
    seed: int = 42,
) -> dict:
    """All numbers of the report, from `count_arrays`' output. `scale` multiplies epoch totals when a sample was
    analysed (rows in the split / rows analysed). `pack_tokens` defaults to 2 x each candidate max_length (one pair
    at its longest always fits)."""
    accumulation = gradient_accumulation_for(effective_batch, per_device_batch, world_size)
    prompt, chosen, rejected = (arrays[f"num_{s}_tokens"] for s in ("prompt", "chosen", "rejected"))
    pair = prompt + np.maximum(chosen, rejected)
    n = len(pair)
    raw_pair_tokens = prompt + chosen + rejected
    sequence_tokens = 2 * prompt + chosen + rejected
    result = {
        "pairs_analysed": n,
        "lengths": {
            name: summarize(v)
            for name, v in (("pair", pair), ("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
        },  # fmt: skip
        "tokens": {
            "prompt": int(prompt.sum()),
            "chosen": int(chosen.sum()),
            "rejected": int(rejected.sum()),
            "sequence_tokens": int(sequence_tokens.sum()),
            # The prompt is computed twice (once per sequence); sharing the prefix would save exactly this share.
            "prompt_share_of_sequence_tokens": float(prompt.sum() / sequence_tokens.sum()),
        },
        "recommended_max_length": recommend_max_length(pair, coverage_target, settings.candidates),
        "settings": {
            "max_length": settings.max_length,
            "max_prompt_length": settings.max_prompt_length,
            "overlong_policy": settings.overlong_policy,
            "keep_degenerate_pairs": settings.keep_degenerate_pairs,
            "per_device_train_batch_size": per_device_batch,
            "world_size": world_size,
            "effective_batch_size": effective_batch,
            "gradient_accumulation_steps": accumulation,
            "seed": seed,
            "scale": scale,
        },
        "max_lengths": [],
    }
    for k, length in enumerate(settings.candidates):
        final = np.stack([arrays[f"final_{s}_tokens"][:, k] for s in ("prompt", "chosen", "rejected")], axis=1)
        dropped = arrays["dropped"][:, k]
        cut = raw_pair_tokens - final.sum(axis=1)
        cut_kept = cut[~dropped & (cut > 0)]
        used = _used_mask(arrays, k, settings)
        seq = np.stack([final[used, 0] + final[used, 1], final[used, 0] + final[used, 2]], axis=1)
        budget = pack_tokens or 2 * length
        entry = {
            "max_length": length,
            "max_prompt_length": settings.prompt_limit(length),
            "is_recipe": length == settings.max_length,
            "coverage": coverage(pair, length),
            "pairs_fitting": int((pair <= length).sum()),
            "prompts_truncated": int(arrays["prompt_truncated"][:, k].sum()),
            "pairs_truncated": int(arrays["pair_truncated"][:, k].sum()),
            "pairs_dropped": int(dropped.sum()),
            "pairs_identical_after_truncation": int(arrays["identical_after_truncation"][:, k].sum()),
            "pairs_used": int(used.sum()),
            "pairs_cut": len(cut_kept),
            "tokens_cut_mean": float(cut_kept.mean()) if len(cut_kept) else 0.0,
            "tokens_cut_p95": nearest_rank(cut_kept, 95) if len(cut_kept) else 0,
            "tokens_cut_max": int(cut_kept.max()) if len(cut_kept) else 0,
            # Tokens cut from kept pairs plus every token of dropped pairs, over all raw tokens.
            "tokens_lost_share": float((cut_kept.sum() + raw_pair_tokens[dropped].sum()) / raw_pair_tokens.sum()),
            "epoch_sequence_tokens": int(seq.sum() * scale),
            "optimizer_steps": math.ceil(used.sum() * scale / effective_batch),
            "pack_tokens": budget,
            "padding": {},
        }
        if used.any():
            entry["padding"] = padding_overheads(
                seq, length, per_device_batch, effective_batch, per_device_batch * accumulation, budget, seed
            )
            if "packed" not in entry["padding"]:
                logger.warning("max_length %d: a pair exceeds pack_tokens=%d; packing not evaluated.", length, budget)
        result["max_lengths"].append(entry)
    recipe = next(e for e in result["max_lengths"] if e["is_recipe"])
    result["epoch"] = epoch_estimate(recipe, tokens_per_second)
    result["breakdowns"] = {
        column: breakdown(arrays[column], pair, sequence_tokens, prompt, settings.max_length)
        for column in METADATA_COLUMNS
        if column in arrays and any(v is not None for v in arrays[column])
    }
    return result


def epoch_estimate(recipe_entry: dict, tokens_per_second: float | None) -> dict:
    """Time per epoch from a measured throughput in sequence tokens/s of the whole job (TRL's logged `num_tokens` /
    runtime, padding excluded) of a run with stock batching. Other strategies scale by their padded slots, since a
    GPU computes a pad token like a real one (attention's quadratic term ignored)."""
    out = {"sequence_tokens": recipe_entry["epoch_sequence_tokens"], "tokens_per_second": tokens_per_second}
    if not tokens_per_second:
        return out
    if tokens_per_second <= 0:
        raise ValueError(f"tokens_per_second must be positive, got {tokens_per_second}.")
    hours = recipe_entry["epoch_sequence_tokens"] / tokens_per_second / 3600
    out["hours_stock"] = hours
    padding = recipe_entry["padding"]
    if "random" in padding:
        stock = 1 + padding["random"]["overhead"]
        out["hours_by_strategy"] = {name: hours * (1 + p["overhead"]) / stock for name, p in padding.items()}
    return out


def breakdown(groups: list, pair: np.ndarray, sequence_tokens: np.ndarray, prompt: np.ndarray, max_length: int):
    """Per value of a metadata column: pairs, pair-length percentiles, share fitting max_length, share of tokens."""
    labels = np.array(["(none)" if g is None else str(g) for g in groups])
    total = sequence_tokens.sum()
    rows = []
    for value in sorted(set(labels.tolist())):
        mask = labels == value
        rows.append({
            "value": value,
            "pairs": int(mask.sum()),
            "pairs_share": float(mask.mean()),
            "pair_p50": nearest_rank(pair[mask], 50),
            "pair_p95": nearest_rank(pair[mask], 95),
            "pair_max": int(pair[mask].max()),
            "coverage_at_max_length": coverage(pair[mask], max_length),
            "sequence_tokens_share": float(sequence_tokens[mask].sum() / total),
            "prompt_share": float(prompt[mask].sum() / sequence_tokens[mask].sum()),
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["pairs"])


# ---------------------------------------------------------------------------------------------------------------------
# Report: one text for the terminal and the Markdown file, a JSON file, two plots


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table with aligned columns, readable as plain text too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tokens(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def report_text(result: dict, meta: dict) -> str:
    s = result["settings"]
    lines = [f"# Token lengths of {meta['dataset']}", ""]
    sample = (
        f" (a seeded sample of {meta['rows_sampled']}; epoch totals scaled x{s['scale']:.2f})"
        if s["scale"] != 1
        else ""
    )
    lines += [
        f"- split `{meta['split']}`: {meta['rows_read']} rows{sample}; {result['pairs_analysed']} pairs analysed after "
        f"normalization ({meta['normalization']})",
        f"- tokenizer of `{meta['model']}`, chat template: {meta['chat_template']}; recipe `{meta['recipe']}`: "
        f"max_length {s['max_length']}, max_prompt_length {s['max_prompt_length']}, overlong_policy "
        f"{s['overlong_policy']}",
        f"- batching: {s['per_device_train_batch_size']} pairs ({2 * s['per_device_train_batch_size']} sequences) per "
        f"micro-batch x {s['world_size']} processes x {s['gradient_accumulation_steps']} accumulation = "
        f"{s['effective_batch_size']} pairs per optimizer step",
        f"- {meta['elapsed_s']:.1f} s with {meta['num_proc']} processes before the report ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in meta.get("timings_s", {}).items())
        + ")",
        "",
        "## Lengths (tokens; pair = prompt + longer completion)",
        "",
    ]
    names = ("p50", "p90", "p95", "p99", "max", "mean")
    rows = [[k] + [f"{v[n]:.0f}" for n in names] for k, v in result["lengths"].items()]
    lines += [table(["", *names], rows), ""]
    t = result["tokens"]
    lines += [
        f"Tokens: prompts {_tokens(t['prompt'])}, chosen {_tokens(t['chosen'])}, rejected {_tokens(t['rejected'])}; "
        f"the two sequences of every pair hold {_tokens(t['sequence_tokens'])} (prompt twice). Prompts are "
        f"{_pct(t['prompt_share_of_sequence_tokens'])} of those: `--share_prompt true` computes each prompt once and "
        "saves about that much (measured at 6.86B on an H200: +10% tokens/s where prompts are 17%, none at 2%; "
        "bench/README.md).",
        "",
        "## Candidate max_length",
        "",
    ]
    rows = []
    for e in result["max_lengths"]:
        rows.append([
            f"{e['max_length']}{' (recipe)' if e['is_recipe'] else ''}", e["max_prompt_length"], _pct(e["coverage"]),
            e["prompts_truncated"], e["pairs_truncated"], e["pairs_dropped"], e["pairs_identical_after_truncation"],
            f"{e['tokens_cut_mean']:.0f} / {e['tokens_cut_p95']}", _pct(e["tokens_lost_share"]), e["pairs_used"],
            _tokens(e["epoch_sequence_tokens"]), e["optimizer_steps"],
        ])  # fmt: skip
    headers = ["max_length", "max_prompt", "pairs <= max_length", "prompts cut", "completions cut", "dropped",
               "identical after cut", "cut tokens mean / p95", "tokens lost", "pairs used", "epoch tokens", "steps"]  # fmt: skip
    lines += [table(headers, rows), ""]
    r = result["recommended_max_length"]
    lines += [
        f"Recommended max_length for {_pct(r['coverage_target'])} of pairs whole: "
        + (f"**{r['candidate']}** (smallest candidate); " if r["candidate"] else "no candidate covers it; ")
        + f"exactly {r['exact']} tokens, {r['rounded_256']} rounded to 256, {r['rounded_1024']} to 1024.",
        "",
        f"## Padding overhead (padded tokens / real tokens, {s['per_device_train_batch_size']} pairs per micro-batch)",
        "",
    ]
    lines += [table(["max_length", *STRATEGIES], [
        [e["max_length"]] + [_pct(e["padding"][k]["overhead"]) if k in e["padding"] else "n/a" for k in STRATEGIES]
        for e in result["max_lengths"] if e["padding"]
    ]), ""]  # fmt: skip
    recipe = next(e for e in result["max_lengths"] if e["is_recipe"])
    if recipe["padding"]:
        lines += [
            f"At max_length {recipe['max_length']}, micro-batches (forward passes) per epoch of the pairs analysed:"
        ]
        lines += [f"- {k}: {v['micro_batches']} ({STRATEGIES[k]})" for k, v in recipe["padding"].items()]
        lines += [
            f"- packed rows hold pack_tokens = {recipe['pack_tokens']} tokens; a padding-free packed forward computes "
            "none of their unused room, which then only costs more rows.",
            "",
        ]
    ep = result["epoch"]
    lines += ["## Epoch", "", f"{_tokens(ep['sequence_tokens'])} sequence tokens per epoch at max_length "
              f"{recipe['max_length']}, {recipe['optimizer_steps']} optimizer steps."]  # fmt: skip
    if "hours_stock" in ep:
        lines.append(f"At {ep['tokens_per_second']:.0f} tokens/s (stock batching): {ep['hours_stock']:.2f} h.")
        for k, h in ep.get("hours_by_strategy", {}).items():
            lines.append(f"- {k}: {h:.2f} h")
    else:
        lines.append(
            "Pass --tokens_per_second (TRL's num_tokens / train_runtime of a measured run) for a time estimate."
        )
    lines.append("")
    for column, groups in result["breakdowns"].items():
        lines += [f"## By {column} (coverage at max_length {s['max_length']})", ""]
        rows = [[g["value"], g["pairs"], _pct(g["pairs_share"]), g["pair_p50"], g["pair_p95"], g["pair_max"],
                 _pct(g["coverage_at_max_length"]), _pct(g["sequence_tokens_share"]), _pct(g["prompt_share"])]
                for g in groups]  # fmt: skip
        headers = [column, "pairs", "share", "pair p50", "pair p95", "pair max", "fit", "tokens share", "prompt share"]
        lines += [table(headers, rows), ""]
    return "\n".join(lines)


def plot_lengths(arrays: dict, result: dict, output_dir, coverage_target: float) -> list:
    """length_histogram.png and coverage.png, candidate max_lengths marked (the recipe's in red). The axis stops past
    the 99.5th percentile or the recipe's max_length, so a long tail does not squash the plot; what lies beyond is
    written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt, chosen, rejected = (arrays[f"num_{s}_tokens"] for s in ("prompt", "chosen", "rejected"))
    pair = prompt + np.maximum(chosen, rejected)
    top = 1.08 * max(nearest_rank(pair, 99.5), result["settings"]["max_length"])
    shown = [e for e in result["max_lengths"] if e["max_length"] <= top]
    hidden = [e for e in result["max_lengths"] if e["max_length"] > top]
    beyond = int((pair > top).sum())
    notes = []
    if beyond:
        notes.append(f"{beyond} pairs beyond the axis (longest {pair.max()})")
    if hidden:
        fits = ", ".join(f"{e['max_length']}: {_pct(e['coverage'])}" for e in hidden)
        notes.append(f"candidates beyond the axis: {fits}")

    def mark(ax):
        for e in shown:
            recipe = e["is_recipe"]
            ax.axvline(
                e["max_length"],
                color="crimson" if recipe else "grey",
                lw=2 if recipe else 1,
                ls="-" if recipe else "--",
            )
        if notes:
            ax.set_title("\n".join(notes), fontsize=8, loc="right")

    fig, ax = plt.subplots(figsize=(10, 5))
    bins = np.linspace(0, top, 80)
    ax.hist(np.minimum(pair, top), bins=bins, color="steelblue", alpha=0.8, label="pair (prompt + longer completion)")
    ax.hist(np.minimum(prompt, top), bins=bins, histtype="step", color="darkorange", lw=1.5, label="prompt")
    mark(ax)
    for i, e in enumerate(shown):
        label = f"{e['max_length']}" + (" (recipe)" if e["is_recipe"] else "")
        ax.annotate(label, (e["max_length"], 0.97 - 0.06 * (i % 3)), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set(xlabel="tokens", ylabel="pairs", xlim=(0, top))
    ax.set_title(f"Token lengths of {result['pairs_analysed']} pairs", loc="left")
    ax.legend(loc="center right")
    fig.tight_layout()
    paths = [output_dir / "length_histogram.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    ordered = np.sort(pair)
    shares = np.arange(len(ordered) + 1) / len(ordered)
    ax.step(
        np.concatenate([[0], ordered, [max(top, ordered[-1])]]),
        np.append(shares, 1.0),
        where="post",
        color="steelblue",
        label="pairs that fit whole",
    )
    ax.axhline(coverage_target, color="green", lw=1, ls=":", label=f"target {_pct(coverage_target)}")
    mark(ax)
    for e in shown:
        ax.plot(e["max_length"], e["coverage"], "o", color="crimson" if e["is_recipe"] else "black", ms=4)
        ax.annotate(f"{e['max_length']}: {_pct(e['coverage'])}", (e["max_length"], e["coverage"]), xytext=(4, -12),
                    textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set(xlabel="max_length (tokens)", ylabel="share of pairs", xlim=(0, top), ylim=(0, 1.02))
    ax.set_title("Coverage: pairs whose longer sequence fits max_length", loc="left")
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(output_dir / "coverage.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_report(arrays: dict, result: dict, meta: dict, output_dir, coverage_target: float) -> dict:
    """Writes report.md, analysis.json and the plots to `output_dir`; returns their paths and the text."""
    import json
    from pathlib import Path

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = report_text(result, meta)
    paths = {"markdown": output_dir / "report.md", "json": output_dir / "analysis.json"}
    paths["markdown"].write_text(text + "\n")
    paths["json"].write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    paths["histogram"], paths["coverage"] = plot_lengths(arrays, result, output_dir, coverage_target)
    return {"paths": paths, "text": text}
