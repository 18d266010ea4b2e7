"""The real thing on the CPU: scripts/launch.sh -> accelerate launch (2 processes) -> DeepSpeed ZeRO-2 -> train_dpo.py,
in bf16 as on the GPUs (the Trainer casts floating inputs to the DeepSpeed dtype: it once rounded the cached reference
log-probs to bf16, and step 1 was 0.6877 here, 0.7186 at 6.86B on H100s, instead of ln 2).

One run trains, checkpoints, saves and then fails its Hub push (the Hub is offline here): the local model stays and the
exit code says so. A second run resumes from the newest complete checkpoint. Fake secrets are in the environment
the whole time and must appear in no log and no file (trl test_dpo_trainer::test_train, torchtune recipe tests).
"""

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

SECRETS = {"HF_TOKEN": "hf_TESTSECRETtoken123456", "WANDB_API_KEY": "wandbTESTSECRETkey987654"}


def launch(demo_assets, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **SECRETS, "HF_HUB_OFFLINE": "1", "CPU_PROCESSES": "2"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    cmd = [
        "bash", "scripts/launch.sh", "demo",
        "--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(demo_assets["think"]),
        "--output_dir", str(output_dir), "--max_train_samples", "96", "--save_steps", "3",
        "--bf16", "true", "--dtype", "bfloat16", "--dataloader_num_workers", "2", *extra,  # as the GPU recipes
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(demo_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("e2e") / "run"
    result = launch(
        demo_assets, output_dir, "--max_steps", "6", "--push_to_hub", "true", "--hub_model_id", "test-org/tiny-DPO"
    )
    return output_dir, result


def test_trains_under_deepspeed_zero2_and_saves(first_run, demo_assets):
    output_dir, result = first_run
    log = result.stdout + result.stderr
    summary = __import__("json").loads((output_dir / "run_summary.json").read_text())
    assert summary["deepspeed_zero_stage"] == 2, log[-3000:]
    assert summary["world_size"] == 2
    assert summary["global_step"] == 6
    # The fast path's cached reference log-probs equal the training forward's: the policy starts as the reference, so
    # the first logged loss (steps 1-2; the warm-up's first step has learning rate 0) is ln 2 and the margins 0.
    first_loss, last_loss = summary["first_and_last"]["loss"]
    assert first_loss == pytest.approx(math.log(2), abs=1e-4)
    assert summary["first_and_last"]["rewards_norm/margins"][0] == pytest.approx(0.0, abs=1e-4)
    assert last_loss < first_loss
    for name in (
        "model.safetensors",
        "tokenizer_config.json",
        "run_config.yaml",
        "data_report.json",
        "trainer_state.json",
    ):
        assert (output_dir / name).exists(), name
    assert (output_dir / "checkpoint-6" / "COMPLETE").exists()
    before = load_file(demo_assets["model"] / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "training did not change the parameters"


def test_failed_push_keeps_the_model_and_fails_the_run(first_run):
    output_dir, result = first_run
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Push to test-org/tiny-DPO failed" in log
    assert f"The model is saved in {output_dir}" in log
    assert (output_dir / "model.safetensors").exists()


def test_no_secret_in_any_log_or_file(first_run):
    output_dir, result = first_run
    texts = [result.stdout, result.stderr]
    texts += [
        p.read_text(errors="ignore") for p in output_dir.rglob("*") if p.is_file() and p.suffix != ".safetensors"
    ]
    assert len(texts) > 5
    for value in SECRETS.values():
        assert not any(value in text for text in texts), value


def test_resumes_from_the_newest_complete_checkpoint(first_run, demo_assets):
    output_dir, _ = first_run
    result = launch(demo_assets, output_dir, "--max_steps", "8")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"Resuming from {output_dir}/checkpoint-6" in log
    summary = __import__("json").loads((output_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 8


def test_a_finished_run_is_not_trained_again(first_run, demo_assets):
    """Rerunning the finished run (as a Slurm requeue after the last step would) trains nothing: the Trainer would
    resume the newest checkpoint (6) and train steps 7 and 8 again, or run step 9 of 8 from a checkpoint-8,
    overwriting the final model either way."""
    output_dir, _ = first_run
    assert __import__("json").loads((output_dir / "run_summary.json").read_text())["global_step"] == 8
    final = (output_dir / "model.safetensors").stat().st_mtime_ns
    result = launch(demo_assets, output_dir, "--max_steps", "8", "--save_steps", "4")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "is at the last step of this training: nothing to train" in log
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == final
    assert not (output_dir / "checkpoint-9").exists()


def test_compiled_layers_under_gradient_checkpointing(demo_assets, tmp_path):
    """--compile_layers with gradient checkpointing under DeepSpeed (2 processes): the reference pass and the training
    forward run the compiled layers, the checkpoint stays eager around them, and step 1 is ln 2 (float32, so that
    only the kernels could differ)."""
    result = launch(
        demo_assets, tmp_path / "run", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "100",
        "--gradient_checkpointing", "true", "--compile_layers", "true", "--bf16", "false", "--dtype", "float32",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Compiled the forward of 2 decoder layers (GPTNeoXLayer)" in log
    assert "gradient_checkpointing: true" in (tmp_path / "run" / "run_config.yaml").read_text()
    summary = __import__("json").loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == 3
    first_loss, last_loss = summary["first_and_last"]["loss"]  # steps 1 and 3 (step 1 is the warm-up's, at lr 0)
    assert first_loss == pytest.approx(math.log(2), abs=1e-5)
    assert last_loss < first_loss
