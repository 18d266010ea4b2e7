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


def checkpoint_bytes(n_params: int, save_only_model: bool) -> int:
    """One checkpoint under ZeRO-2 with bf16: bf16 weights (2 B/param) plus, unless save_only_model, the fp32 master
    weights and Adam's two moments (12 B/param) that resume needs."""
    return n_params * (2 if save_only_model else 14)


def check_disk_space(output_dir: str, n_params: int, save_total_limit: int | None, save_only_model: bool) -> None:
    """Refuses to start when the output filesystem cannot hold the checkpoints kept plus the final model."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    kept = (save_total_limit or 1) + 1  # one more is written before the oldest is deleted
    needed = kept * checkpoint_bytes(n_params, save_only_model) + 2 * n_params
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(
            f"{path} has {free / GIB:.1f} GiB free but this run needs about {needed / GIB:.1f} GiB: {kept} checkpoints "
            f"of {checkpoint_bytes(n_params, save_only_model) / GIB:.1f} GiB ({n_params / 1e9:.2f}B parameters) plus "
            "the final model. Free space, lower --save_total_limit, or point --output_dir at a scratch filesystem."
        )
    logger.info("Disk: %.1f GiB free in %s, about %.1f GiB needed.", free / GIB, path, needed / GIB)


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
