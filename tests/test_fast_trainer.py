"""FastDPOTrainer against stock TRL (SFMDPOTrainer, padded) on the same pairs: loss, gradients, metrics, one
optimizer step with token-budget micro-batches, and step 0's ln 2."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from sfm_dpo.fast_trainer import FastDPOTrainer
from sfm_dpo.packing import pack_pairs
from sfm_dpo.tiny import build_tiny_model
from sfm_dpo.trainer import SFMDPOTrainer

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]


def make_rows(n: int, seed: int = 0, max_completion: int = 24) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [
        dict(prompt_ids=ids(2, 12), chosen_ids=ids(1, max_completion), rejected_ids=ids(1, max_completion))
        for _ in range(n)
    ]


def make_args(tmp_path, **overrides) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", beta=5.0, loss_type=["sigmoid_norm"],
        per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=None, seed=0, logging_steps=1,
        save_strategy="no", disable_tqdm=True, padding_free=True,
    )  # fmt: skip
    settings.update(overrides)
    return DPOConfig(**settings)


def build(trainer_cls, tmp_path, rows, arch="gpt_neox", ref_model=True, **kwargs):
    trainer_kwargs = {k: kwargs.pop(k) for k in ("attn_backend", "max_tokens_per_microbatch", "reference_cache",
                                                 "share_prompt") if k in kwargs}  # fmt: skip
    args = make_args(tmp_path, **kwargs)
    model = build_tiny_model(arch, VOCAB, seed=1)
    ref = build_tiny_model(arch, VOCAB, seed=2) if ref_model else None  # a reference unlike the policy: margins != 0
    from sfm_dpo.tiny import build_tiny_tokenizer

    return trainer_cls(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=build_tiny_tokenizer(vocab_size=VOCAB), **trainer_kwargs,
    )  # fmt: skip


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_to_max(got: torch.Tensor, expected: torch.Tensor, name: str, tolerance: float = 1e-3) -> None:
    """Equal up to `tolerance` x the largest entry. fp32 rounding differs with the batch layout, and beta x summed
    log-ratios amplify it: stock TRL against itself (one padded batch of 6 pairs vs 6 batches of 1) already differs
    by 9e-5 of the largest gradient entry. A wrong scale, pairing or mask is off by O(1)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_loss_and_gradients_match_stock_trl(tmp_path, loss_type):
    rows = make_rows(6, seed=3)
    stock = build(SFMDPOTrainer, tmp_path / "stock", rows, loss_type=[loss_type])
    fast = build(FastDPOTrainer, tmp_path / "fast", rows, loss_type=[loss_type], attn_backend="sdpa")
    assert fast.model.config._attn_implementation == "sfm_sdpa_packed"
    assert stock.model.config._attn_implementation == "sdpa"

    padded = stock.data_collator(rows)
    stock_loss = stock.compute_loss(stock.model, padded)
    stock_loss.backward()
    # Eval mode: the plain mean over the batch's pairs, as TRL's loss.
    fast.model.eval()
    with torch.no_grad():
        fast_eval_loss = fast.compute_loss(fast.model, pack_pairs(rows))
    fast.model.train()
    # Train mode, one micro-batch holding the whole step: world_size / pairs_in_step x sum = the mean.
    fast_loss = fast.compute_loss(fast.model, pack_pairs(rows))
    fast_loss.backward()

    assert stock_loss.item() > 0.1  # policy != reference, so not ln 2: a real comparison
    torch.testing.assert_close(fast_loss, stock_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_eval_loss, stock_loss.detach(), rtol=1e-5, atol=1e-6)
    g_stock, g_fast = grads(stock.model), grads(fast.model)
    assert g_stock.keys() == g_fast.keys() and len(g_stock) > 10
    for name in g_stock:
        assert_close_to_max(g_fast[name], g_stock[name], name)

    # Same metrics: TRL's per-batch means equal our pair-weighted means over one batch.
    stock_logs, fast_logs = {}, {}
    stock.log(stock_logs)
    fast.log(fast_logs)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "rewards_norm/chosen", "rewards_norm/margins", "rewards_norm/accuracies",
                "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):  # fmt: skip
        assert fast_logs[key] == pytest.approx(stock_logs[key], rel=1e-4, abs=1e-5), key


def test_step_zero_loss_is_ln2_with_zero_margins(tmp_path):
    """Reference = policy (TRL builds the reference from the policy's weights): loss ln 2, margins 0."""
    rows = make_rows(5, seed=4)
    args = make_args(tmp_path, loss_type=["sigmoid_norm"])
    model = build_tiny_model("olmo3", VOCAB, seed=1)
    ref = build_tiny_model("olmo3", VOCAB, seed=1)
    from sfm_dpo.tiny import build_tiny_tokenizer

    fast = FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=build_tiny_tokenizer(vocab_size=VOCAB), attn_backend="sdpa")  # fmt: skip
    loss = fast.compute_loss(fast.model, pack_pairs(rows))
    logs = {}
    fast.log(logs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rewards_norm/margins"] == pytest.approx(0.0, abs=1e-6)


def test_precomputed_reference_logps_are_read_from_the_batch(tmp_path):
    """With ref columns in the data, no reference forward is needed: same loss as with the reference model."""
    rows = make_rows(4, seed=5)
    with_ref = build(FastDPOTrainer, tmp_path / "a", rows, attn_backend="sdpa")
    ref_logps, _ = __import__("sfm_dpo.packing", fromlist=["packed_forward"]).packed_forward(
        with_ref.ref_model, pack_pairs(rows)
    )
    rows_cached = [dict(r, ref_chosen_logps=float(ref_logps[2 * i]), ref_rejected_logps=float(ref_logps[2 * i + 1]))
                   for i, r in enumerate(rows)]  # fmt: skip
    cached = build(FastDPOTrainer, tmp_path / "b", rows_cached, ref_model=False, attn_backend="sdpa",
                   precompute_ref_log_probs=True)  # fmt: skip
    assert cached.ref_model is None
    expected = with_ref.compute_loss(with_ref.model, pack_pairs(rows))
    got = cached.compute_loss(cached.model, pack_pairs(rows_cached))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_padding_free_false_is_stock_trl(tmp_path):
    """The comparison flag: padding_free=False gives stock TRL's padded collator and loss, attention untouched."""
    rows = make_rows(4, seed=7)
    stock = build(SFMDPOTrainer, tmp_path / "a", rows)
    flagged = build(FastDPOTrainer, tmp_path / "b", rows, padding_free=False)
    assert not flagged.packed and flagged.model.config._attn_implementation == "sdpa"
    batch = flagged.data_collator(rows)
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == 8  # padded, chosen and rejected rows
    torch.testing.assert_close(flagged.compute_loss(flagged.model, batch), stock.compute_loss(stock.model, batch))


def test_unsupported_settings_fail_at_start(tmp_path):
    rows = make_rows(4)
    with pytest.raises(ValueError, match="ipo"):
        build(FastDPOTrainer, tmp_path, rows, loss_type=["ipo"], attn_backend="sdpa")


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_token_budget_step_equals_stock_step(tmp_path):
    """16 pairs = one optimizer step. Stock TRL: 4 pairs x 4 accumulation steps, padded. Fast: token-budget
    micro-batches of uneven pair counts. Plain SGD, so the update is lr x the gradient: equal updates = equal
    gradients. The logged loss is the mean over the 16 pairs in both."""
    rows = make_rows(16, seed=6, max_completion=40)
    common = dict(loss_type=["sigmoid_norm"], optim="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1,
                  lr_scheduler_type="constant", per_device_train_batch_size=4, gradient_accumulation_steps=4)  # fmt: skip
    stock = build(SFMDPOTrainer, tmp_path / "stock", rows, arch="llama", **common)
    fast = build(FastDPOTrainer, tmp_path / "fast", rows, arch="llama", attn_backend="sdpa",
                 max_tokens_per_microbatch=160, **common)  # fmt: skip
    plan = fast.batch_sampler.plan(0)
    sizes = [len(b) for b in plan[0][0]]
    assert len(plan) == 1 and sum(sizes) == 16 and len(set(sizes)) > 1  # one step, uneven micro-batches
    assert fast.args.gradient_accumulation_steps == fast.batch_sampler.microbatches_per_step == len(sizes) != 4

    before = parameters(stock.model)
    assert all(torch.equal(before[n], p) for n, p in parameters(fast.model).items())
    stock_result, fast_result = stock.train(), fast.train()
    assert fast.state.global_step == stock.state.global_step == 1
    assert fast_result.training_loss == pytest.approx(stock_result.training_loss, rel=1e-5)
    after_stock, after_fast = parameters(stock.model), parameters(fast.model)
    moved = 0
    for name in before:
        assert_close_to_max(after_fast[name] - before[name], after_stock[name] - before[name], name)
        moved += int(not torch.equal(after_stock[name], before[name]))
    assert moved > 10


def test_two_rank_zero2_token_budget_step_equals_stock_step(tmp_path):
    """torchrun, 2 ranks, gloo, DeepSpeed ZeRO-2 from a config file as `accelerate launch` passes it (engine asserted
    in the worker), token budget: the accumulation steps the plan needs reach DeepSpeed, and one optimizer step over
    16 pairs (uneven micro-batches on each rank) moves the parameters as one-process stock TRL does."""
    ds_config = json.loads((REPO / "ds_config.json").read_text())
    ds_config["zero_allow_untested_optimizer"] = True  # plain SGD, so that the update is lr x the gradient
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true", "OMP_NUM_THREADS": "1",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json"), "PYTHONPATH": str(REPO)}  # fmt: skip
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path / "fast")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "fast" / "result.json").read_text())
    assert result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 2 and result["world_size"] == 2
    assert result["ds_gradient_accumulation_steps"] == result["microbatches_per_step"] == result["args_accumulation"]
    assert result["microbatches_per_step"] != 2 and result["uneven"]  # 2 = the configured accumulation

    stock = build(SFMDPOTrainer, tmp_path / "stock", make_rows(16, seed=6, max_completion=40), arch="llama",
                  **TWO_RANK_SETTINGS, per_device_train_batch_size=4, gradient_accumulation_steps=4)  # fmt: skip
    before = parameters(stock.model)
    stock_loss = stock.train().training_loss
    assert result["loss"] == pytest.approx(stock_loss, rel=1e-5)
    after_fast = torch.load(tmp_path / "fast" / "params.pt")
    for name, after in parameters(stock.model).items():
        assert_close_to_max(after_fast[name] - before[name], after - before[name], name)


TWO_RANK_SETTINGS = dict(loss_type=["sigmoid_norm"], optim="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1,
                         lr_scheduler_type="constant")  # fmt: skip


def _two_rank_worker(out: Path) -> None:
    # 16 pairs on 2 ranks; the recipe's "4 per device x 2 accumulation x 2 ranks" is replaced by the token budget.
    fast = build(FastDPOTrainer, out, make_rows(16, seed=6, max_completion=40), arch="llama", attn_backend="sdpa",
                 max_tokens_per_microbatch=150, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 **TWO_RANK_SETTINGS)  # fmt: skip
    result = fast.train()
    engine = fast.model_wrapped
    step = fast.batch_sampler.plan(0)[0]
    if fast.accelerator.is_main_process:
        torch.save(parameters(fast.accelerator.unwrap_model(engine)), out / "params.pt")
        (out / "result.json").write_text(json.dumps({
            "engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
            "world_size": fast.accelerator.num_processes, "loss": result.training_loss,
            "ds_gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "args_accumulation": fast.args.gradient_accumulation_steps,
            "microbatches_per_step": fast.batch_sampler.microbatches_per_step,
            "uneven": len({len(b) for bins in step for b in bins}) > 1,
        }))  # fmt: skip


if __name__ == "__main__":
    _two_rank_worker(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()  # left up, gloo's threads can abort the interpreter's exit


def test_resume_checks_the_micro_batch_plan(tmp_path, caplog):
    """Every checkpoint (trainer_state.json) records a digest of each step's pairs. Resuming with the same pairs per
    step is silent, even with another max_steps or token budget (only the split changes); with other pairs in the rest
    of the epoch (here another seed) it stops; a checkpoint written before the record resumes with a warning and
    saves again."""
    rows = make_rows(24, seed=8, max_completion=40)
    settings = dict(attn_backend="sdpa", max_tokens_per_microbatch=160, max_steps=2, save_strategy="steps",
                    save_steps=1, optim="sgd", learning_rate=0.1)  # fmt: skip
    first = build(FastDPOTrainer, tmp_path, rows, **settings)
    first.train()
    checkpoint = tmp_path / "checkpoint-1"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["PackingPlanRecord"]
    assert saved["args"]["step_digests"] == first.batch_sampler.step_digests()

    def resume(**overrides):
        caplog.clear()
        trainer = build(FastDPOTrainer, tmp_path, rows, **{**settings, **overrides})
        trainer.train(resume_from_checkpoint=str(checkpoint))
        assert trainer.state.global_step == trainer.args.max_steps
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    with caplog.at_level("WARNING"):
        assert not any("plan" in m for m in resume())
        assert not any("plan" in m for m in resume(max_steps=3, max_tokens_per_microbatch=100))
        with pytest.raises(ValueError, match=r"Resuming at step 1 .*from step 2 on \(epoch 0\)") as stop:
            resume(seed=1)
        assert "seed" in str(stop.value) and str(tmp_path) in str(stop.value)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        del state["stateful_callbacks"]["PackingPlanRecord"]
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        assert any("no record of its micro-batch plan" in m for m in resume())
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()


def test_plan_record_checks_the_steps_still_to_come_in_the_epoch(tmp_path):
    """Only the steps the resumed run will train in the epoch it resumes in must match: at an epoch boundary the next
    epoch starts from its first step whatever its plan (here the checkpoint's run planned 1 epoch and the resumed
    run, given more max_steps, plans 2), and steps beyond max_steps are not trained."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from sfm_dpo.fast_trainer import PackingPlanRecord
    from sfm_dpo.packing import TokenBudgetBatchSampler

    tokens = [10 + (7 * i) % 23 for i in range(24)]  # 6 steps of 4 pairs per epoch
    one_epoch = TokenBudgetBatchSampler(tokens, 4, 1, seed=0, num_epochs=1, pairs_per_microbatch=2)
    saved = PackingPlanRecord(one_epoch.step_digests()).state()
    args = SimpleNamespace(output_dir=str(tmp_path))

    def resume(sampler, global_step, max_steps):
        state = TrainerState(global_step=global_step, max_steps=max_steps,
                             stateful_callbacks={"PackingPlanRecord": saved})  # fmt: skip
        PackingPlanRecord(sampler.step_digests()).on_train_begin(args, state, None)

    two_epochs = TokenBudgetBatchSampler(tokens, 4, 2, seed=0, num_epochs=2, max_tokens_per_microbatch=40)
    resume(two_epochs, 6, 12)  # epoch boundary: epoch 1 was never planned by the checkpoint's run
    resume(two_epochs, 3, 12)  # mid-epoch 0: the same pairs per step on 2 ranks
    other_seed = TokenBudgetBatchSampler(tokens, 4, 1, seed=1, num_epochs=2, pairs_per_microbatch=2)
    assert other_seed.step_digests()[0][0] != one_epoch.step_digests()[0][0]
    resume(other_seed, 6, 12)
    with pytest.raises(ValueError, match=r"Resuming at step 3 .*from step 4 on \(epoch 0\)"):
        resume(other_seed, 3, 12)
    # Another pairs_per_step: 8 steps of 3; step 6 is mid-epoch for it, so the rest of its epoch 0 would be skipped.
    with pytest.raises(ValueError, match="Resuming at step 6"):
        resume(TokenBudgetBatchSampler(tokens, 3, 1, seed=0, num_epochs=1, pairs_per_microbatch=3), 6, 12)


def cached_rows(rows, reference) -> list[dict]:
    """`rows` with the reference log-probs of `reference` (a tiny model), as the reference cache holds them."""
    from trl.trainer.utils import add_fused_lm_head

    from sfm_dpo.attention import apply_backend
    from sfm_dpo.packing import reference_logps_fn

    add_fused_lm_head(reference)
    apply_backend(reference, "sdpa")
    chosen, rejected = reference_logps_fn(reference, "cpu", max_tokens=200)(rows)
    return [dict(r, ref_chosen_logps=float(c), ref_rejected_logps=float(j)) for r, c, j in zip(rows, chosen, rejected)]


def test_training_checks_the_cached_reference_on_its_first_micro_batch(tmp_path, caplog):
    """A fresh start trains from the weights that made the reference, so the first micro-batch's policy log-probs
    equal the cached ones: a cache of these weights passes (and the difference is logged), a cache made by other
    weights (a stale cache) stops before the first optimizer step, naming the folder."""
    rows = make_rows(12, seed=9, max_completion=30)
    settings = dict(ref_model=False, attn_backend="sdpa", max_tokens_per_microbatch=120, max_steps=1,
                    precompute_ref_log_probs=True, optim="sgd", learning_rate=0.1)  # fmt: skip
    good = build(FastDPOTrainer, tmp_path / "good", cached_rows(rows, build_tiny_model("gpt_neox", VOCAB, seed=1)),
                 reference_cache="/caches/good-folder", **settings)  # fmt: skip
    with caplog.at_level("INFO", logger="sfm_dpo"):
        good.train()
    assert good.state.global_step == 1
    lines = [r.getMessage() for r in caplog.records if "cached reference" in r.getMessage()]
    assert len(lines) == 1 and "/caches/good-folder" in lines[0] and "reproduces" in lines[0], caplog.text
    assert float(lines[0].split("max difference ")[1].split()[0]) < 1e-5  # fp32: rounding only

    stale = build(FastDPOTrainer, tmp_path / "stale", cached_rows(rows, build_tiny_model("gpt_neox", VOCAB, seed=2)),
                  reference_cache="/caches/stale-folder", **settings)  # fmt: skip
    before = parameters(stale.model)
    with pytest.raises(RuntimeError, match="/caches/stale-folder") as stop:
        stale.train()
    assert "--model_revision" in str(stop.value) and "Delete" in str(stop.value)
    assert all(torch.equal(before[n], p) for n, p in parameters(stale.model).items())  # no step taken

    # Without a cache folder (reference columns the caller computed) nothing is checked.
    unnamed = build(FastDPOTrainer, tmp_path / "unnamed",
                    cached_rows(rows, build_tiny_model("gpt_neox", VOCAB, seed=2)), **settings)  # fmt: skip
    unnamed.train()
    assert unnamed.state.global_step == 1


def test_reference_tolerance_follows_the_dtype_and_the_lengths():
    from sfm_dpo.fast_trainer import reference_tolerance

    lengths = torch.tensor([1, 10, 1000])
    assert torch.equal(reference_tolerance(lengths, low_precision=False), 1e-3 * lengths.float())
    assert torch.equal(reference_tolerance(lengths, low_precision=True), 5e-2 * lengths.float())


def test_trl_does_not_hash_the_model_on_the_packed_path(tmp_path, monkeypatch):
    """TRL's DPOTrainer hashes every weight (a CPU copy of the model) for its own reference cache's file name, which
    the packed path does not use; the stock path still does."""
    import trl.trainer.dpo_trainer as dpo_trainer

    calls = []
    real = dpo_trainer.hash_module

    def counting(module):
        calls.append(type(module).__name__)
        return real(module)

    monkeypatch.setattr(dpo_trainer, "hash_module", counting)
    rows = make_rows(4, seed=10)
    cached = cached_rows(rows, build_tiny_model("gpt_neox", VOCAB, seed=1))
    fast = build(FastDPOTrainer, tmp_path / "fast", cached, ref_model=False, attn_backend="sdpa",
                 precompute_ref_log_probs=True)  # fmt: skip
    assert calls == [] and fast.ref_model is None
    assert dpo_trainer.hash_module is counting  # put back after building
    build(SFMDPOTrainer, tmp_path / "stock", rows, ref_model=False, precompute_ref_log_probs=True)
    assert len(calls) == 1


def test_token_count_and_rate_continue_across_a_resume(tmp_path):
    """`num_tokens` (TRL's running count of trained tokens) and `tokens_per_second` of a resumed run continue from the
    checkpoint's: the uninterrupted run's count at the last step, not the count since the resume."""
    rows = make_rows(24, seed=8, max_completion=40)
    settings = dict(attn_backend="sdpa", max_tokens_per_microbatch=160, max_steps=3, save_strategy="steps",
                    save_steps=1, optim="sgd", learning_rate=0.1)  # fmt: skip
    whole = build(FastDPOTrainer, tmp_path / "whole", rows, **settings)
    whole.train()
    counts = [e["num_tokens"] for e in whole.state.log_history if "loss" in e]
    assert counts == sorted(counts) and counts[0] > 0

    resumed = build(FastDPOTrainer, tmp_path / "resumed", rows, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-1"))
    after = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 1]
    assert [e["num_tokens"] for e in after] == counts[1:]
    step_tokens = counts[1] - counts[0]
    assert 0 < after[0]["tokens_per_second"] <= step_tokens / after[0]["step_time_s"] * 1.001
