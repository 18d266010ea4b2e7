"""Start-up checks: the Hub push is checked before training, W&B mode follows the key, secrets never print, the disk
must hold the checkpoints."""

import logging

import pytest

from sfm_dpo.credentials import check_hub_access, configure_wandb, load_secrets, redact
from sfm_dpo.preflight import check_disk_space, checkpoint_bytes, dump_config


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
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


def test_secrets_are_redacted_from_the_config_dump(clean_env):
    clean_env.setenv("HF_TOKEN", "hf_verysecret")
    text = dump_config({"training_args": {"hub_token": "hf_verysecret", "note": "token hf_verysecret inside"}})
    assert "hf_verysecret" not in text and text.count("<redacted>") == 2
    assert redact("nothing secret") == "nothing secret"


def test_disk_check_refuses_a_run_that_cannot_save(tmp_path):
    with pytest.raises(
        OSError, match=r"GiB free but this run needs about .* checkpoints of .* GiB \(68600\.00B parameters\)"
    ):
        check_disk_space(str(tmp_path), n_params=6_860_000_000 * 10_000, save_total_limit=2, save_only_model=False)
    check_disk_space(str(tmp_path), n_params=1000, save_total_limit=2, save_only_model=False)
    # ZeRO-2 + bf16: 2 bytes of weights + 12 of fp32 master weights and Adam moments per parameter.
    assert checkpoint_bytes(7_000_000_000, save_only_model=False) == 98_000_000_000
