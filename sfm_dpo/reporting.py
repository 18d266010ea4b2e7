"""The end-of-run summary: what was trained, on what, how fast, and whether the preference was learned.

Saved as `run_summary.json` in the output folder (tests and sweeps read it) and logged as text."""

import json
from pathlib import Path

WATCHED = ("loss", "rewards/accuracies", "rewards/margins", "rewards_norm/accuracies", "rewards_norm/margins")
# The held-out split (sfm_dpo.evaluation), evaluated every eval_steps and after the last step.
WATCHED_EVAL = tuple(f"eval_{key}" for key in WATCHED + ("logratios/chosen", "logratios/rejected"))


def first_and_last(log_history: list[dict], key: str) -> tuple[float, float] | None:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else None


def deepspeed_stage(trainer) -> int | None:
    """The ZeRO stage of the engine really used (None without DeepSpeed): `ACCELERATE_USE_CPU=true` silently turns
    DeepSpeed off, so we report what ran, not what was configured."""
    engine = trainer.model_wrapped
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None


def run_summary(trainer, train_result, output_dir: str) -> dict:
    metrics = train_result.metrics
    return {
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "world_size": trainer.args.world_size,
        "deepspeed_zero_stage": deepspeed_stage(trainer),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "train_runtime_s": metrics.get("train_runtime"),
        "first_and_last": {k: pair for k in WATCHED if (pair := first_and_last(trainer.state.log_history, k))},
        "held_out_pairs": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "held_out": {k: pair for k in WATCHED_EVAL if (pair := first_and_last(trainer.state.log_history, k))},
        "output_dir": str(output_dir),
    }


def summary_from_checkpoint(checkpoint: str, output_dir: str) -> dict:
    """The summary of a run whose training ended in an earlier launch that did not get to its final save (preempted at
    the last step, killed while saving): from the final checkpoint's trainer_state.json. That launch's speed and
    engine are not recorded there, so they are None."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    history = state.get("log_history", [])
    return {
        "global_step": state["global_step"],
        "max_steps": state.get("max_steps"),
        "world_size": None,
        "deepspeed_zero_stage": None,
        "train_samples_per_second": None,
        "train_runtime_s": None,
        "first_and_last": {k: pair for k in WATCHED if (pair := first_and_last(history, k))},
        "held_out_pairs": None,
        "held_out": {k: pair for k in WATCHED_EVAL if (pair := first_and_last(history, k))},
        "output_dir": str(output_dir),
        "final_model_from": str(checkpoint),
    }


def summary_text(summary: dict) -> str:
    stage = summary["deepspeed_zero_stage"]
    if summary.get("final_model_from"):
        engine = f"training ended in an earlier launch; final model from {summary['final_model_from']}"
    else:
        engine = f"{summary['world_size']}, " + (f"DeepSpeed ZeRO-{stage}" if stage is not None else "no DeepSpeed")
    lines = [
        "Training finished.",
        f"  steps: {summary['global_step']} of {summary['max_steps']}",
        f"  processes: {engine}",
        f"  samples/s: {summary['train_samples_per_second']}, runtime: {summary['train_runtime_s']} s",
    ]
    for key, (first, last) in summary["first_and_last"].items():
        lines.append(f"  {key}: first logged {first:.4f} -> last logged {last:.4f}")
    if summary.get("held_out"):
        count = summary.get("held_out_pairs")  # None when summarized from a checkpoint
        lines.append(f"  held-out pairs{f': {count}' if count else ''} (eval_split.json), evaluated:")
        for key, (first, last) in summary["held_out"].items():
            lines.append(f"    {key}: first {first:.4f} -> last {last:.4f}")
    lines.append(f"  model saved to: {summary['output_dir']}")
    return "\n".join(lines)


def save_summary(summary: dict, output_dir: str) -> Path:
    path = Path(output_dir) / "run_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
