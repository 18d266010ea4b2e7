"""Which run an output folder belongs to, and which job holds it now.

A run's identity is every setting that changes what it trains: the model and its weights, the data and its files, and
the recipe's values (learning rate, beta, loss, effective batch, max_length, seed, ...), but not how long it trains
(raising `--max_steps` or the epochs continues a run), how often it logs or saves, where it reports, pushes or writes,
nor the speed and memory knobs that leave the math alone (micro-batch size and token budget, workers, gradient
checkpointing, compiled layers, attention backend). It is kept in `run_identity.json` in the folder; a launch of
another run there is refused with the differing settings named (`check_identity`).

Every other setting counts by default (`NOT_IDENTITY` lists the exceptions), so a field added by a TRL upgrade is
safe: at worst it is named in a refusal. A setting recorded on one side only (an upgrade added or removed the field) is
logged and not compared.

`variant_name` names what a launch changes in its recipe (`learning_rate-5e-07`): `sfm_dpo.config.derive_run_names`
puts a run launched without `--output_dir` in that subfolder of the recipe's (one command per sweep point, each in its
own folder).

`FolderLock`: rank 0 holds `run.lock` in the folder (`fcntl.flock`) for the whole run, and a second job there refuses
at start-up with the holder's host, pid and job id. flock dies with the process, so a dead job never blocks. flock is
node-local on some cluster filesystems (Lustre `localflock`, BeeGFS by default) and unsupported on others (Lustre
without `flock`): the holder therefore also refreshes a heartbeat in `run_owner.json` every `HEARTBEAT_S`, and a job
on another host refuses while that heartbeat is younger than `STALE_S`, whatever flock said. A requeued life of the
same Slurm job (same job id: Slurm runs one life at a time) takes the folder over: at once, or, when the dead life's
flock lingers (NFS keeps a lost client's locks until its lease expires), after waiting up to `STALE_S` for it.
"""

import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import fields
from pathlib import Path, PurePosixPath

from .durable import atomic_write
from .ref_cache import stored_file_digest
from .run_status import is_model_file

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = "run.lock"
OWNER_FILE = "run_owner.json"
HEARTBEAT_S = 60
STALE_S = 300  # 5 heartbeats: a rank-0 thread can stall during a checkpoint write of a 7B model
CONTENT_DIGEST = "xxh3_128"  # of every byte of each file (ref_cache.file_digest)

# Settings that do not change what the run trains. Everything else is part of its identity.
NOT_IDENTITY = frozenset(
    {
        # How long: raising them continues the run (sfm_dpo.checkpoints.finished_training decides when it is done).
        "max_steps", "num_train_epochs",
        # Where and how often it writes, logs, reports and pushes.
        "output_dir", "overwrite_output_dir", "run_name", "project", "report_to", "disable_tqdm", "log_level",
        "log_level_replica", "log_on_each_node", "include_num_input_tokens_seen", "skip_memory_metrics",
        "resume_from_checkpoint", "restore_callback_states_from_checkpoint", "enable_jit_checkpoint", "ref_cache_dir",
        "push_to_hub", "hub_token",
        # Evaluation (training does not depend on it; the held-out split, eval_split_ratio / eval_split_seed, does).
        "do_train", "do_eval", "do_predict", "dataset_test_split", "per_device_eval_batch_size", "bf16_full_eval",
        "fp16_full_eval", "prediction_loss_only", "include_for_metrics", "batch_eval_metrics", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
        "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
        # Speed and memory: the same math (each optimizer step still averages over effective_batch_size pairs).
        "per_device_train_batch_size", "gradient_accumulation_steps", "auto_find_batch_size", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs",
        "activation_offloading", "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps",
        "use_liger_kernel", "liger_kernel_config", "tf32", "dataset_num_proc", "precompute_ref_batch_size",
        "max_tokens_per_microbatch", "ref_tokens_per_batch", "compile_layers", "attn_backend", "attn_implementation",
        "max_consecutive_nonfinite", "recompute_layers", "use_cache", "share_prompt",
        # The machine: device, world and launcher settings (a run may resume on another number of GPUs).
        "use_cpu", "local_rank", "deepspeed", "fsdp", "fsdp_config", "accelerator_config", "parallelism_config",
        "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
        "ddp_static_graph", "debug", "trust_remote_code",
    }
)  # fmt: skip
NOT_IDENTITY_PREFIXES = ("logging_", "save_", "hub_", "dataloader_", "trackio_")


def counts(name: str) -> bool:
    return name not in NOT_IDENTITY and not name.startswith(NOT_IDENTITY_PREFIXES)


def _plain(value):
    """JSON-safe, comparable form of a parsed value (enums by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    return json.loads(json.dumps(value, default=str))


def identity_settings(*arg_groups) -> dict:
    """The parsed settings that are part of the run's identity, by field name, from the parser's dataclasses."""
    settings = {}
    for group in arg_groups:
        for f in fields(group):
            if f.init and counts(f.name):
                settings[f.name] = _plain(getattr(group, f.name))
    return dict(sorted(settings.items()))


def files_identity(name_or_path: str, model: bool = False, digest_dir: Path | None = None) -> dict | None:
    """Digests of the whole content of the files behind a local path (a file, or every non-hidden file under a
    folder; for a `model` folder, its weight, config and tokenizer files only), or None for a Hub id, which the
    settings already name. Each file's digest is `ref_cache.stored_file_digest`'s, kept in `digest_dir`."""
    path = Path(name_or_path)
    if not path.exists():
        return None
    found = (p for p in path.iterdir() if is_model_file(p.name)) if model else path.rglob("*")
    files = [path] if path.is_file() else sorted(p for p in found if p.is_file())
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path.parent).parts)]
    root = path if path.is_dir() else path.parent
    return {str(p.relative_to(root)): stored_file_digest(p, digest_dir) for p in files}


def run_identity(script_args, training_args, model_args, digest_dir: str | os.PathLike | None = None) -> dict:
    """The identity recorded in the output folder: the settings, plus the content of local model and data files (a
    retrained model or regenerated data under the same path is another run: one changed tensor of a 14 GB weights
    file too, so every byte is read). `digest_dir`: where the per-file digests are kept (train_dpo.py passes the
    reference cache's, which the reference pass reads the same weights' digests from); None reads every file."""
    settings = identity_settings(script_args, training_args, model_args)
    digest_dir = Path(digest_dir) if digest_dir is not None else None
    content = {
        "digest": CONTENT_DIGEST,
        # Not the whole folder: a model that is another run's output folder holds checkpoints and live status files.
        "model_files": files_identity(model_args.model_name_or_path, model=True, digest_dir=digest_dir),
        "data_files": files_identity(script_args.dataset_name, digest_dir=digest_dir),
    }
    fingerprint = hashlib.sha256(json.dumps([settings, content], sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint, "settings": settings, "content": content}


def differences(recorded: dict, current: dict) -> list[str]:
    """'name: X in the folder, Y now' for every compared setting that differs; settings on one side only are logged."""
    diffs = []
    for section in ("settings", "content"):
        old, new = recorded.get(section, {}), current.get(section, {})
        if section == "content" and old.get("digest") != new.get("digest"):
            continue  # files digested another way cannot be compared; `check_identity` says so once, as it records
        one_sided = sorted(set(old) ^ set(new))
        if one_sided:
            logger.info("Not compared (recorded on one side only, e.g. by another library version): %s", one_sided)
        for name in sorted(set(old) & set(new)):
            if old[name] != new[name]:
                if section == "content":
                    diffs.append(f"{name}: the files differ from those the folder's run used")
                else:
                    diffs.append(f"{name}: {old[name]!r} in the folder, {new[name]!r} now")
    return diffs


class RunConflict(RuntimeError):
    """The output folder belongs to another run, or a live job holds it."""


def _looks_like_a_run(folder: Path) -> bool:
    return (folder / "trainer_state.json").exists() or any(folder.glob("checkpoint-*"))


def check_identity(output_dir: str, identity: dict, record: bool) -> None:
    """Refuses a folder that holds another run; with `record`, writes this run's identity into a folder that has
    none (call it so only while holding the folder's lock)."""
    folder = Path(output_dir)
    path = folder / IDENTITY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        diffs = differences(recorded, identity)
        if diffs:
            raise RunConflict(
                f"{folder} holds another run (fingerprint {recorded.get('fingerprint')} in its {IDENTITY_FILE}; this "
                f"launch: {identity['fingerprint']}). Settings that differ:\n  " + "\n  ".join(diffs) + "\nPass "
                "another --output_dir for this run (without --output_dir, each variant of a recipe gets its own "
                "folder), or launch with the folder's settings to continue its run."
            )
        if record:
            logger.info("%s belongs to this run (identity %s).", folder, identity["fingerprint"])
            old_digest = recorded.get("content", {}).get("digest")
            if old_digest != identity["content"]["digest"]:
                # As for a folder without a record: its files taken as the run's, so that later launches compare them.
                _write_json(path, {**recorded, "fingerprint": identity["fingerprint"], "content": identity["content"]})
                logger.warning(
                    "The folder's %s digests the files another way (%s; this version: %s): the model and data files "
                    "were not compared, the settings were. Recorded this launch's file digests in %s, unchecked.",
                    IDENTITY_FILE, old_digest or "sampled sha256", identity["content"]["digest"], path,
                )  # fmt: skip
        return
    if not record:
        return
    if _looks_like_a_run(folder):
        logger.warning(
            "%s holds a run without %s (made before runs were recorded): taking it as this run's, unchecked.",
            folder, IDENTITY_FILE,
        )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(path, {**identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    logger.info("Recorded the run's identity %s in %s.", identity["fingerprint"], path)


def claim_output_dir(output_dir: str, identity: dict) -> "FolderLock":
    """Rank 0, before anything is written to the folder: refuses another run's folder (before waiting on any lock),
    then takes the lock, then records the identity if the folder has none. Release the lock at exit."""
    check_identity(output_dir, identity, record=False)
    lock = FolderLock(output_dir).acquire()
    try:
        check_identity(output_dir, identity, record=True)  # again: another run may have claimed it meanwhile
    except BaseException:
        lock.release()
        raise
    return lock


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ---- Folder names of sweep points ----


def _short(value) -> str:
    """A value as a folder-name part: paths and Hub ids by their last component, lists joined by '+'."""
    if isinstance(value, list):
        return "+".join(_short(v) for v in value)
    text = str(value)
    if "/" in text:
        text = PurePosixPath(text.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def variant_name(changes: dict) -> str | None:
    """What a launch changes in its recipe ({setting: value}), as a folder name: the model's short name first (a
    model sweep), then `name-value` for each other setting, in name order, joined by '__'; None when nothing changes.
    A name over 100 characters is cut and ends with a digest of the whole, so that it stays unique."""
    if not changes:
        return None
    parts = [_short(changes["model_name_or_path"])] if "model_name_or_path" in changes else []
    parts += [f"{k}-{_short(v)}" for k, v in sorted(changes.items()) if k != "model_name_or_path"]
    name = "__".join(parts)
    if len(name) > 100:
        name = f"{name[:83]}__{hashlib.sha256(name.encode()).hexdigest()[:15]}"
    return name


# ---- The lock ----


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id(), "started": time.time()}


def _describe(owner: dict) -> str:
    if not owner:
        return "another job (starting: it has not recorded its host and pid yet)"
    job = f"Slurm job {owner['job_id']}" if owner.get("job_id") else "a job outside Slurm"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"{job} on host {owner.get('host')} (pid {owner.get('pid')}, since {started})"


class FolderLock:
    """Held by rank 0 from start-up to exit: `acquire()` raises RunConflict when a live job holds the folder."""

    def __init__(self, output_dir: str):
        self.folder = Path(output_dir)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict | None = None

    def _read_owner(self) -> dict | None:
        try:
            return json.loads((self.folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._flock(fd)
        except BlockingIOError:
            os.close(fd)
            owner = self._read_owner() or {}
            cancel = f" or cancel it (scancel {owner['job_id']})" if owner.get("job_id") else ""
            raise RunConflict(
                f"{self.folder} is in use by {_describe(owner)}: two jobs in one folder would resume each other's "
                f"checkpoints. Wait for it to end{cancel}, or pass another --output_dir."
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            logger.warning(
                "File locks are not supported on the filesystem of %s (%s): only the heartbeat in %s guards it "
                "against a second job.", self.folder, e.strerror, OWNER_FILE,
            )  # fmt: skip
        owner = self._read_owner()
        if owner and self._held_elsewhere(owner):
            os.close(fd)
            age = time.time() - owner.get("heartbeat", 0)
            raise RunConflict(
                f"{self.folder} is in use by {_describe(owner)}, whose heartbeat is {age:.0f} s old: that host's file "
                f"lock does not reach this one (a node-local lock on this filesystem). Wait for it to end, or pass "
                f"another --output_dir. If that job is dead, its heartbeat goes stale within {STALE_S} s."
            )
        self._fd = fd
        self._record = _owner_record()
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        logger.info("Holding %s (%s).", self.folder / LOCK_FILE, _describe(self._record))
        return self

    def _flock(self, fd: int) -> None:
        """flock, or BlockingIOError when another process holds it. A later life of the same Slurm job (a requeue
        after a node failure) waits up to STALE_S for the dead life's lock: on NFS the server keeps a lost client's
        locks until its lease expires (90 s by default). Slurm runs one life of a job at a time, so it then goes on
        without the flock (the heartbeat still guards the folder)."""
        deadline = time.monotonic() + STALE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                owner = self._read_owner() or {}
                if not (_job_id() and owner.get("job_id") == _job_id()):
                    raise
                if time.monotonic() > deadline:
                    logger.warning(
                        "%s is still locked by an earlier life of this job (%s), dead since Slurm requeued it: going "
                        "on without the lock.", self.folder / LOCK_FILE, _describe(owner),
                    )  # fmt: skip
                    return
                logger.info("Waiting for the lock of an earlier life of this job to expire (%s).", _describe(owner))
                time.sleep(5)

    @staticmethod
    def _held_elsewhere(owner: dict) -> bool:
        """Whether a record that our own flock did not see still stands for a live job: from another host (a
        same-host holder would have kept the flock), not an earlier life of this Slurm job, heartbeat fresh."""
        if owner.get("host") == socket.gethostname():
            return False
        if owner.get("job_id") and owner.get("job_id") == _job_id():
            return False
        return time.time() - owner.get("heartbeat", 0) < STALE_S

    def _beat(self) -> None:
        _write_json(self.folder / OWNER_FILE, {**self._record, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError as e:  # a full or unreachable filesystem fails the run elsewhere, loudly
                logger.warning("Could not refresh %s: %s", self.folder / OWNER_FILE, e)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        (self.folder / OWNER_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # releases the flock
        self._fd = None
