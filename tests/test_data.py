"""Dolci schemas normalize to TRL's format; every bad input gives an error naming the row and the fault; tokenization
is exact (chat template strings written out by hand) and never masks eos although pad == eos."""

import copy
import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from sfm_dpo.chat_templates import CHATML_TEMPLATE, resolve_chat_template
from sfm_dpo.data import (
    DataReport,
    InvalidDataError,
    load_preference_rows,
    normalize_dataset,
    prepare_dataset,
    tokenize_pair,
    truncate_pair,
)
from sfm_dpo.tiny import INSTRUCT_MESSAGE_KEYS, dolci_instruct_row, dolci_think_row, write_jsonl


def normalize_rows(rows, **kwargs):
    report = DataReport(source="test")
    return normalize_dataset(datasets.Dataset.from_list(rows), report, **kwargs), report


def normalize_file(rows, tmp_path, **kwargs):
    report = DataReport(source="test")
    dataset = load_preference_rows(str(write_jsonl(rows, tmp_path / "rows.jsonl")))
    return normalize_dataset(dataset, report, **kwargs), report


def test_dolci_think_shape_normalizes():
    row = dolci_think_row(0, random.Random(0))
    assert row["chosen"][0]["content"] == row["prompt"]
    out, _ = normalize_rows([row])
    assert out[0]["prompt"] == [{"role": "user", "content": row["prompt"]}]
    assert out[0]["chosen"] == [row["chosen"][1]]
    assert out[0]["rejected"] == [row["rejected"][1]]
    assert out[0]["dataset_source"] == row["dataset_source"]
    assert out[0]["chosen"][0]["content"].startswith("<think> ") and "\n</think>\n\n" in out[0]["chosen"][0]["content"]


def test_dolci_instruct_multiturn_shape_normalizes():
    row = dolci_instruct_row(0, random.Random(0), n_turns=3)
    assert (
        len(row["chosen"]) == 6
        and set(row["chosen"][0]) == set(INSTRUCT_MESSAGE_KEYS)
        and len(INSTRUCT_MESSAGE_KEYS) == 24
    )
    out, _ = normalize_rows([row])
    expected_prompt = [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]]
    assert out[0]["prompt"] == expected_prompt
    assert out[0]["chosen"] == [{"role": "assistant", "content": row["chosen"][-1]["content"]}]
    assert out[0]["rejected"] == [{"role": "assistant", "content": row["rejected"][-1]["content"]}]
    assert out[0]["preference_type"] == row["preference_type"]


def test_trl_formats_pass_through():
    conversational = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    out, _ = normalize_rows([conversational])
    assert out[0] == conversational
    standard = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    out, _ = normalize_rows([standard])
    assert out[0] == standard


def _think(**changes):
    row = dolci_think_row(7, random.Random(7))
    row = copy.deepcopy(row)
    for path, value in changes.items():
        target = row
        *keys, last = path.split(".")
        for key in keys:
            target = target[int(key) if key.isdigit() else key]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return row


BAD_ROWS = {
    "missing chosen": ({"chosen": KeyError}, r"'chosen' is null"),
    "null rejected": ({"rejected": None}, r"'rejected' is null"),
    "empty chosen": ({"chosen": []}, r"'chosen' is empty"),
    "empty content": ({"chosen.1.content": "  "}, r"chosen\[1\] has empty content"),
    "non-string content": ({"chosen.1.content": 5}, r"chosen\[1\] has non-string content \(int\)"),
    "unknown role": ({"rejected.0.role": "tool"}, r"rejected\[0\] has unknown role 'tool'"),
    "no final assistant": ({"chosen.1.role": "user"}, r"'chosen' does not end with an assistant turn"),
    "diverging prompts": (
        {"rejected.0.content": "another question"},
        r"chosen and rejected diverge before their last turn \(at message 0\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_named(case, tmp_path):
    changes, message = BAD_ROWS[case]
    rows = [dolci_think_row(i, random.Random(i)) for i in range(3)] + [_think(**changes)]
    with pytest.raises(
        InvalidDataError,
        match=rf"1 malformed row\(s\)(.|\n)*row 3 \(id='think-7'\) at .*rows.jsonl:4: (chosen and rejected )?{message}",
    ):
        normalize_file(rows, tmp_path)


def test_skip_invalid_rows_counts_by_reason(tmp_path):
    rows = [dolci_think_row(i, random.Random(i)) for i in range(4)]
    rows += [_think(**{"chosen.1.content": 5}), _think(**{"chosen.1.content": 6}), _think(rejected=None)]
    out, report = normalize_file(rows, tmp_path, skip_invalid_rows=True)
    assert len(out) == 4
    assert report.invalid_rows_skipped == {"chosen[1] has non-string content": 2, "'rejected' is null": 1}


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(dolci_think_row(0, random.Random(0))) + "\n{not json\n")
    with pytest.raises(InvalidDataError, match=r"broken.jsonl, line 2: not valid JSON"):
        load_preference_rows(str(path))


def test_degenerate_pairs_dropped_and_counted():
    rows = [dolci_instruct_row(i, random.Random(i)) for i in range(5)]
    rows[2]["rejected"] = copy.deepcopy(rows[2]["chosen"])
    out, report = normalize_rows(rows)
    assert len(out) == 4 and report.degenerate_pairs_dropped == 1
    out, report = normalize_rows(rows, keep_degenerate_pairs=True)
    assert len(out) == 5 and report.degenerate_pairs_kept == 1


def test_every_local_format_loads_the_same_rows(tmp_path):
    rows = [dolci_think_row(i, random.Random(i)) for i in range(6)]
    jsonl = write_jsonl(rows, tmp_path / "a" / "rows.jsonl")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    parquet = tmp_path / "p" / "rows.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sources = [jsonl, jsonl.parent, tmp_path / "rows.json", parquet, parquet.parent, tmp_path / "saved"]
    results = []
    for source in sources:
        out = normalize_dataset(load_preference_rows(str(source)), DataReport(source=str(source)))
        results.append([(r["prompt"], r["chosen"], r["rejected"]) for r in out])
    assert all(result == results[0] for result in results)
    assert len(results[0]) == 6


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        load_preference_rows("./no/such/folder")


SFM_EXPECTED = "<|endoftext|><|user|>\nQ?\n<|assistant|>\nA<|endoftext|>"


def test_sfm_chat_template_renders_exactly(tiny_tokenizer):
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == SFM_EXPECTED
    assert tiny_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|endoftext|><|user|>\nQ?\n<|assistant|>\n"
    )
    multi = [
        {"role": "system", "content": "S"},
        *messages,
        {"role": "user", "content": "R"},
        {"role": "assistant", "content": "B"},
    ]
    assert tiny_tokenizer.apply_chat_template(multi, tokenize=False) == (
        "<|endoftext|><|system|>\nS\n<|user|>\nQ?\n<|assistant|>\nA<|endoftext|>\n<|user|>\nR\n<|assistant|>\nB<|endoftext|>"
    )


def test_chatml_template_renders_exactly(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    messages = [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "R"},
        {"role": "assistant", "content": "B"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nR<|im_end|>\n"
        "<|im_start|>assistant\nB<|endoftext|>"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_without_template_names_the_option(tiny_tokenizer):
    import logging

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="--chat_template sfm"):
        resolve_chat_template(tokenizer, None, logging.getLogger("test"))
    resolve_chat_template(tokenizer, "chatml", logging.getLogger("test"))
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_tokenize_pair_splits_prompt_and_completions_exactly(tiny_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    ids = tokenize_pair(row, tiny_tokenizer)
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids["prompt_ids"] == encode("<|endoftext|><|user|>\nQ?\n<|assistant|>\n")
    assert ids["chosen_ids"] == encode("yes") + [0]
    assert ids["rejected_ids"] == encode("no") + [0]
    assert ids["prompt_ids"][0] == 0  # bos


def test_eos_is_in_the_loss_although_pad_equals_eos(tiny_tokenizer):
    """bos = eos = pad = 0: a mask derived from the pad id would drop every eos (and bos) from the loss."""
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == 0
    rows = [
        tokenize_pair(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            },
            tiny_tokenizer,
        )
        for q, c, r in [("Q?", "yes", "no"), ("a longer question here?", "good", "bad answer")]
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(rows)
    for i, row in enumerate(rows):
        n_prompt, n_chosen = len(row["prompt_ids"]), len(row["chosen_ids"])
        mask = batch["completion_mask"][i]
        assert (
            mask[n_prompt + n_chosen - 1] == 1 and batch["input_ids"][i, n_prompt + n_chosen - 1] == 0
        )  # eos counted
        assert mask.sum() == n_chosen
        assert batch["attention_mask"][i, 0] == 1 and batch["input_ids"][i, 0] == 0  # bos attended
    assert torch.equal(
        batch["completion_mask"].sum(1),
        torch.tensor([len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]),
    )


def test_truncation_keeps_prompt_end_and_limits_pairs():
    ids = {"prompt_ids": list(range(10)), "chosen_ids": [100] * 8, "rejected_ids": [200] * 3}
    out = truncate_pair(ids, max_length=12, max_prompt_length=6, overlong_policy="truncate")
    assert out["prompt_ids"] == [4, 5, 6, 7, 8, 9] and out["prompt_truncated"]
    assert out["chosen_ids"] == [100] * 6 and out["rejected_ids"] == [200] * 3 and out["pair_truncated"]
    assert not out["drop"]
    out = truncate_pair(ids, max_length=12, max_prompt_length=6, overlong_policy="drop")
    assert out["drop"] and out["drop_overlong"] and not out["pair_truncated"]
    out = truncate_pair(ids, max_length=30, max_prompt_length=None, overlong_policy="truncate")
    assert out["prompt_ids"] == list(range(10)) and not (
        out["prompt_truncated"] or out["pair_truncated"] or out["drop"]
    )


def test_prepare_dataset_reports_counts(demo_assets, tiny_tokenizer):
    script_args = SimpleNamespace(
        dataset_name=str(demo_assets["think"]), dataset_config=None, dataset_train_split="train", max_train_samples=64,
        skip_invalid_rows=False, keep_degenerate_pairs=False, max_prompt_length=20, overlong_policy="drop",
    )  # fmt: skip
    training_args = SimpleNamespace(dataset_num_proc=None, max_length=80)
    dataset, report = prepare_dataset(script_args, training_args, tiny_tokenizer)
    # Independent count from the raw token lengths the data step recorded.
    raw = [json.loads(line) for line in open(demo_assets["think"])][:64]
    full = [
        tokenize_pair(
            {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}, tiny_tokenizer
        )
        for r in raw
    ]
    prompt_lengths = [min(len(f["prompt_ids"]), 20) for f in full]
    overlong = [p + max(len(f["chosen_ids"]), len(f["rejected_ids"])) > 80 for p, f in zip(prompt_lengths, full)]
    assert report.rows_read == 64
    assert report.prompts_truncated == sum(len(f["prompt_ids"]) > 20 for f in full)
    assert report.pairs_dropped_overlong == sum(overlong) > 0
    assert report.pairs_used == len(dataset) == 64 - sum(overlong)
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 80 for r in dataset)


def test_an_edited_file_is_read_again(tmp_path):
    path = tmp_path / "rows.jsonl"
    for n in (3, 5, 2):
        write_jsonl([dolci_think_row(i, random.Random(i)) for i in range(n)], path)
        assert len(load_preference_rows(str(path))) == n
