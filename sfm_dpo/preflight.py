"""Start-up checks that would otherwise fail hours into a run, and the run's provenance (config copy, git SHA)."""

import json
import logging
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import yaml

from .credentials import redact

logger = logging.getLogger(__name__)

GIB = 1024**3


# Bytes per parameter of one checkpoint under DeepSpeed ZeRO-2 with bf16, measured on the real checkpoint of a
# 3,421,696-parameter GPT-NeoX (2 processes, bf16): model.safetensors 6,849,144 B (2.0/param) + DeepSpeed's
# mp_rank_00_model_states.pt 6,859,045 B (2.0, the bf16 module again) + the two ranks' optimizer partitions
# 2 x 20,537,605 B (12.0: fp32 master weights and Adam's two moments) = 16.0 B/param; tests/test_train_e2e.py checks it
# on every run. With save_only_model only the safetensors are written.
CHECKPOINT_BYTES_PER_PARAM = 16
MODEL_BYTES_PER_PARAM = 2


def checkpoint_bytes(n_params: int, save_only_model: bool) -> int:
    return n_params * (MODEL_BYTES_PER_PARAM if save_only_model else CHECKPOINT_BYTES_PER_PARAM)


def count_parameters(model_name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """The model's parameter count from its config alone (no weights read): the model is built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def bytes_on_disk(output_dir: str | Path) -> int:
    """What the run's own files that the coming saves replace already occupy: its checkpoints and final model."""
    root = Path(output_dir)
    if not root.is_dir():
        return 0
    checkpoints = sum(_bytes_under(p) for p in root.glob("checkpoint-*"))
    final = sum(p.stat().st_size for p in root.glob("*.safetensors") if p.is_file())
    return checkpoints + final


def check_disk_space(output_dir: str, n_params: int, save_total_limit: int | None, save_only_model: bool) -> None:
    """Refuses to start when the output filesystem cannot hold the checkpoints kept plus the final model. The run's
    checkpoints and final model already in the folder (a resumed or requeued job) are counted as available: rotation
    and the final save replace them, so a requeue is never refused for the space its own checkpoints take."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    kept = (save_total_limit or 1) + 1  # one more is written before the oldest is deleted
    one = checkpoint_bytes(n_params, save_only_model)
    total = kept * one + MODEL_BYTES_PER_PARAM * n_params
    existing = bytes_on_disk(path)
    needed = max(0, total - existing)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(
            f"{path} has {free / GIB:.1f} GiB free but this run needs about {needed / GIB:.1f} GiB more: {kept} "
            f"checkpoints of {one / GIB:.1f} GiB ({n_params / 1e9:.2f}B parameters x {one // max(n_params, 1)} bytes) "
            f"plus the final model, less the {existing / GIB:.1f} GiB its checkpoints and final model already take. "
            "Free space, lower --save_total_limit, or point --output_dir at a scratch filesystem."
        )
    logger.info(
        "Disk: %.1f GiB free in %s; this run needs about %.1f GiB (%.1f GiB of its own already there).",
        free / GIB, path, needed / GIB, existing / GIB,
    )  # fmt: skip


def git_sha(repo: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo or Path(__file__).parent,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def resolved_config(script_args, training_args, model_args, world_size: int) -> dict:
    return {
        "git_sha": git_sha(),
        "world_size": world_size,
        "script_args": asdict(script_args),
        # TrainingArguments.to_dict() already masks `*_token` fields; `redact` below catches secrets anywhere else.
        "training_args": training_args.to_dict(),
        "model_args": asdict(model_args),
    }


def dump_config(config: dict) -> str:
    return redact(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))


def save_config(config: dict, output_dir: str) -> Path:
    path = Path(output_dir) / "run_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config))
    return path
