"""Atomic, durable checkpoints: a job killed while saving, or a node that crashes after it, never leaves a checkpoint
that resume would pick up half-written, and never loses the previous one.

transformers 5.24's `Trainer._save_checkpoint` writes straight into `checkpoint-N/` (no temporary name), each rank
writing its own ZeRO-2 optimizer shard, and rotates old checkpoints (`save_total_limit`) *before* the new one is known
to be whole: with `save_total_limit: 1` a kill in that window leaves nothing to resume from. `get_last_checkpoint`
then happily returns the half-written folder. Nothing fsyncs either (DeepSpeed's checkpoint engine `commit` is a
no-op): the files may still sit in the page cache when the old checkpoint is deleted, and a node crash then leaves
truncated files as the only checkpoint. So:

- `AtomicCheckpointMixin` (a base of the trainer), after every rank has saved: every rank fsyncs every file and
  folder of the checkpoint (so each file is flushed by the rank that wrote it, also on a network filesystem, where
  only the writer's client holds its dirty pages), then rank 0 writes the marker `COMPLETE` (temporary name, fsync,
  rename, fsync the folder) holding a manifest of the files, checks the checkpoint against it, and only then deletes
  older or broken checkpoints.
- The manifest records each file's size, and a SHA-256 of the whole file up to 64 MiB (trainer state, RNG, scheduler,
  configs, tokenizer) or of its first and last MiB above that (weights, optimizer shards: a full digest of ~100 GB at
  7B would add minutes to each save and to each resume). Sizes catch the usual crash damage (missing or truncated
  files); the sampled digest catches a zero-filled tail (unwritten extents after a crash) and a file replaced by
  another. It also records the world size (the ZeRO shards are per rank).
- `latest_complete_checkpoint(output_dir)` returns the newest checkpoint that has the marker and matches its manifest,
  warning about (and skipping) any that does not.
- `check_world_size(checkpoint, world_size)` stops a resume at another world size before the model is loaded.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from . import durable
from .durable import fsync_path
from .preemption import any_rank

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WHOLE_DIGEST_BYTES = 64 << 20  # files up to this size are digested whole
SAMPLE_BYTES = 1 << 20  # larger files: their first and last SAMPLE_BYTES
_ZERO_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


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


def _files(folder: Path) -> list[Path]:
    """Every file of the checkpoint but the marker, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, f".{MARKER}.tmp"))


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`, then `folder`'s parent (which holds its name)."""
    durable.fsync_tree(Path(folder))
    fsync_path(Path(folder).parent)


def _digest(path: Path, size: int, sample_bytes: int | None) -> str:
    """SHA-256 of the whole file (`sample_bytes` None) or of its first and last `sample_bytes`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if sample_bytes is None:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        else:
            h.update(f.read(sample_bytes))
            f.seek(max(size - sample_bytes, 0))
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def manifest(checkpoint: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256", "sampled"}} of every file of the checkpoint; "sampled": None when the digest
    covers the whole file, else the number of bytes digested at each end."""
    folder = Path(checkpoint)
    files = {}
    for path in _files(folder):
        size = path.stat().st_size
        sampled = None if size <= WHOLE_DIGEST_BYTES else SAMPLE_BYTES
        files[str(path.relative_to(folder))] = {
            "bytes": size,
            "sha256": _digest(path, size, sampled),
            "sampled": sampled,
        }
    return files


def mark_complete(checkpoint: str | os.PathLike, world_size: int | None = None) -> None:
    """Write the marker with the manifest atomically: temporary name, fsync, rename, fsync the folder (so the rename
    itself is durable before anything deletes the previous checkpoint). The files themselves must be durable already
    (`fsync_tree`, on every rank that wrote some)."""
    folder = Path(checkpoint)
    record = {
        "step": int(_CHECKPOINT_RE.match(folder.name).group(1)),
        "time": time.time(),
        "world_size": world_size,
        "files": manifest(folder),
    }
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    fsync_path(folder)


def unmark(checkpoint: str | os.PathLike) -> None:
    (Path(checkpoint) / MARKER).unlink(missing_ok=True)


def _record(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MARKER).read_text())


def verify(checkpoint: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint that has the marker: files missing, of another size or digest than its manifest
    records. Empty when it matches (or predates manifests: nothing to compare)."""
    folder = Path(checkpoint)
    try:
        files = _record(folder).get("files")
    except (OSError, ValueError) as error:
        return [f"unreadable {MARKER} marker ({error})"]
    if files is None:
        logger.info("%s has no manifest (saved before manifests were recorded); not verified.", folder)
        return []
    problems = []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{name} has {size} bytes, {want['bytes']} were saved")
        elif _digest(path, size, want["sampled"]) != want["sha256"]:
            where = f"its first and last {want['sampled']} bytes" if want["sampled"] else "its content"
            problems.append(f"{name} differs from what was saved ({where}, sha256)")
    return problems


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose save finished on every rank and whose files match their
    manifest, or None (fresh start)."""
    found = _checkpoints(output_dir)
    skipped = [path.name for _, path in found if not is_complete(path)]
    if skipped:
        logger.warning("Ignoring incomplete checkpoints (no %s marker) in %s: %s", MARKER, output_dir, skipped)
    for _, path in reversed(found):
        if not is_complete(path):
            continue
        problems = verify(path)
        if not problems:
            return str(path)
        logger.warning(
            "Skipping checkpoint %s: it was saved completely but its files no longer match its manifest (%s%s); a "
            "crash or a copy damaged it. Falling back to the previous complete checkpoint.",
            path, "; ".join(problems[:5]), f"; {len(problems) - 5} more" if len(problems) > 5 else "",
        )  # fmt: skip
    return None


def checkpoint_world_size(checkpoint: str | os.PathLike) -> int | None:
    """The number of processes that saved `checkpoint`: recorded in its marker, else counted from its ZeRO optimizer
    shards (one per data-parallel rank, `global_step*/*zero_pp_rank_R_mp_rank_00_optim_states.pt`); None if neither."""
    folder = Path(checkpoint)
    try:
        recorded = _record(folder).get("world_size")
    except (OSError, ValueError):
        recorded = None
    if recorded:
        return int(recorded)
    ranks = {int(m.group(1)) for p in folder.glob("global_step*/*") if (m := _ZERO_SHARD_RE.search(p.name))}
    return len(ranks) or None


def check_world_size(checkpoint: str | os.PathLike, world_size: int) -> None:
    """Raise, naming both sizes and what to do, if `checkpoint` holds ZeRO optimizer shards saved by another number of
    processes: DeepSpeed would fail only inside its checkpoint load, after the data preparation and the model load."""
    folder = Path(checkpoint)
    if not any(_ZERO_SHARD_RE.search(p.name) for p in folder.glob("global_step*/*")):
        return  # not a DeepSpeed ZeRO checkpoint: transformers loads its optimizer at any world size
    saved = checkpoint_world_size(folder)
    if saved is not None and saved != world_size:
        raise RuntimeError(
            f"Cannot resume from {folder}: it was saved by {saved} processes (its ZeRO optimizer states are split in "
            f"{saved} per-rank shards) and this job runs {world_size}. DeepSpeed loads a ZeRO checkpoint only at the "
            f"world size that saved it. Resume with {saved} processes (the same nodes x GPUs per node), or start "
            f"over in another --output_dir (or move {folder.parent}/checkpoint-* away) to train at {world_size}."
        )


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

        # Every rank has written its files; each makes them durable (fsync is per writer on a network filesystem)
        # before rank 0 vouches for them, and the previous checkpoint stays until the new one checks out.
        self.accelerator.wait_for_everyone()
        fsync_tree(folder)
        self.accelerator.wait_for_everyone()
        problems = []
        if self.args.should_save:
            mark_complete(folder, world_size=self.args.world_size)
            problems = verify(folder)
            if problems:
                unmark(folder)
                logger.error("Checkpoint %s does not read back as written: %s", folder, "; ".join(problems[:5]))
            else:
                remove_incomplete(run_dir)
                rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=False)
                logger.info("Checkpoint %s complete", folder)
        if any_rank(bool(problems)):  # every rank stops, none waits for rank 0 in the next collective
            raise RuntimeError(
                f"Checkpoint {folder} does not read back as written (see the error above): the filesystem lost data. "
                "The previous checkpoints are kept; check the disk (quota, errors) before resuming."
            )
