"""How a launch ended, and which of a run's closing stages are done, in `<output_dir>/run_status.json`.

Rank 0 writes `{"state", "stage", "message", "stages", ...}` when a stage starts ("running") and at the end of every
launch that owns the folder: "done" (the final model saved, and pushed when asked), "failed" (the stage that raised and
its error) or "preempted". scripts/launch.sh reads it (sfm_dpo/launcher.py): DONE only for "done" with exit code 0. A
launch refused because another run or a live job holds the folder writes nothing there: the file is that run's.

The closing stages of a run whose training is done, each recorded in `stages` with the step it was done at:
- "save": the final model, tokenizer and trainer state in output_dir (from the trainer, or copied from the final
  checkpoint when the save of an earlier launch never happened: a preemption at the last step, a kill during it);
- "summary": run_summary.json;
- "push": the upload to the Hub, with the repo and commit.
A stage recorded at an older step is not done (a raised --max_steps trained further). So a launch of a run whose
training is done but whose save, summary or push is not, trains nothing and completes them; a failed push is retried
by running the same command again.
"""

import json
import logging
import os
import shutil
import time
from fnmatch import fnmatch
from pathlib import Path

from .durable import atomic_write, fsync_tree

logger = logging.getLogger(__name__)

STATUS_FILE = "run_status.json"
STATES = ("running", "done", "failed", "preempted")

# The final model folder that a checkpoint can provide: weights, config and tokenizer (not the optimizer state, RNG,
# training arguments or DeepSpeed files). Also what the push uploads, with the model card and summaries.
MODEL_FILES = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


class RunStatus:
    """The status file of one launch. Only the process that owns the folder writes (`write=True` on rank 0); every
    rank can ask `done(stage, step)`."""

    def __init__(self, output_dir: str | os.PathLike, write: bool):
        self.path = Path(output_dir) / STATUS_FILE
        self.write = write
        self.stage = "startup"
        try:
            self.stages: dict = json.loads(self.path.read_text()).get("stages", {})
        except (OSError, ValueError):
            self.stages = {}

    def enter(self, stage: str) -> None:
        self.stage = stage
        self._save("running", f"{stage} started")

    def done(self, stage: str, step: int, **match) -> bool:
        record = self.stages.get(stage) or {}
        return record.get("step") == step and all(record.get(k) == v for k, v in match.items())

    def record(self, stage: str, step: int, **details) -> None:
        """`stage` done at `step`: recorded once the folder's files are on disk, so that after a node crash the record
        never outlives what it says is done (truncated weights the next launch would push). Not the checkpoints: they
        were fsynced when marked complete (sfm_dpo/checkpoints.py)."""
        if self.write:
            fsync_tree(self.path.parent, prune="checkpoint-", missing_ok=True)
        self.stages[stage] = {"step": step, **details, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._save("running", f"{stage} done")

    def end(self, state: str, message: str) -> None:
        self._save(state, message)

    def _save(self, state: str, message: str) -> None:
        assert state in STATES, state
        if not self.write:
            return
        data = {
            "state": state, "stage": self.stage, "message": message, "stages": self.stages,
            "job_id": os.environ.get("SLURM_JOB_ID"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode())


def is_model_file(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in MODEL_FILES)


def final_model_from_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Copies the weights, config and tokenizer of `checkpoint` (which holds what `Trainer.save_model` writes, the
    same bf16 weights under ZeRO-2) and its trainer_state.json into `output_dir`, each file under a temporary name
    then renamed, so a kill midway leaves whole files. Returns the names copied."""
    source, target = Path(checkpoint), Path(output_dir)
    names = sorted(p.name for p in source.iterdir() if p.is_file() and is_model_file(p.name))
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{source} holds no model weights (*.safetensors) to save as the final model.")
    for name in [*names, "trainer_state.json"]:
        tmp = target / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, target / name)
    return names


def write_model_card_if_missing(output_dir: str | os.PathLike, base_model: str, dataset_name: str) -> None:
    """A short model card for a final model saved without a trainer at hand (`final_model_from_checkpoint`); the
    trainer's own card (TRL's) is written by the normal final save."""
    path = Path(output_dir) / "README.md"
    if path.exists():
        return
    name = Path(output_dir).name
    path.write_text(
        f"---\nbase_model: {base_model}\ndatasets:\n- {dataset_name}\nlibrary_name: transformers\ntags:\n- trl\n- dpo\n"
        f"---\n\n# {name}\n\nDPO of {base_model} on {dataset_name} with TRL's DPOTrainer. Training summary: "
        "run_summary.json.\n"
    )
