"""scripts/analyze_dataset.py counts what training sees: token counts against the chat template applied by hand,
percentiles against numpy, coverage against a direct count, padding overheads against hand-computed values, packing
that never overflows its budget, and the counts of every candidate max_length against training's own
`tokenize_dataset`."""

import importlib.util
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from sfm_dpo.analysis import (
    PERCENTILES,
    LengthSettings,
    count_arrays,
    count_tokens,
    first_fit_decreasing,
    micro_batch_slots,
    nearest_rank,
    padding_overheads,
    recommend_max_length,
)
from sfm_dpo.data import DataReport, InvalidDataError, normalize_dataset, tokenize_dataset
from sfm_dpo.tiny import dolci_instruct_row, dolci_think_row, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("analyze_dataset", REPO / "scripts" / "analyze_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hand_counts(row: dict, tokenizer) -> tuple[int, int, int]:
    """Prompt/chosen/rejected token counts of a raw Dolci-Think row straight from the chat template."""
    prompt = [{"role": "user", "content": row["prompt"]}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    counts = [len(prompt_ids)]
    for side in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row[side], tokenize=True, return_dict=False)
        assert (
            full[: len(prompt_ids)] == prompt_ids
        )  # the prompt is a token prefix, so the difference is the completion
        counts.append(len(full) - len(prompt_ids))
    return tuple(counts)


@pytest.fixture(scope="module")
def think_rows():
    rng = random.Random(7)
    return [dolci_think_row(i, rng, scale=40) for i in range(48)]


def run_script(args: list[str]) -> dict:
    script = load_script()
    return script.main(script.parse_args(args))


def test_script_counts_match_chat_template_and_write_report(think_rows, demo_assets, tiny_tokenizer, tmp_path):
    data = write_jsonl(think_rows, tmp_path / "think.jsonl")
    out = run_script([
        str(data), "--recipe", "demo", "--model_name_or_path", str(demo_assets["model"]), "--max_lengths", "160", "200",
        "--max_prompt_length", "159", "--output_dir", str(tmp_path / "report"), "--num_proc", "2",
        "--tokens_per_second", "100",
    ])  # fmt: skip
    result = out["result"]

    hand = np.array([hand_counts(row, tiny_tokenizer) for row in think_rows])
    prompt, chosen, rejected = hand.T
    pair = prompt + np.maximum(chosen, rejected)
    assert result["pairs_analysed"] == len(think_rows)
    for name, values in (("pair", pair), ("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        stats = result["lengths"][name]
        for q in PERCENTILES:
            key = "max" if q == 100 else f"p{q}"
            assert stats[key] == np.percentile(values, q, method="inverted_cdf"), (name, key)
        assert stats["mean"] == pytest.approx(values.mean())
    assert result["tokens"]["prompt"] == prompt.sum()
    assert result["tokens"]["sequence_tokens"] == (2 * prompt + chosen + rejected).sum()
    assert result["tokens"]["prompt_share_of_sequence_tokens"] == pytest.approx(
        prompt.sum() / (2 * prompt + chosen + rejected).sum()
    )

    by_length = {e["max_length"]: e for e in result["max_lengths"]}
    assert sorted(by_length) == [160, 200, 256, 2048, 4096, 8192, 12288, 16384]
    assert 0 < by_length[160]["coverage"] < 1, "the fixture must make 160 truncate some pairs"
    for length, entry in by_length.items():
        assert entry["coverage"] == pytest.approx(np.mean(pair <= length))
        assert entry["pairs_fitting"] == (pair <= length).sum()
        # No prompt reaches max_prompt_length 159; completions are cut to max_length - prompt, each side on its own.
        assert entry["max_prompt_length"] == 159 and prompt.max() <= 159 and entry["prompts_truncated"] == 0
        room = length - prompt
        cut = np.maximum(chosen - room, 0) + np.maximum(rejected - room, 0)
        assert entry["pairs_truncated"] == (cut > 0).sum()
        assert entry["tokens_cut_mean"] == pytest.approx(cut[cut > 0].mean() if (cut > 0).any() else 0.0)
        assert entry["tokens_lost_share"] == pytest.approx(cut.sum() / (prompt + chosen + rejected).sum())
    recipe = by_length[256]
    assert recipe["is_recipe"] and recipe["pairs_used"] == len(think_rows)
    room = 256 - prompt
    epoch_tokens = (2 * prompt + np.minimum(chosen, room) + np.minimum(rejected, room)).sum()
    assert recipe["epoch_sequence_tokens"] == epoch_tokens
    assert recipe["optimizer_steps"] == math.ceil(len(think_rows) / 16)  # the demo recipe's effective batch
    assert result["epoch"]["hours_stock"] == pytest.approx(epoch_tokens / 100 / 3600)
    assert result["recommended_max_length"]["exact"] == np.percentile(pair, 95, method="inverted_cdf")

    sources = {g["value"]: g["pairs"] for g in result["breakdowns"]["dataset_source"]}
    assert sources == Counter(row["dataset_source"] for row in think_rows)
    types = {g["value"]: g["pairs"] for g in result["breakdowns"]["preference_type"]}
    assert types == Counter(row["preference_type"] for row in think_rows)

    paths = out["paths"]
    assert json.loads(paths["json"].read_text())["lengths"]["pair"]["max"] == pair.max()
    markdown = paths["markdown"].read_text()
    assert "| 256 (recipe) |" in markdown and "## Padding overhead" in markdown and "## By dataset_source" in markdown
    for name in ("histogram", "coverage"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[name].stat().st_size > 10_000


def test_counts_equal_training_tokenize_dataset(tiny_tokenizer):
    """Every candidate max_length's final lengths and flags are those `tokenize_dataset` gives the trainer; instruct
    pairs that differ only in their tail become identical when cut (and training drops them)."""
    rng = random.Random(3)
    rows = [dolci_instruct_row(i, rng, scale=30) for i in range(24)]
    normalized = normalize_dataset(datasets.Dataset.from_list(rows), DataReport(source="test"))
    settings = LengthSettings(max_length=96, max_prompt_length=48, overlong_policy="truncate", candidates=(40, 64, 96))
    arrays = count_arrays(count_tokens(normalized, tiny_tokenizer, settings), settings)
    assert arrays["identical_after_truncation"].any() and arrays["pair_truncated"].any()
    assert arrays["prompt_truncated"].any()
    for policy in ("truncate", "drop"):
        settings = LengthSettings(96, 48, policy, (40, 64, 96))
        arrays = count_arrays(count_tokens(normalized, tiny_tokenizer, settings), settings)
        for k, length in enumerate(settings.candidates):
            trained = tokenize_dataset(normalized, tiny_tokenizer, length, settings.prompt_limit(length), policy)
            for side in ("prompt", "chosen", "rejected"):
                assert arrays[f"num_{side}_tokens"].tolist() == trained[f"num_{side}_tokens"]
                assert arrays[f"final_{side}_tokens"][:, k].tolist() == [len(x) for x in trained[f"{side}_ids"]]
            for ours, theirs in (("prompt_truncated", "prompt_truncated"), ("pair_truncated", "pair_truncated"),
                                 ("dropped", "drop"), ("identical_after_truncation", "identical_after_truncation")):  # fmt: skip
                assert arrays[ours][:, k].tolist() == trained[theirs], (policy, length, ours)
    assert settings.prompt_limit(40) == 20  # the recipe's 48 would not fit: half of max_length


def test_nearest_rank_is_numpy_inverted_cdf_and_the_covering_length():
    values = np.random.default_rng(0).integers(1, 5000, size=999)
    for q in (*PERCENTILES, 1, 33.3, 99.9):
        p = nearest_rank(values, q)
        assert p == np.percentile(values, q, method="inverted_cdf")
        assert np.mean(values <= p) >= q / 100 > np.mean(values <= p - 1)  # the smallest length covering q%


def test_recommend_max_length_by_hand():
    lengths = np.arange(1, 101)  # 1..100, each once
    rec = recommend_max_length(lengths, 0.95, (50, 96, 128))
    assert rec == {"coverage_target": 0.95, "exact": 95, "candidate": 96, "rounded_256": 256, "rounded_1024": 1024}
    assert recommend_max_length(lengths * 10, 0.95, (50, 96, 128))["candidate"] is None
    assert recommend_max_length(lengths * 10, 0.95, (50, 96, 128))["rounded_256"] == 1024  # 950 -> 1024


# Sequence lengths [prompt+chosen, prompt+rejected] of 5 pairs: 59 real tokens.
SEQ = np.array([[10, 6], [3, 5], [8, 8], [2, 1], [7, 9]])


def test_micro_batch_padding_by_hand():
    # 2 pairs per micro-batch, each micro-batch a [4, longest] tensor; the last one holds 1 pair: [2, longest].
    assert micro_batch_slots(SEQ, np.arange(5), 2) == (2 * 2 * 10 + 2 * 2 * 8 + 2 * 1 * 9, 3)  # 90
    assert micro_batch_slots(SEQ, np.array([0, 4, 2, 1, 3]), 2) == (2 * 2 * 10 + 2 * 2 * 8 + 2 * 1 * 2, 3)  # 76
    out = padding_overheads(SEQ, max_length=10, pairs_per_micro_batch=2, pairs_per_step=5, sampler_batch_size=2,
                            pack_tokens=20, seed=0)  # fmt: skip
    assert out["pad_to_max_length"]["overhead"] == pytest.approx(100 / 59 - 1)
    assert out["sorted"]["overhead"] == pytest.approx(76 / 59 - 1)
    # Pair costs 16, 8, 16, 3, 16 into rows of 20, largest first: [16+3], [16], [16], [8] = 4 rows, 80 slots.
    assert out["packed"]["micro_batches"] == 4 and out["packed"]["overhead"] == pytest.approx(80 / 59 - 1)
    # Random micro-batches by a loop over the same seeded permutation.
    order = np.random.default_rng(0).permutation(5)
    slots = sum(2 * len(b) * max(max(SEQ[i]) for i in b) for b in (order[0:2], order[2:4], order[4:]))
    assert out["random"]["slots"] == slots
    assert out["sorted"]["slots"] <= out["group_by_length"]["slots"] <= out["pad_to_max_length"]["slots"]
    assert all(v["real_tokens"] == 59 for v in out.values())
    # Equal lengths: no padding in any micro-batch strategy.
    flat = padding_overheads(np.full((8, 2), 5), 5, 2, 8, 4, 10)
    assert all(
        flat[k]["overhead"] == 0 for k in ("pad_to_max_length", "random", "group_by_length", "sorted", "packed")
    )


def test_packing_keeps_every_item_within_budget():
    pack = first_fit_decreasing
    costs = np.random.default_rng(1).integers(1, 400, size=500).tolist()
    rows = pack(costs, 1000)
    assert sorted(i for row in rows for i in row) == list(range(len(costs)))
    assert all(sum(costs[i] for i in row) <= 1000 for row in rows)
    assert len(rows) >= math.ceil(sum(costs) / 1000)
    assert len(rows) <= math.ceil(sum(costs) / 1000 * 11 / 9) + 1  # FFD bound: 11/9 OPT + 6/9
    with pytest.raises(ValueError, match="exceeds the packing budget"):
        pack([5, 1001], 1000)


def test_sample_is_seeded_and_scaled(think_rows, demo_assets, tmp_path):
    data = write_jsonl(think_rows, tmp_path / "think.jsonl")
    args = [str(data), "--recipe", "demo", "--model_name_or_path", str(demo_assets["model"]), "--num_samples", "12",
            "--num_proc", "1", "--max_length", "4096", "--max_prompt_length", "2048"]  # nothing truncated  # fmt: skip
    first = run_script([*args, "--output_dir", str(tmp_path / "a")])["result"]
    second = run_script([*args, "--output_dir", str(tmp_path / "b")])["result"]
    assert first["pairs_analysed"] == 12 and first["lengths"] == second["lengths"]
    assert first["settings"]["scale"] == pytest.approx(48 / 12)
    recipe = next(e for e in first["max_lengths"] if e["is_recipe"])
    assert recipe["epoch_sequence_tokens"] == pytest.approx(first["tokens"]["sequence_tokens"] * 4, abs=1)


def test_bad_row_stops_with_trainings_error(think_rows, demo_assets, tmp_path):
    rows = [dict(r) for r in think_rows[:4]]
    rows[2]["rejected"] = [rows[2]["rejected"][0], {"role": "assistant", "content": None}]
    data = write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(
        InvalidDataError, match=r"row 2 \(id='think-2'\) at .*bad.jsonl:3: rejected\[1\] has null content"
    ):
        run_script([str(data), "--recipe", "demo", "--model_name_or_path", str(demo_assets["model"]), "--num_proc", "1",
                    "--output_dir", str(tmp_path / "out")])  # fmt: skip


def malformed_file(think_rows, tmp_path) -> Path:
    rows = [dict(r) for r in think_rows[:6]]
    rows[1]["chosen"] = None
    rows[4]["rejected"] = [rows[4]["rejected"][0], {"role": "assistant", "content": ""}]
    return write_jsonl(rows, tmp_path / "bad.jsonl")


def run_cli(args: list[str]):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "analyze_dataset.py"), *args], capture_output=True, text=True
    )


def test_cli_malformed_rows_clean_error_or_skipped(think_rows, demo_assets, tmp_path):
    """As a user runs it: the row-by-row message and exit 1, no traceback; with --skip_invalid_rows (a bare flag or
    `true`, as train_dpo.py takes it) the two bad rows are skipped, counted by reason, and the rest analysed."""
    data = malformed_file(think_rows, tmp_path)
    common = [str(data), "--recipe", "demo", "--model_name_or_path", str(demo_assets["model"]), "--num_proc", "1"]
    failed = run_cli([*common, "--output_dir", str(tmp_path / "fail")])
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr + failed.stdout
    assert "2 malformed row(s)" in failed.stderr
    assert re.search(r"row 1 \(id='think-1'\) at .*bad.jsonl:2: 'chosen' is null", failed.stderr)
    assert re.search(r"row 4 \(id='think-4'\) at .*bad.jsonl:5: rejected\[1\] has empty content", failed.stderr)
    assert "--skip_invalid_rows" in failed.stderr
    assert not (tmp_path / "fail").exists()

    skipped = run_cli([*common, "--skip_invalid_rows", "true", "--output_dir", str(tmp_path / "skip")])
    assert skipped.returncode == 0, skipped.stderr
    assert "2 invalid rows skipped" in skipped.stdout
    in_process = run_script([*common, "--skip_invalid_rows", "--output_dir", str(tmp_path / "skip_flag")])
    written = json.loads((tmp_path / "skip" / "analysis.json").read_text())  # {"meta": ..., **result}
    for result, meta in ((written, written["meta"]), (in_process["result"], in_process["meta"])):
        assert result["pairs_analysed"] == 4 and meta["rows_read"] == 6
        assert meta["data_report"]["invalid_rows_skipped"] == {
            "'chosen' is null": 1,
            "rejected[1] has empty content": 1,
        }
    assert load_script().parse_args([*common, "--skip_invalid_rows", "false"]).skip_invalid_rows is False
