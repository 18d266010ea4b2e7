"""Start-up checks: the Hub push is checked before training, W&B mode follows the key, secrets never print, the disk
must hold the checkpoints."""

import logging
import shutil

import pytest

from sfm_dpo.credentials import (
    check_hub_access,
    configure_wandb,
    load_secrets,
    redact,
    refuse_token_arguments,
)
from sfm_dpo.preflight import check_disk_space, checkpoint_bytes, count_parameters, dump_config


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "WANDB_MODE"):
        # setenv first, so that monkeypatch restores the name's original state, absence included: a value that a test
        # loads (load_secrets) must not leak into later tests' environment.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_push_without_token_fails_at_start(clean_env):
    with pytest.raises(ValueError, match="HF_TOKEN is not"):
        check_hub_access("geodesic-research/model-DPO")


@pytest.mark.parametrize("repo_id", ["no owner", "a/b/c", "-bad-/x", "ORG/" + "x" * 200])
def test_invalid_repo_id_fails_at_start(clean_env, repo_id):
    clean_env.setenv("HF_TOKEN", "hf_abcdefgh")
    with pytest.raises(ValueError, match="hub_model_id"):
        check_hub_access(repo_id)


def test_unreachable_hub_only_warns(clean_env, caplog):
    clean_env.setenv("HF_TOKEN", "hf_abcdefgh")
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING):
        check_hub_access("geodesic-research/model-DPO")
    assert "push will be tried at the end" in caplog.text


def test_wandb_mode_follows_the_key(clean_env):
    assert configure_wandb(["none"]) is None
    assert configure_wandb(["wandb"]) == "offline"
    clean_env.delenv("WANDB_MODE")
    clean_env.setenv("WANDB_API_KEY", "k" * 40)
    assert configure_wandb(["wandb"]) == "online"


def test_env_file_loads_without_overriding(clean_env, tmp_path):
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=hf_fromfile123\nWANDB_API_KEY=wandb_fromfile456\n")
    clean_env.setenv("WANDB_API_KEY", "wandb_fromshell789")
    load_secrets(env)
    import os

    assert os.environ["HF_TOKEN"] == "hf_fromfile123"
    assert os.environ["WANDB_API_KEY"] == "wandb_fromshell789"


def test_loading_an_env_file_that_others_can_read_warns_to_chmod_it(clean_env, tmp_path, monkeypatch, caplog):
    """train_dpo.py's own read of .env warns as the launcher's does (one check, credentials.permission_warning),
    naming the file and the fix, never the value."""
    monkeypatch.chdir(tmp_path)
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=hf_fromfile123\n")
    env.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="sfm_dpo.credentials"):
        load_secrets()
    assert "holds HF_TOKEN and is readable by group/others (mode 644): run `chmod 600 .env`" in caplog.text
    assert "hf_fromfile123" not in caplog.text
    caplog.clear()
    env.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="sfm_dpo.credentials"):
        load_secrets()
    assert caplog.text == ""


def test_secrets_are_redacted_from_the_config_dump(clean_env):
    clean_env.setenv("HF_TOKEN", "hf_verysecret")
    text = dump_config({"training_args": {"hub_token": "hf_verysecret", "note": "token hf_verysecret inside"}})
    assert "hf_verysecret" not in text and text.count("<redacted>") == 2
    assert redact("nothing secret") == "nothing secret"


def test_disk_check_refuses_a_run_that_cannot_save(tmp_path):
    with pytest.raises(
        OSError,
        match=r"GiB free but this run needs about .* more: 3 checkpoints of .* GiB \(68600\.00B parameters x 16",
    ):
        check_disk_space(str(tmp_path), n_params=6_860_000_000 * 10_000, save_total_limit=2, save_only_model=False)
    check_disk_space(str(tmp_path), n_params=1000, save_total_limit=2, save_only_model=False)
    # ZeRO-2 + bf16, as measured (sfm_dpo/preflight.py): 2 + 2 bytes of bf16 weights, 12 of fp32 master weights and
    # Adam moments per parameter.
    assert checkpoint_bytes(7_000_000_000, save_only_model=False) == 112_000_000_000
    assert checkpoint_bytes(7_000_000_000, save_only_model=True) == 14_000_000_000


def test_disk_check_credits_the_checkpoints_already_there(tmp_path):
    """A requeued job's own checkpoints are replaced by its next saves: they count as available, or a run that fit
    at its start is refused at its requeue. Sparse files stand for the checkpoints (their size, no disk used)."""
    free = shutil.disk_usage(tmp_path).free
    n_params = int(free / (3 * 16 + 2) * 1.25)  # 2 kept + 1 being written, plus the final model: 25% over what's free
    with pytest.raises(OSError, match="GiB free but this run needs"):
        check_disk_space(str(tmp_path), n_params, save_total_limit=2, save_only_model=False)
    for step in (100, 200):
        shard = tmp_path / f"checkpoint-{step}" / "global_step" / "optim_states.pt"
        shard.parent.mkdir(parents=True)
        with open(shard, "wb") as f:
            f.truncate(16 * n_params)
    check_disk_space(str(tmp_path), n_params, save_total_limit=2, save_only_model=False)


def test_parameter_count_comes_from_the_config_alone(demo_assets):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(demo_assets["model"])
    assert count_parameters(str(demo_assets["model"])) == sum(p.numel() for p in loaded.parameters()) > 10_000


TOKEN = "hf_" + "A1b2C3d4E5" * 3 + "xyzw"


@pytest.mark.parametrize(
    "argv",
    [["--hub_token", TOKEN], [f"--hub_token={TOKEN}"], ["--hub_model_id", TOKEN], ["--learning_rate", "1e-6", TOKEN]],
)
def test_a_token_on_the_command_line_is_refused_unprinted(argv, capsys):
    with pytest.raises(SystemExit) as refused:
        refuse_token_arguments(["--config", "configs/think.yaml", *argv])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "Put HF_TOKEN=... in .env" in err and TOKEN not in err
    refuse_token_arguments(["--config", "configs/think.yaml", "--hub_model_id", "org/name-DPO"])  # no token: passes


def test_the_push_uploads_the_model_tokenizer_card_summaries_and_report_only(tmp_path):
    """The output folder of a real run (2-process ZeRO-2, tests/test_train_e2e.py): the top-level model, tokenizer,
    card, summaries, held-out split and run report with its plots; nothing from the checkpoints, caches or logs."""
    from sfm_dpo.credentials import pushed_files

    folder = [
        "README.md", "chat_template.jinja", "config.json", "data_report.json", "generation_config.json",
        "model.safetensors", "run_config.yaml", "run_summary.json", "tokenizer.json", "tokenizer_config.json",
        "trainer_state.json", "training_args.bin", "run_identity.json", "run_status.json", "run.lock",
        "run_owner.json", "eval_split.json", "report.md", "plots/loss.png", "plots/margins.png",
        "plots/report_data.json", "plots/old/loss.png", "ref_logps/f7019d94/meta.json",
        "ref_logps/f7019d94/ref_logps.npy", "checkpoint-1/COMPLETE", "checkpoint-1/model.safetensors",
        "checkpoint-1/config.json", "checkpoint-1/report.md", "checkpoint-1/global_step1/mp_rank_00_model_states.pt",
        "checkpoint-1/training_args.bin", "checkpoint-1/tokenizer.json", "wandb/run-1/files/config.yaml",
        "runs/events.out", ".model.safetensors.123.tmp",
    ]  # fmt: skip
    for name in folder:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert pushed_files(tmp_path) == sorted([
        "README.md", "chat_template.jinja", "config.json", "data_report.json", "generation_config.json",
        "model.safetensors", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "eval_split.json",
        "report.md", "plots/loss.png", "plots/margins.png", "plots/report_data.json",
    ])  # fmt: skip
