"""Atomic checkpoints: a job killed while saving never leaves a checkpoint that resume would pick up half-written.

transformers 5.24's `Trainer._save_checkpoint` writes straight into `checkpoint-N/` (no temporary name), each rank
writing its own ZeRO-2 optimizer shard, and rotates old checkpoints (`save_total_limit`) *before* the new one is known
to be whole: with `save_total_limit: 1` a kill in that window leaves nothing to resume from. `get_last_checkpoint`
then happily returns the half-written folder. So:

- `AtomicCheckpointMixin` (a base of the trainer) waits for every rank after a save, then rank 0 writes a marker file
  (`COMPLETE`, itself written under a temporary name and renamed), and only then deletes older or broken checkpoints.
- `latest_complete_checkpoint(output_dir)` returns the newest checkpoint that has the marker, ignoring the others.
"""

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` folder in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / MARKER).is_file()


def mark_complete(checkpoint: str | os.PathLike) -> None:
    """Write the marker atomically: temporary name, fsync, rename, fsync the folder (so the rename itself is durable
    before anything deletes the previous checkpoint)."""
    folder = Path(checkpoint)
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": int(_CHECKPOINT_RE.match(folder.name).group(1)), "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unmark(checkpoint: str | os.PathLike) -> None:
    (Path(checkpoint) / MARKER).unlink(missing_ok=True)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose save finished on every rank, or None (fresh start)."""
    complete = [path for _, path in _checkpoints(output_dir) if is_complete(path)]
    skipped = [path.name for _, path in _checkpoints(output_dir) if not is_complete(path)]
    if skipped:
        logger.warning("Ignoring incomplete checkpoints (no %s marker) in %s: %s", MARKER, output_dir, skipped)
    return str(complete[-1]) if complete else None


def finished_training(state_dir: str | os.PathLike, max_steps: int, num_train_epochs: float) -> bool:
    """Whether the `trainer_state.json` in `state_dir` (a checkpoint, or the output folder after the final save) is at
    the last step of the training this request asks for: `max_steps` when set (> 0), else the state's own total if it
    was planned for the same number of epochs. The Trainer would otherwise resume and run one step past the end (seen
    on 2 H100s: a rerun of a finished job trained step 7 of 6 and overwrote the final model)."""
    path = Path(state_dir) / "trainer_state.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    step = state.get("global_step", 0)
    if max_steps > 0:
        return step >= max_steps
    return (
        bool(state.get("max_steps"))
        and step >= state["max_steps"]
        and state.get("num_train_epochs") == num_train_epochs
    )


def remove_incomplete(output_dir: str | os.PathLike) -> list[str]:
    """Delete checkpoints without a marker. Only safe when no rank is writing one (after the post-save barrier)."""
    removed = []
    for _, path in _checkpoints(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.warning("Removed incomplete checkpoints %s from %s", removed, output_dir)
    return removed


class AtomicCheckpointMixin:
    """Put before the Trainer class in the bases: `class SFMDPOTrainer(AtomicCheckpointMixin, DPOTrainer)`."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            # A marker left by an earlier life of this job must not vouch for the files about to be rewritten.
            unmark(folder)
        self.accelerator.wait_for_everyone()

        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # transformers would rotate before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit

        # Every rank has written its shard (ZeRO-2 optimizer states are per rank) before rank 0 vouches for them.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder)
            remove_incomplete(run_dir)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=False)
            logger.info("Checkpoint %s complete", folder)
        self.accelerator.wait_for_everyone()
