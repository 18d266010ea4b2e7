"""The held-out split and its evaluation on the packed path: which pairs are held out (fixed by content and seed,
recorded, read back on resume), that training never sees them, that every rank's eval plan covers each pair once, and
that the evaluated figures equal a recomputation by hand with a plain unpacked forward."""

import json
import logging
import math
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig

from sfm_dpo.data import EVAL_SPLIT_FILE, EvalSplit, pair_id, prepare_dataset, split_for_eval
from sfm_dpo.evaluation import plan_eval
from sfm_dpo.fast_trainer import FastDPOTrainer
from sfm_dpo.packing import pair_tokens
from sfm_dpo.tiny import build_tiny_model, build_tiny_tokenizer

VOCAB = 512


def data_args(source, **overrides):
    settings = dict(
        dataset_name=str(source), dataset_config=None, dataset_train_split="train", max_train_samples=None,
        skip_invalid_rows=False, keep_degenerate_pairs=False, max_prompt_length=64, overlong_policy="drop",
        eval_split_ratio=0.2, eval_split_seed=None,
    )  # fmt: skip
    settings.update(overrides)
    return SimpleNamespace(**settings)


def run_args(output_dir, **overrides):
    return SimpleNamespace(**{"dataset_num_proc": None, "max_length": 256, "seed": 42, "output_dir": str(output_dir),
                              **overrides})  # fmt: skip


def prepared_split(source, tokenizer, output_dir, data=None, run=None):
    args, training = data_args(source, **(data or {})), run_args(output_dir, **(run or {}))
    dataset, report = prepare_dataset(args, training, tokenizer)
    train, held_out, split = split_for_eval(dataset, args, training, report)
    return train, held_out, split, report


def test_split_is_fixed_by_pair_content_and_seed(demo_assets, tiny_tokenizer, tmp_path):
    """Same data and seed: the same held-out pairs whatever filters other settings apply or the row order; another
    seed draws others. The ratio is met approximately (a hash per pair), never by rows of the training side."""
    train, held_out, split, report = prepared_split(demo_assets["think"], tiny_tokenizer, tmp_path / "a")
    ids = set(held_out["pair_id"])
    assert set(train["pair_id"]).isdisjoint(ids)
    assert len(train) + len(held_out) == report.pairs_used and report.pairs_held_out_for_eval == len(held_out)
    assert 0.1 < len(held_out) / report.pairs_used < 0.3
    assert split.pair_ids == sorted(ids) and split.eval_pairs == len(held_out)

    # Another max_length drops other (overlong) pairs: the held-out pairs both runs keep are the same.
    train_b, held_out_b, _, report_b = prepared_split(
        demo_assets["think"], tiny_tokenizer, tmp_path / "b", run={"max_length": 150}
    )
    assert report_b.pairs_dropped_overlong > report.pairs_dropped_overlong  # a real difference in filtering
    kept_b = set(train_b["pair_id"]) | set(held_out_b["pair_id"])
    assert set(held_out_b["pair_id"]) == ids & kept_b

    # The rows in another order (a shuffled copy of the file): the same split.
    rows = (tmp_path / "rows.jsonl").open("w")
    lines = open(demo_assets["think"]).read().splitlines()
    random.Random(0).shuffle(lines)
    rows.write("\n".join(lines) + "\n")
    rows.close()
    _, held_out_c, _, _ = prepared_split(tmp_path / "rows.jsonl", tiny_tokenizer, tmp_path / "c")
    assert set(held_out_c["pair_id"]) == ids

    _, held_out_d, _, _ = prepared_split(
        demo_assets["think"], tiny_tokenizer, tmp_path / "d", data={"eval_split_seed": 7}
    )
    assert set(held_out_d["pair_id"]) != ids


def test_pair_id_is_the_normalized_content():
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    assert pair_id(pair) == pair_id(json.loads(json.dumps(pair)))
    assert pair_id(pair) != pair_id({**pair, "rejected": [{"role": "assistant", "content": "c"}]})
    assert pair_id(pair) != pair_id({**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]})


def test_resume_reads_the_recorded_split(demo_assets, tiny_tokenizer, tmp_path, caplog):
    """The record in the output folder wins over the settings (a resumed run holds out what the first held out), and a
    change of settings or data is said."""
    output_dir = tmp_path / "run"
    _, held_out, split, _ = prepared_split(demo_assets["think"], tiny_tokenizer, output_dir)
    split.save(output_dir)
    recorded = json.loads((output_dir / EVAL_SPLIT_FILE).read_text())
    assert recorded["pair_ids"] == sorted(set(held_out["pair_id"])) and recorded["seed"] == 42

    with caplog.at_level(logging.WARNING, logger="sfm_dpo.data"):
        train, again, split_again, _ = prepared_split(
            demo_assets["think"], tiny_tokenizer, output_dir, data={"eval_split_ratio": 0.5}
        )
    assert set(again["pair_id"]) == set(held_out["pair_id"]) and split_again == EvalSplit.load(output_dir)
    assert "ratio 0.2 -> now 0.5" in caplog.text and "it is kept" in caplog.text
    assert "data changed" not in caplog.text

    # Fewer rows (the data changed): the recorded pairs still present stay held out, the loss is said.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sfm_dpo.data"):
        train, fewer, _, _ = prepared_split(
            demo_assets["think"], tiny_tokenizer, output_dir, data={"max_train_samples": 128}
        )
    assert set(fewer["pair_id"]) < set(held_out["pair_id"]) and set(train["pair_id"]).isdisjoint(held_out["pair_id"])
    missing = len(set(held_out["pair_id"])) - len(set(fewer["pair_id"]))
    assert (
        f"The data changed since the held-out split in {output_dir / EVAL_SPLIT_FILE} was recorded: {missing} of"
        in (caplog.text)
    )


def test_an_empty_split_fails_with_the_setting_to_change(demo_assets, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="raise --eval_split_ratio"):
        prepared_split(demo_assets["think"], tiny_tokenizer, tmp_path, data={"eval_split_ratio": 1e-9})


@pytest.mark.parametrize("world_size,budget", [(1, 300), (2, 300), (3, None), (4, 10_000)])
def test_eval_plan_covers_every_pair_once_on_equal_micro_batch_counts(world_size, budget):
    rng = random.Random(world_size)
    tokens = [rng.randint(20, 280) for _ in range(23)]
    plan = plan_eval(tokens, world_size, max_tokens_per_microbatch=budget, pairs_per_microbatch=None if budget else 2)
    assert len(plan) == world_size and len({len(rank) for rank in plan}) == 1
    real = [row for rank in plan for b in rank for row, weight in b if weight > 0]
    assert sorted(real) == list(range(23))
    for rank in plan:
        for b in rank:
            if budget and len(b) > 1:
                assert sum(tokens[row] for row, _ in b) <= budget
            assert budget or len(b) <= 2
    loads = [sum(tokens[row] for b in rank for row, w in b if w > 0) for rank in plan]
    assert max(loads) - min(loads) <= max(tokens)  # balanced to within one pair


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [dict(prompt_ids=ids(2, 12), chosen_ids=ids(1, 30), rejected_ids=ids(1, 30), pair_id=f"p{seed}-{i}")
            for i in range(n)]  # fmt: skip


@torch.no_grad()
def plain_logps(model, row: dict) -> tuple[float, float]:
    """Summed completion log-probs of one pair, each sequence alone in an ordinary unpacked forward (no packing, no
    fused head): the independent reference."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([row["prompt_ids"] + row[side]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        logps = F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logps[len(row["prompt_ids"]) - 1 :].sum().item())
    return out[0], out[1]


def test_held_out_metrics_equal_a_recomputation_by_hand(tmp_path):
    """evaluate() on several packed micro-batches against the formula on plain forwards: policy (seed 1) and reference
    (seed 2, precomputed columns as the cache gives them) differ, so margins and accuracies are not trivial. The
    training batches hold none of the eval pairs."""
    beta = 5.0
    policy, reference = build_tiny_model("gpt_neox", VOCAB, seed=1), build_tiny_model("gpt_neox", VOCAB, seed=2)
    policy.eval(), reference.eval()
    train_rows, eval_rows = make_rows(12, seed=0), make_rows(9, seed=1)
    for rows in (train_rows, eval_rows):
        for row in rows:
            row["ref_chosen_logps"], row["ref_rejected_logps"] = plain_logps(reference, row)
    expected_policy = [plain_logps(policy, row) for row in eval_rows]
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", beta=beta, loss_type=["sigmoid_norm"],
        per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=1, max_length=None,
        seed=0, logging_steps=1, save_strategy="no", disable_tqdm=True, padding_free=True,
        precompute_ref_log_probs=True, eval_strategy="no",
    )  # fmt: skip
    budget = 120  # several micro-batches: the loss and metrics must be pair-weighted over all of them
    trainer = FastDPOTrainer(
        model=policy, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows), processing_class=build_tiny_tokenizer(vocab_size=VOCAB),
        attn_backend="sdpa", max_tokens_per_microbatch=budget,
    )  # fmt: skip
    assert len(trainer.get_eval_dataloader()) >= 3
    assert sum(pair_tokens(r) for r in eval_rows) > 3 * budget // 2

    metrics = trainer.evaluate()

    chosen = torch.tensor([c - r["ref_chosen_logps"] for (c, _), r in zip(expected_policy, eval_rows)])
    rejected = torch.tensor([j - r["ref_rejected_logps"] for (_, j), r in zip(expected_policy, eval_rows)])
    n_chosen = torch.tensor([len(r["chosen_ids"]) for r in eval_rows], dtype=torch.float)
    n_rejected = torch.tensor([len(r["rejected_ids"]) for r in eval_rows], dtype=torch.float)
    norm_margin = beta * (chosen / n_chosen - rejected / n_rejected)
    expected = {
        "eval_loss": (-F.logsigmoid(norm_margin)).mean(),
        "eval_rewards/accuracies": (chosen > rejected).float().mean(),
        "eval_rewards/margins": (beta * (chosen - rejected)).mean(),
        "eval_rewards_norm/margins": norm_margin.mean(),
        "eval_rewards_norm/accuracies": (norm_margin > 0).float().mean(),
        "eval_logratios/chosen": chosen.mean(),
        "eval_logratios/rejected": rejected.mean(),
    }
    # Not trivial: tiny random models have small but non-zero margins, and pairs on either side.
    assert abs(expected["eval_rewards/margins"]) > 0.05 and 0 < expected["eval_rewards/accuracies"] < 1
    # fp32: the packed and the plain forward's summed log-probs (~ -90 nats) differ by ~1e-5, times beta.
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value.item(), rel=1e-4, abs=2e-4), key
    assert metrics["eval_pairs"] == len(eval_rows)
    assert trainer.state.log_history[-1]["eval_loss"] == pytest.approx(expected["eval_loss"].item(), rel=1e-4)

    # Training batches: every training row, no eval pair.
    train_ids = {trainer.train_dataset[row]["pair_id"]
                 for b in trainer.batch_sampler for row, weight, _ in b if weight > 0}  # fmt: skip
    assert train_ids == {r["pair_id"] for r in train_rows}
    assert train_ids.isdisjoint({r["pair_id"] for r in eval_rows})
    assert not math.isnan(metrics["eval_loss"])


def test_a_resumed_run_evaluates_each_step_once(tmp_path):
    """With eval_on_start, a run resumed from a checkpoint whose log holds that step's evaluation (eval_steps 2: step
    4, evaluated before checkpoint-4 was saved) does not evaluate it again at its start; one resumed at a step never
    evaluated (checkpoint-3) does. In-process, on the CPU."""
    model = build_tiny_model("gpt_neox", VOCAB, seed=1)
    rows = make_rows(24, seed=0)
    for row in rows:
        row["ref_chosen_logps"], row["ref_rejected_logps"] = plain_logps(model, row)  # policy = reference at step 0

    def train(output_dir, max_steps, resume=None):
        args = DPOConfig(
            output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", beta=5.0,
            loss_type=["sigmoid_norm"], per_device_train_batch_size=2, per_device_eval_batch_size=4,
            gradient_accumulation_steps=1, max_length=None, seed=0, logging_steps=1, disable_tqdm=True,
            padding_free=True, precompute_ref_log_probs=True, max_steps=max_steps, eval_strategy="steps",
            eval_steps=2, eval_on_start=True, save_strategy="steps", save_steps=3, learning_rate=1e-3,
        )  # fmt: skip
        trainer = FastDPOTrainer(
            model=build_tiny_model("gpt_neox", VOCAB, seed=1), args=args,
            train_dataset=datasets.Dataset.from_list(rows[:16]), eval_dataset=datasets.Dataset.from_list(rows[16:]),
            processing_class=build_tiny_tokenizer(vocab_size=VOCAB), attn_backend="sdpa", max_tokens_per_microbatch=200,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]

    first = tmp_path / "first"
    assert train(first, max_steps=4) == [0, 2, 4]
    assert (first / "checkpoint-3").is_dir() and (first / "checkpoint-4").is_dir()
    assert train(tmp_path / "raised", max_steps=6, resume=str(first / "checkpoint-4")) == [0, 2, 4, 6]
    assert train(tmp_path / "again", max_steps=4, resume=str(first / "checkpoint-3")) == [0, 2, 3, 4]
