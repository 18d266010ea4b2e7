"""Reference log-probs computed once, kept on disk, reused by later runs, by resumed jobs and by the other points of a
sweep.

DPO's reference model is frozen, so its summed completion log-probs are a pure function of (reference weights,
token ids, forward numerics). We compute them in one data-parallel pass, store them keyed by exactly those inputs, and
train without a reference model in GPU memory (TRL reads the `ref_chosen_logps` / `ref_rejected_logps` columns when
`precompute_ref_logps` is set, `trl/trainer/dpo_trainer.py::_compute_loss`).

Why not TRL's own `precompute_ref_log_probs=True` (`DPOTrainer._precompute_ref_logps`, TRL 1.16)? It runs inside
`DPOTrainer.__init__`, before `Trainer.train` prepares the model. With no `ref_model` under DeepSpeed it wraps the
*policy* module in a second, stage-0 DeepSpeed inference engine (`trl.models.utils.prepare_deepspeed`) that
`Trainer._prepare_for_training` then wraps again in the stage-2 training engine: one nn.Module owned by two engines,
which is where our ZeRO-2 runs died. It also hashes the whole model on CPU on every rank (`hash_module`, minutes at
7B), keys its cache on `Dataset._fingerprint` (random for in-memory datasets, so never hit across runs), writes into
the datasets cache folder of the input (absent for in-memory data), needs a shared filesystem for the other ranks to
read rank 0's file, and gathers with `gather_for_metrics`, which needs the same batch count on every rank.

What we do instead:
- Run after `accelerator.prepare`. Under ZeRO-2 (and ZeRO-0/1, DDP, one GPU) each rank holds the whole bf16 module
  after prepare, so a plain no-grad forward of `engine.module` needs no collective and no second engine, and uses the
  very numerics of the training forward (the step-0 DPO loss is then ln 2 to the bit). ZeRO-3 shards parameters, its
  forward is collective, and ranks here run different numbers of forwards: we refuse it loudly.
- Share the work through chunks of rows on disk (`sfm_dpo.ref_chunks`): every rank of this job, and of any other
  job on the same cache (the points of a sweep started together), claims the next unclaimed chunk, computes it in
  batches and writes it once; the longest chunks go first. Ranks run any number of forwards, with no collective
  until they all meet once at the end; then rank 0 reads every chunk, whoever computed it, writes the cache and hands
  the values to the others. So jobs on one cache train on the very same values.
- Key the cache on what the values depend on and nothing else: the caller's `key` (the weights' content digest, see
  `model_identity`, the precision, attention backend, compiled kernels, forward version) plus a fingerprint of the
  exact token ids (which already reflects chat template, max_length and truncation). Any difference gives another
  folder, so a mismatch can never reuse a cache; equal inputs share one, whichever run or output folder asks.
- Rank 0 alone reads and writes the finished cache (atomically: file, fsync, rename; meta.json last, so that its
  presence means complete) and broadcasts the values, so every rank takes the same hit/miss decision. A job that
  finds the cache completed by another job at its next chunk stops computing and reads it.
- The pass survives preemption and crashes: each finished chunk is a file in the folder's `chunks/` (on the output
  filesystem, which ranks on several nodes share, like checkpoints). When `should_stop()` turns true a rank leaves
  its chunk; the ranks meet and raise `sfm_dpo.preemption.Preempted`. A later run, whatever its world size, keeps
  the finished chunks and computes the rest. A damaged cache or chunk is set aside with a warning naming it, and
  recomputed.
"""

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .durable import atomic_write
from .ref_chunks import ChunkBoard, chunk_rows, npy_bytes, set_aside

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the file layout or the meaning of the values changes
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
DIGEST_FOLDER = "file_digests"  # in the cache folder: the stored per-file digests (stored_file_digest)
# What `model_identity` digests in a model folder: transformers' weight files, the config (rope scaling, sliding
# windows and the like change the values too) and any remote code (`*.py`, the forward of a trust_remote_code model).
# Not optimizer.pt, training_args.bin, the tokenizer (the token ids are fingerprinted themselves) or the README.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
CODE_PATTERNS = ("config.json", "*.py")

ComputeFn = Callable[[list[dict]], tuple[Sequence[float], Sequence[float]]]


def data_fingerprint(dataset) -> str:
    """xxh3-128 of the token ids and per-row lengths of the three token columns, in row order (seconds for 150k
    Dolci-Think pairs): any change of text, chat template, truncation or order changes it."""
    import pyarrow as pa
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"rows={len(dataset)}".encode())
    table = dataset.with_format("arrow")[:] if dataset._indices is not None else dataset.data.table
    for name in TOKEN_COLUMNS:
        if name not in table.column_names:
            raise ValueError(f"Dataset has no column {name!r} (has {table.column_names}); tokenize it first.")
        h.update(name.encode())
        for chunk in table.column(name).chunks:
            if not pa.types.is_list(chunk.type) and not pa.types.is_large_list(chunk.type):
                raise ValueError(f"Column {name!r} must hold lists of token ids, not {chunk.type}.")
            h.update(np.ascontiguousarray(chunk.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64))
            h.update(np.ascontiguousarray(chunk.flatten().to_numpy(zero_copy_only=False), dtype=np.int64))
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: dict, fingerprint: str, n_rows: int) -> Path:
    """Folder of the cache for `key` and the data fingerprint: a digest of both, so that nothing but an equal key and
    equal tokens can land on it."""
    ident = json.dumps({"format": CACHE_FORMAT, "key": key, "data": fingerprint, "rows": n_rows}, sort_keys=True)
    return Path(cache_dir) / hashlib.sha256(ident.encode()).hexdigest()[:32]


# --- the reference weights' identity ---------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes. ~10 GB/s from the page cache on one core here, so reading the file is the cost."""
    import xxhash

    h = xxhash.xxh3_128()
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def stored_file_digest(path: Path, digest_dir: Path | None) -> str:
    """`file_digest(path)`, computed once: kept in `digest_dir` under the file's resolved path and reused while its
    size and mtime_ns are those recorded (a rewrite changes mtime, and the file is read again: ~1.5 s for the 14 GB
    of a 7B model from the page cache, the filesystem's read speed otherwise). The one file digest of the project:
    the reference cache's key (`model_identity`) and the run identity (`sfm_dpo.run_identity`) share it, and one
    `digest_dir` (`DIGEST_FOLDER` in the cache), so a file is read once for both."""
    resolved = path.resolve()
    stat = resolved.stat()
    record = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    store = None
    if digest_dir is not None:
        store = Path(digest_dir) / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:32]}.json"
        try:
            stored = json.loads(store.read_text())
            if {k: stored.get(k) for k in record} == record and isinstance(stored.get("xxh3_128"), str):
                return stored["xxh3_128"]
        except (OSError, ValueError):
            pass  # absent or unreadable: compute it again
    start = time.perf_counter()
    digest = file_digest(resolved)
    seconds = time.perf_counter() - start
    logger.info("Digest of %s (%.2f GB): %.1f s", resolved, stat.st_size / 1e9, seconds)
    if store is not None:
        atomic_write(store, (json.dumps({**record, "xxh3_128": digest, "seconds": round(seconds, 3)}) + "\n").encode())
    return digest


def resolve_model_folder(model_name_or_path: str, revision: str | None = None) -> tuple[Path, str]:
    """The folder holding the weights `from_pretrained(model_name_or_path, revision=revision)` loads, and a description
    for the logs. A Hub id resolves through the local Hub cache (huggingface_hub's `snapshot_download` with
    `local_files_only`: `refs/<revision>` -> `snapshots/<commit>`), which is what transformers loaded from, so a
    re-push under the same branch gives another folder. Not through the Hub API: the commit it names now may be newer
    than the one this job loaded."""
    path = Path(model_name_or_path)
    if path.is_dir():
        return path, str(path.resolve())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_name_or_path, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ValueError(
            f"Cannot identify the reference model {model_name_or_path!r} (revision {revision or 'main'}): it is not a "
            f"local folder and has no snapshot in the local Hub cache ({type(e).__name__}: {e}). Load it first "
            "(from_pretrained downloads it), or pass a local folder."
        ) from e
    return folder, f"{model_name_or_path}@{folder.name} ({folder})"


def model_identity(
    model_name_or_path: str, revision: str | None = None, digest_dir: str | os.PathLike | None = None
) -> dict:
    """`{"weights": digest}` for the cache key: a digest of the full content of the model's weight files, config and
    remote code (`WEIGHT_PATTERNS`, `CODE_PATTERNS`), by file name. Not the name, path or branch: a moved or renamed
    copy is the same model, a re-pushed or edited one (a single tensor) another. Each file's digest is stored in
    `digest_dir` and reused while its size and mtime match, so only the first run reads the 14 GB of a 7B model."""
    folder, description = resolve_model_folder(model_name_or_path, revision)
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not weights:
        raise ValueError(f"No weight files ({', '.join(WEIGHT_PATTERNS)}) in {folder}; cannot identify the model.")
    files = weights + sorted({p for pattern in CODE_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    digests = {p.name: stored_file_digest(p, Path(digest_dir) if digest_dir else None) for p in files}
    logger.info("Reference weights: %s, %d files", description, len(files))
    return {"weights": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:32]}


# --- the pass --------------------------------------------------------------------------------------------------------


def _pair_tokens(dataset) -> np.ndarray:
    """Real tokens each pair costs in the reference pass: prompt+chosen and prompt+rejected, shape (rows,)."""
    from .packing import dataset_pair_tokens  # imports torch: not needed by the digest helpers of this module

    return np.asarray(dataset_pair_tokens(dataset), dtype=np.int64)


def batches(indices: np.ndarray, pair_tokens: np.ndarray, token_budget: int | None, batch_size: int | None):
    """Consecutive groups of `indices`: at most `batch_size` rows, or as many as fit `token_budget` tokens (a pair
    longer than the budget goes alone)."""
    if (token_budget is None) == (batch_size is None):
        raise ValueError("Give exactly one of token_budget and batch_size.")
    group, used = [], 0
    for i in indices:
        cost = int(pair_tokens[i])
        full = len(group) == batch_size if batch_size else (group and used + cost > token_budget)
        if full:
            yield group
            group, used = [], 0
        group.append(int(i))
        used += cost
    if group:
        yield group


def check_whole_parameters(deepspeed_plugin) -> None:
    """The pass needs whole parameters on every rank: refuse ZeRO-3 (`deepspeed_plugin`: accelerate's
    `DeepSpeedPlugin`, as `TrainingArguments.deepspeed_plugin` or `Accelerator.deepspeed_plugin` hold it; None
    without DeepSpeed)."""
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        raise ValueError(
            "The reference log-prob pass needs whole parameters on every rank (ZeRO-0/1/2, DDP or one GPU); under "
            "ZeRO-3 each forward is collective and ranks here run different numbers of forwards. Use the ZeRO-2 "
            "config (accelerate_config.yaml), or --precompute_ref_log_probs false to keep a reference model."
        )


def _read(path: Path, expected: dict, n_rows: int) -> np.ndarray | None:
    """The cached (rows, 2) array, or None when absent (or incomplete: meta.json is written last). A folder that is
    damaged (unreadable, truncated, non-finite, or another key) is set aside and read as absent."""
    if not (path / "meta.json").exists():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        found = {name: meta.get(name) for name in expected}
        # JSON turns tuples into lists: compare through one JSON round trip.
        if json.loads(json.dumps(expected, sort_keys=True)) != found:
            raise ValueError(f"meta.json does not match its key: expected {expected}, found {found}")
        values = np.load(path / "ref_logps.npy")
        if values.shape != (n_rows, 2) or not np.isfinite(values).all():
            raise ValueError(f"values of shape {values.shape}, expected ({n_rows}, 2) and finite")
    except (OSError, ValueError, EOFError, AttributeError) as e:
        set_aside(path, f"{type(e).__name__}: {e}")
        return None
    return values


def _write(path: Path, values: np.ndarray, meta: dict) -> None:
    """Values first, meta.json last: its presence means a complete cache. Another job writing the same folder at the
    same time writes the same values (same weights, tokens and numerics); the last rename wins."""
    atomic_write(path / "ref_logps.npy", npy_bytes(lambda f, values: np.save(f, values), values=values))
    atomic_write(path / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_or_compute(dataset, compute_fn: ComputeFn, cache_dir: str | os.PathLike, key: dict, accelerator, **kwargs):
    """`load_or_compute_folder(...)[0]`: the dataset with the reference columns."""
    return load_or_compute_folder(dataset, compute_fn, cache_dir, key, accelerator, **kwargs)[0]


def load_or_compute_folder(
    dataset,
    compute_fn: ComputeFn,
    cache_dir: str | os.PathLike,
    key: dict,
    accelerator,
    *,
    token_budget: int | None = None,
    batch_size: int | None = None,
    allow_compute: bool = True,
    should_stop: Callable[[], bool] | None = None,
    info: dict | None = None,
    desc: str = "Reference log-probs",
):
    """Return `(dataset, folder)`: `dataset` with float columns `ref_chosen_logps`, `ref_rejected_logps` (the reference
    model's log-probs of each completion, summed over its tokens, shape (rows,) each) and the cache folder they were
    read from or written to.

    Every rank calls this with the same dataset. On a cache hit nothing is computed. On a miss the ranks of this job,
    and of any other job on the same cache meanwhile, share the chunks no run has finished (`sfm_dpo.ref_chunks`):
    each calls `compute_fn(rows) -> (chosen_logps, rejected_logps)` on batches of a chunk's rows (at most
    `batch_size` of them or `token_budget` tokens), and rank 0 stores the whole under `cache_dir` and hands it to the
    others. `key` must name everything besides the token ids that the values depend on (weights identity, precision,
    attention backend, kernels, forward version) and nothing else, or equal passes stop being shared: it is stored
    and compared verbatim. `info` is stored beside it, not compared (e.g. the model's name and commit).
    `allow_compute=False` (a resumed job, whose weights are no longer the reference) turns a miss into an error.

    `should_stop()` (e.g. "a preemption signal reached this rank") is asked before each batch: a rank that sees it
    leaves its chunk and joins the others early; then every rank raises `sfm_dpo.preemption.Preempted`.
    """
    check_whole_parameters(getattr(accelerator, "deepspeed_plugin", None))
    if not isinstance(key, dict) or not key:
        raise ValueError("key must be a non-empty dict naming what the reference log-probs depend on.")
    json.dumps(key)  # fail now, not after the pass, if the key cannot be stored
    n_rows = len(dataset)
    fingerprint = data_fingerprint(dataset)
    from accelerate.utils import gather_object

    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"Ranks hold different data (fingerprints {fingerprints}); the reference pass needs one.")
    path = cache_path(cache_dir, key, fingerprint, n_rows)
    expected = {"format": CACHE_FORMAT, "key": key, "data_fingerprint": fingerprint, "rows": n_rows}

    values = from_rank_zero(accelerator, lambda: _read(path, expected, n_rows))
    if values is not None:
        logger.info("Reference log-probs: cache hit, %d rows from %s", n_rows, path)
    elif not allow_compute:
        raise RuntimeError(
            f"No reference log-prob cache at {path} for this key and data, and computing it is not allowed here "
            "(a resumed job: the loaded weights are the trained policy, not the reference)."
        )
    else:
        values = _compute(dataset, compute_fn, path, expected, accelerator, token_budget, batch_size, should_stop,
                          desc, info)  # fmt: skip
    accelerator.wait_for_everyone()
    dataset = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(COLUMNS[0], values[:, 0].tolist())
    return dataset.add_column(COLUMNS[1], values[:, 1].tolist()), path


def from_rank_zero(accelerator, make):
    """`make()` on rank 0, its result on every rank (`accelerator`: an Accelerator or PartialState)."""
    from accelerate.utils import broadcast_object_list

    found = [make() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    return found[0]


def _forward(compute_fn: ComputeFn, dataset, group: list[int]) -> np.ndarray:
    """`compute_fn` on the rows `group`, checked: (len(group), 2) finite values."""
    out_chosen, out_rejected = compute_fn([dataset[i] for i in group])
    out = np.stack([np.asarray([float(x) for x in out_chosen]), np.asarray([float(x) for x in out_rejected])], axis=1)
    if out.shape != (len(group), 2):
        raise RuntimeError(
            f"compute_fn returned {len(out_chosen)} and {len(out_rejected)} values for {len(group)} rows."
        )
    if not np.isfinite(out).all():
        raise RuntimeError(f"Reference log-probs are not finite for rows {group}.")
    return out


def _compute_chunks(board, dataset, compute_fn, pair_tokens, token_budget, batch_size, should_stop, cache_done,
                    bar) -> tuple[bool, int, int]:  # fmt: skip
    """This rank's part: chunks taken from `board` and written there, until none is left or the cache is whole
    (another job finished it). Returns (stopped, rows computed, tokens computed): stopped by `should_stop` on this
    rank or on another rank of the job (`board.stop_requested`), asked before each batch."""

    def stopping() -> bool:
        if should_stop is not None and should_stop():
            board.request_stop()
            return True
        return board.stop_requested()

    rows_computed = tokens_computed = 0
    while not cache_done():
        if stopping():
            return True, rows_computed, tokens_computed
        chunk = board.next_chunk()
        if chunk is None:
            break
        rows = board.chunks[chunk]
        values = np.empty((len(rows), 2))
        position = 0
        if not bar.disable:  # rank 0's bar: every finished chunk, whoever computed it
            bar.n = int(sum(pair_tokens[board.chunks[c]].sum() for c in board.done()))
            bar.refresh()
        for group in batches(rows, pair_tokens, token_budget, batch_size):
            if stopping():
                return True, rows_computed, tokens_computed
            if board.is_done(chunk):  # another rank finished it first (it was claimed, then stolen)
                break
            values[position : position + len(group)] = _forward(compute_fn, dataset, group)
            position += len(group)
            tokens = int(pair_tokens[group].sum())
            rows_computed, tokens_computed = rows_computed + len(group), tokens_computed + tokens
            bar.update(tokens)
        else:
            board.write(chunk, values)
    return False, rows_computed, tokens_computed


def _compute(dataset, compute_fn, path, expected, accelerator, token_budget, batch_size, should_stop, desc,
             info) -> np.ndarray:  # fmt: skip
    """The pass on a cache miss, shared through the chunks with any other job on this cache: the (rows, 2) values on
    every rank; rank 0 writes the cache."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from .preemption import Preempted

    n_rows, start = len(dataset), time.perf_counter()
    pair_tokens = _pair_tokens(dataset)
    chunks = chunk_rows(pair_tokens)

    def open_board() -> str:
        """Rank 0: reads the finished chunks once (a damaged one is set aside now, and computed as any other) and
        draws this job's name."""
        board = ChunkBoard(path / "chunks", chunks, path.name, uuid.uuid4().hex[:12], 0)
        rows_done = len(board.read(n_rows)[0])
        if (path / "partial").exists():
            logger.warning("%s holds shards of an earlier layout of this pass: not read, their rows are computed "
                           "again.", path / "partial")  # fmt: skip
        logger.info(
            "Reference log-probs: cache miss at %s; %d of %d rows already computed (by an earlier or a concurrent "
            "run); the rest in %d chunks shared by this job's %d ranks and any other job on this cache",
            path, rows_done, n_rows, len(chunks), accelerator.num_processes,
        )  # fmt: skip
        board.announce()
        return board.job

    board = ChunkBoard(
        path / "chunks", chunks, path.name, from_rank_zero(accelerator, open_board), accelerator.process_index
    )
    blind = sorted({host for sees, host in gather_object([(board.sees_announcement(), platform.node())]) if not sees})
    if blind:
        raise RuntimeError(
            f"The reference cache folder {path} is not one folder for all ranks: the ranks on {', '.join(blind)} do "
            "not see the file rank 0 wrote there, so each node would compute the whole pass. Put --ref_cache_dir "
            "(or $SFM_REF_CACHE) on a filesystem that every node mounts, as the output folder is."
        )
    bar = tqdm(total=int(pair_tokens.sum()), unit="tok", unit_scale=True, desc=desc,
               disable=not accelerator.is_main_process)  # fmt: skip
    mine = _compute_chunks(board, dataset, compute_fn, pair_tokens, token_budget, batch_size, should_stop,
                           lambda: (path / "meta.json").exists(), bar)  # fmt: skip
    bar.close()
    # The ranks' only meeting after the work: those that stopped early and those that finished agree here.
    ranks = gather_object([mine])
    if any(stopped for stopped, _, _ in ranks):
        if accelerator.is_main_process:
            kept = sum(len(board.chunks[c]) for c in board.done())
            logger.warning("Reference pass stopped for preemption: %d of %d rows are kept in %s; the next run computes "
                           "the rest.", kept, n_rows, board.folder)  # fmt: skip
        raise Preempted("reference pass")
    rows_computed, tokens_computed = sum(r for _, r, _ in ranks), sum(t for _, _, t in ranks)
    seconds = time.perf_counter() - start
    meta = {
        **expected, "info": info, "pair_tokens": int(pair_tokens.sum()), "rows_computed_here": rows_computed,
        "seconds": round(seconds, 3), "world_size": accelerator.num_processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
    }  # fmt: skip
    values = from_rank_zero(
        accelerator,
        lambda: _assemble(
            board, path, expected, meta, dataset, compute_fn, pair_tokens, token_budget, batch_size
        ),  # fmt: skip
    )
    logger.info(
        "Reference log-probs: this job computed %d of %d rows (%d tokens) in %.1f s (%.0f tokens/s); saved in %s",
        rows_computed, n_rows, tokens_computed, seconds, tokens_computed / max(seconds, 1e-9), path,
    )  # fmt: skip
    return values


def _assemble(board, path, expected, meta, dataset, compute_fn, pair_tokens, token_budget, batch_size) -> np.ndarray:
    """Rank 0, every chunk finished: the whole cache, from the folder when another job wrote it meanwhile, else from
    the chunks (whoever computed them), written as the cache; rows of a chunk that was damaged are computed here."""
    import torch

    n_rows = expected["rows"]
    cached = _read(path, expected, n_rows)
    if cached is None:
        rows, chunk_values = board.read(n_rows)
        if len(rows) < n_rows and (path / "meta.json").exists():  # cleared by a job that has just finished the cache
            cached = _read(path, expected, n_rows)
    if cached is not None:
        logger.info("Reference log-probs: another job completed this cache meanwhile; its values are used (%s).", path)
        return cached
    values = np.full((n_rows, 2), np.nan)
    values[rows] = chunk_values
    missing = np.flatnonzero(np.isnan(values[:, 0]))
    if len(missing):
        logger.warning("Reference log-probs: %d rows had no valid chunk (a damaged one, set aside, or one claimed "
                       "by a job whose claim cannot be read): computed here, on rank 0.", len(missing))  # fmt: skip
        for group in batches(missing, pair_tokens, token_budget, batch_size):
            values[group] = _forward(compute_fn, dataset, group)
    _write(path, values, {**meta, "torch": torch.__version__})
    board.clear()
    shutil.rmtree(path / "partial", ignore_errors=True)  # shards of an earlier layout
    return values


def completion_logps_padded(model, rows: list[dict], device, pad_token_id: int = 0, chunk_tokens: int = 4096):
    """Summed completion log-probs of `rows` with an ordinary right-padded forward, shape (rows,) twice.

    The padded layout is TRL's `DataCollatorForPreference` ([prompt+chosen ...; prompt+rejected ...], right padded);
    the vocabulary projection runs only on the completion positions, `chunk_tokens` at a time in float32, so memory
    does not grow with tokens x vocabulary. A correct, model-agnostic `compute_fn` body; the fast path passes its
    packed forward instead.
    """
    import torch
    import torch.nn.functional as F

    sequences = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    starts = [len(r["prompt_ids"]) for r in rows] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state
        head = model.get_output_embeddings()
        # Position t predicts token t+1: score the hidden states before each completion token.
        # With an empty prompt the first completion token has no prediction, as in TRL's shifted labels.
        first = [max(st, 1) - 1 for st in starts]
        seq_index = torch.cat([torch.full((len(s) - 1 - f,), i) for i, (s, f) in enumerate(zip(sequences, first))])
        pos = torch.cat([torch.arange(f, len(s) - 1) for s, f in zip(sequences, first)])
        seq_index, pos = seq_index.to(device), pos.to(device)
        sums = torch.zeros(len(sequences), dtype=torch.float64, device=device)
        for lo in range(0, len(pos), chunk_tokens):
            b, t = seq_index[lo : lo + chunk_tokens], pos[lo : lo + chunk_tokens]
            logits = head(hidden[b, t]).float()
            logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[b, t + 1].unsqueeze(-1)).squeeze(-1)
            sums.index_add_(0, b, logps.double())
    sums = sums.cpu().tolist()
    n = len(rows)
    if any(not math.isfinite(x) for x in sums):
        raise RuntimeError("Non-finite reference log-probs.")
    return sums[:n], sums[n:]
