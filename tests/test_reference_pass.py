"""The fast path's reference pass as `build_trainer` runs it: one cache shared by the sweep points that train the same
reference on the same tokens, the cache folder handed to the trainer, the training precision, and the start-up
refusals (ZeRO-3, truncation_mode keep_end, a model that drops the packing kwargs). Plus the stock path's reference
model, loaded at the requested revision. In-process on the CPU, tiny models."""

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, ModelConfig

from sfm_dpo import fast_path, ref_cache
from sfm_dpo.config import ScriptArguments, check_recipe

N_ROWS = 12


def token_rows(vocab: int, n_rows: int = N_ROWS, seed: int = 0) -> Dataset:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]

    return Dataset.from_list(
        [{"prompt_ids": ids(2, 8), "chosen_ids": ids(2, 12), "rejected_ids": ids(2, 12)} for _ in range(n_rows)]
    )


def run_args(model_path, output_dir: Path, **training):
    script_args = ScriptArguments(dataset_name="unused", max_tokens_per_microbatch=128, effective_batch_size=4)
    training_args = DPOConfig(
        output_dir=str(output_dir), use_cpu=True, padding_free=True, precompute_ref_log_probs=True, max_length=48,
        per_device_train_batch_size=4, report_to="none", loss_type=["sigmoid"], **training,
    )  # fmt: skip
    model_args = ModelConfig(model_name_or_path=str(model_path))
    return script_args, training_args, model_args


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    return AutoTokenizer.from_pretrained(demo_assets["model"])


def load(demo_assets):
    return AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)


def test_sweep_points_share_one_reference_pass(demo_assets, tokenizer, tmp_path, monkeypatch):
    """Two learning rates, two output folders, other max_length and chat template (the token ids are the same): the
    second run is a cache hit, and the cache lives beside the runs, not inside one."""
    monkeypatch.delenv("SFM_REF_CACHE", raising=False)
    data = token_rows(len(tokenizer))
    counts, trainers = [], []
    for lr, max_length in ((1e-6, 48), (5e-7, 64)):
        model = load(demo_assets)
        counter = ForwardCounter(model)
        args = run_args(demo_assets["model"], tmp_path / "sweep" / f"lr{lr}", learning_rate=lr)
        args[1].max_length = max_length
        tokenizer.chat_template = f"{{{{ 'template for {lr}' }}}}"
        trainers.append(fast_path.build_trainer(model, data, *args, tokenizer, []))
        counts.append(counter.calls)
    assert counts[0] > 0 and counts[1] == 0
    folder = Path(trainers[0].reference_cache)
    assert folder.parent == tmp_path / "sweep" / "ref_cache" and (folder / "meta.json").exists()
    # The trainer is told which folder its reference came from (its start-of-training check names it).
    assert trainers[1].reference_cache == trainers[0].reference_cache
    np.testing.assert_array_equal(trainers[0].train_dataset["ref_chosen_logps"],
                                  trainers[1].train_dataset["ref_chosen_logps"])  # fmt: skip


def test_sfm_ref_cache_names_the_shared_cache(demo_assets, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SFM_REF_CACHE", str(tmp_path / "project_cache"))
    args = run_args(demo_assets["model"], tmp_path / "run")
    assert fast_path.default_ref_cache_dir(args[0], args[1]) == tmp_path / "project_cache"
    args[0].ref_cache_dir = str(tmp_path / "explicit")
    assert fast_path.default_ref_cache_dir(args[0], args[1]) == tmp_path / "explicit"


def test_the_key_holds_only_what_changes_the_values(demo_assets, tokenizer, tmp_path):
    args = run_args(demo_assets["model"], tmp_path / "run")
    key = fast_path.reference_key(model_args=args[2], backend="sdpa", precision="torch.float32", compiled=False,
                                  digest_dir=tmp_path / "digests")  # fmt: skip
    assert set(key) == {"weights", "precision", "attn_backend", "compiled_layers", "forward_version"}
    assert str(demo_assets["model"]) not in str(key)


def test_fp16_reference_pass_runs_under_the_training_autocast():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_path.reference_precision(bf16=False, fp16=True, deepspeed=False, device=cuda) == (None, torch.float16)
    assert fast_path.reference_precision(bf16=True, fp16=False, deepspeed=False, device=cuda) == (None, torch.bfloat16)
    assert fast_path.reference_precision(bf16=False, fp16=True, deepspeed=True, device=cuda) == (torch.float16, None)
    assert fast_path.reference_precision(bf16=True, fp16=False, deepspeed=True, device=cuda) == (torch.bfloat16, None)
    assert fast_path.reference_precision(bf16=False, fp16=False, deepspeed=False, device=cpu) == (None, None)
    # accelerate autocasts bf16 on the CPU too (Accelerator.native_amp), fp16 never there.
    assert fast_path.reference_precision(bf16=True, fp16=False, deepspeed=False, device=cpu) == (None, torch.bfloat16)
    assert fast_path.reference_precision(bf16=False, fp16=True, deepspeed=False, device=cpu) == (None, None)


def test_zero3_is_refused_before_the_pass(demo_assets, tokenizer, tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    model = load(demo_assets)
    counter = ForwardCounter(model)
    args = run_args(demo_assets["model"], tmp_path / "run")
    args[1].deepspeed_plugin = DeepSpeedPlugin(zero_stage=3)  # what TrainingArguments holds under accelerate + ZeRO-3
    with pytest.raises(ValueError, match="ZeRO-3"):
        fast_path.attach_reference_logps(model, token_rows(len(tokenizer)), *args, tokenizer, "sdpa")
    assert counter.calls == 0


def test_truncation_mode_keep_end_is_refused_at_start_up(demo_assets, tmp_path):
    args = run_args(demo_assets["model"], tmp_path / "run")
    args[1].truncation_mode = "keep_end"
    with pytest.raises(ValueError, match="truncation_mode"):
        check_recipe(*args)
    args[1].truncation_mode = "keep_start"
    check_recipe(*args)


def test_a_model_that_drops_the_packing_kwargs_is_refused(demo_assets):
    """A remote-code model whose layers do not pass `cu_seq_lens_q` on would attend across the packed pairs."""
    from trl.trainer.utils import add_fused_lm_head

    from sfm_dpo.attention import apply_backend
    from sfm_dpo.packing import pack_pairs, packed_logps

    model = load(demo_assets).eval()
    add_fused_lm_head(model)
    apply_backend(model, "sdpa")
    for layer in model.gpt_neox.layers:
        forward = layer.attention.forward

        def dropping(*a, _forward=forward, **kw):
            return _forward(*a, **{k: v for k, v in kw.items() if not k.startswith(("cu_seq_lens", "max_length"))})

        layer.attention.forward = dropping
    rows = list(token_rows(64, n_rows=3))
    with pytest.raises(ValueError, match="cu_seq_lens"), torch.no_grad():
        packed_logps(model, pack_pairs(rows))


def test_stock_path_loads_the_reference_at_the_requested_revision(demo_assets, tokenizer, tmp_path, monkeypatch):
    """--padding_free false keeps TRL's reference model, which TRL loads from the policy's name: at the requested
    revision, not at main."""
    import huggingface_hub.constants

    from tests.test_model_identity import write_hub_snapshot

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    model = load(demo_assets)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    model.save_pretrained(v1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.save_pretrained(v2)
    files = lambda d: {n: d / n for n in ("config.json", "model.safetensors")}  # noqa: E731
    write_hub_snapshot(hub, "org/tiny-sft", "1" * 40, files(v1), revision="v1")
    write_hub_snapshot(hub, "org/tiny-sft", "2" * 40, files(v2), revision="main")

    policy = AutoModelForCausalLM.from_pretrained("org/tiny-sft", revision="v1", dtype=torch.float32)
    script_args, training_args, model_args = run_args("org/tiny-sft", tmp_path / "run")
    training_args.padding_free, training_args.precompute_ref_log_probs = False, False
    model_args.model_revision = "v1"
    trainer = fast_path.build_trainer(policy, token_rows(len(tokenizer)), script_args, training_args, model_args,
                                      tokenizer, [])  # fmt: skip
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    for (name, a), b in zip(policy.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_preempted_reference_pass_raises_and_the_next_run_finishes_it(demo_assets, tokenizer, tmp_path, caplog):
    """A signal during the pass: the finished chunks are kept and `Preempted` is raised; the requeued run
    computes only the rest, and the values equal those of one uninterrupted pass."""
    from sfm_dpo.preemption import Preempted

    data = token_rows(len(tokenizer))
    args = run_args(demo_assets["model"], tmp_path / "run")
    args[0].ref_tokens_per_batch = 64  # several batches
    args[0].ref_cache_dir = str(tmp_path / "cache")
    model = load(demo_assets)
    counter = ForwardCounter(model)
    with pytest.raises(Preempted, match="reference pass"):
        fast_path.build_trainer(model, data, *args, tokenizer, [], should_stop=lambda: counter.calls >= 2)
    assert list((tmp_path / "cache").glob("*/chunks/*.npz"))

    model = load(demo_assets)
    resumed = ForwardCounter(model)
    with caplog.at_level(logging.INFO, logger="sfm_dpo"):
        trainer = fast_path.build_trainer(model, data, *args, tokenizer, [])
    assert re.search(r"[1-9]\d* of \d+ rows already computed", caplog.text), caplog.text

    args[0].ref_cache_dir = str(tmp_path / "uninterrupted")
    model = load(demo_assets)
    whole = ForwardCounter(model)
    reference = fast_path.build_trainer(model, data, *args, tokenizer, []).train_dataset
    assert 0 < resumed.calls < whole.calls
    for column in ref_cache.COLUMNS:
        np.testing.assert_allclose(trainer.train_dataset[column], reference[column], rtol=1e-6, atol=1e-5)
    assert not list((tmp_path / "cache").glob("*/chunks/*"))  # the chunks are gone once the cache is whole
