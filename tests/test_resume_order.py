"""Resuming trains exactly the pairs of an uninterrupted run, and the start-of-training reference check, under the
real stack: `accelerate launch` (2 processes, gloo) -> DeepSpeed ZeRO-2 -> FastDPOTrainer with a cached reference.

One launch runs, on both ranks: (a) 2 epochs of 3 steps from scratch, checkpoint at step 4 (one step into epoch 1),
and (b) the same settings resumed from that checkpoint. Every micro-batch's pair ids are recorded per rank (a row's
id is the first token of its prompt). The test then resumes the same checkpoint in this process (1 rank, max_steps 5:
both changes keep the pairs of each step), and with another seed (the plan record stops it).

Run as a script (`accelerate launch ... tests/test_resume_order.py OUT`) it is the 2-process worker.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from sfm_dpo.attention import apply_backend
from sfm_dpo.fast_trainer import FastDPOTrainer
from sfm_dpo.packing import reference_logps_fn
from sfm_dpo.tiny import build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
N_ROWS, PAIRS_PER_STEP = 24, 8  # 3 steps per epoch
CACHE = "cached-reference-folder"  # FastDPOTrainer only names it in its check's messages


def make_rows() -> list[dict]:
    """Rows whose prompt starts with the row id + 1 (ids 1..24, in the vocabulary), lengths varied by the id."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(30, VOCAB, (n,), generator=g).tolist()

    return [
        dict(prompt_ids=[i + 1] + ids(1 + i % 5), chosen_ids=ids(2 + (7 * i) % 11), rejected_ids=ids(1 + (5 * i) % 9))
        for i in range(N_ROWS)
    ]


def with_reference(rows: list[dict]) -> list[dict]:
    """The reference log-probs of the model every run starts from, as the reference cache would hold them."""
    model = build_tiny_model("llama", VOCAB, seed=1)
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    chosen, rejected = reference_logps_fn(model, "cpu", max_tokens=400)(rows)
    return [dict(r, ref_chosen_logps=float(c), ref_rejected_logps=float(j)) for r, c, j in zip(rows, chosen, rejected)]


class RecordingTrainer(FastDPOTrainer):
    """Records `(global step, [pair ids])` of every training micro-batch; fillers (weight 0) left out."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        firsts = inputs["input_ids"][0][inputs["cu_seq_lens"][:-1:2].long()] - 1  # first token of each chosen seq
        real = inputs["pair_weights"] > 0
        self.recorded.append((self.state.global_step, sorted(firsts[real].tolist())))
        return super().training_step(model, inputs, num_items_in_batch)


def build(out: Path, rows: list[dict], **overrides) -> RecordingTrainer:
    settings = dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", beta=5.0, loss_type=["sigmoid_norm"],
        per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=None, seed=0, logging_steps=1,
        disable_tqdm=True, padding_free=True, precompute_ref_log_probs=True, num_train_epochs=2, optim="sgd",
        learning_rate=2.0, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="steps", save_steps=4,
    )  # fmt: skip
    settings.update(overrides)
    trainer = RecordingTrainer(
        model=build_tiny_model("llama", VOCAB, seed=1), args=DPOConfig(**settings), train_dataset=Dataset.from_list(rows),
        processing_class=build_tiny_tokenizer(vocab_size=VOCAB), attn_backend="sdpa", max_tokens_per_microbatch=60,
        pairs_per_step=PAIRS_PER_STEP, reference_cache=CACHE,
    )  # fmt: skip
    trainer.recorded = []
    return trainer


def per_step(recorded) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for step, ids in recorded:
        steps.setdefault(step + 1, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


def _worker(out: Path) -> None:
    rank0 = os.environ.get("RANK", "0") == "0"  # only rank 0 talks, as in train_dpo.py
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING, stream=sys.stdout, format="%(name)s: %(message)s"
    )
    rows = with_reference(make_rows())
    uninterrupted = build(out / "a", rows)
    uninterrupted.train()
    rank = uninterrupted.accelerator.process_index
    resumed = build(out / "b", rows)
    resumed.train(resume_from_checkpoint=str(out / "a" / "checkpoint-4"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": uninterrupted.accelerator.num_processes,
        "engine": type(uninterrupted.model_wrapped).__name__,
        "zero_stage": uninterrupted.model_wrapped.zero_optimization_stage(),
        "uninterrupted": uninterrupted.recorded, "resumed": resumed.recorded,
        "resumed_epoch": resumed.batch_sampler.epoch, "final_step": resumed.state.global_step,
    }))  # fmt: skip


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_resume_mid_epoch_trains_the_pairs_of_an_uninterrupted_run(tmp_path, caplog):
    ds_config = json.loads((REPO / "ds_config.json").read_text())
    ds_config["zero_allow_untested_optimizer"] = True  # plain SGD
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_config.yaml"),
           "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(port),
           "--deepspeed_config_file", str(tmp_path / "ds.json"), __file__, str(tmp_path)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"2-process launch: {time.monotonic() - started:.0f} s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 and r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == 2 for r in ranks)

    # The uninterrupted run: each epoch trains every pair exactly once, and epoch 1 is another order than epoch 0.
    steps = per_step([m for r in ranks for m in r["uninterrupted"]])
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for epoch in (0, 1):
        assert sorted(i for s in (1, 2, 3) for i in steps[3 * epoch + s]) == list(range(N_ROWS))
    assert [steps[s] for s in (5, 6)] != [steps[s] for s in (2, 3)]

    # Resumed at step 4 (one step into epoch 1): the very micro-batches of steps 5 and 6, on each rank.
    for r in ranks:
        assert r["final_step"] == 6 and r["resumed_epoch"] == 1
        assert r["resumed"] == [m for m in r["uninterrupted"] if m[0] >= 4]
        assert r["resumed"]  # the resumed run trained something

    # The reference check ran on the fresh start (both ranks' first micro-batch, fp32: no rounding beyond 1e-6 per
    # token) and not on the resume, whose policy has moved away from the reference (lr 2).
    checks = [line for line in proc.stdout.splitlines() if "reproduces the cached reference" in line]
    assert len(checks) == 1 and CACHE in checks[0], proc.stdout[-3000:]
    assert float(checks[0].split("max difference ")[1].split()[0]) < 1e-5
    assert "Reference cache check skipped: resuming at step 4" in proc.stdout

    # Same checkpoint, one process and max_steps 5: the pairs of each step do not depend on the world size, the record
    # stays silent and step 5 trains step 5's pairs.
    rows = with_reference(make_rows())
    with caplog.at_level("WARNING"):
        single = build(tmp_path / "c", rows, max_steps=5)
        single.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert not [r for r in caplog.records if "plan" in r.getMessage()], caplog.text
    assert per_step(single.recorded) == {5: steps[5]}

    # Another seed: other pairs in the rest of epoch 1, so the resume stops and says why.
    other = build(tmp_path / "d", rows, seed=1)
    with pytest.raises(ValueError, match=r"Resuming at step 4 .*from step 5 on \(epoch 1\)") as stop:
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert "seed" in str(stop.value) and not other.recorded
