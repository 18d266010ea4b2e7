"""Reference log-probs computed once, kept on disk, reused by later runs and by resumed jobs.

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
- Balance the shards by tokens (longest first, dealt round-robin), let each rank run any number of forwards, then
  gather all results once with `gather_object`: robust to uneven shards, every row exactly once, back in row order.
- Key the cache on what the values depend on: the caller's `key` (model identity/revision, dtype, tokenization
  settings, forward version) plus a fingerprint of the exact token ids (which already reflects chat template and
  truncation). Any difference gives another folder, so a mismatch can never reuse a cache.
- Rank 0 alone reads and writes (atomically: temp folder, then rename) and broadcasts the values, so no shared
  filesystem is needed and every rank takes the same hit/miss decision.
"""

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the meaning of the values changes
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

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


def _pair_tokens(dataset) -> np.ndarray:
    """Real tokens each pair costs in the reference pass: prompt+chosen and prompt+rejected, shape (rows,)."""
    lengths = {name: np.asarray([len(x) for x in dataset[name]], dtype=np.int64) for name in TOKEN_COLUMNS}
    return 2 * lengths["prompt_ids"] + lengths["chosen_ids"] + lengths["rejected_ids"]


def shard_rows(pair_tokens: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Row indices for `rank`, longest first. Greedy longest-processing-time: each row, longest first, goes to the
    rank with the fewest tokens so far, so loads differ by at most one row's tokens (contiguous shards of long-tailed
    Dolci data would leave most ranks waiting for the one with the longest pairs). Deterministic: every rank computes
    the same assignment."""
    import heapq

    order = np.argsort(-pair_tokens, kind="stable")
    loads = [(0, r) for r in range(world_size)]
    owner = np.empty(len(order), dtype=np.int64)
    for k, row in enumerate(order):
        load, r = heapq.heappop(loads)
        owner[k] = r
        heapq.heappush(loads, (load + int(pair_tokens[row]), r))
    return order[owner == rank]


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


def _check_distributed(accelerator) -> None:
    # An Accelerator keeps the DeepSpeed plugin on `.state`; a bare PartialState (no DeepSpeed) has neither.
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError(
            "The reference log-prob pass needs whole parameters on every rank (ZeRO-0/1/2, DDP or one GPU); under "
            "ZeRO-3 each forward is collective and ranks here run different numbers of forwards."
        )


def _read(path: Path, key: dict, fingerprint: str, n_rows: int) -> np.ndarray | None:
    """The cached (rows, 2) array, or None. A folder that exists but does not match is an error, never a hit."""
    if not (path / "meta.json").exists():
        return None
    meta = json.loads((path / "meta.json").read_text())
    expected = {"format": CACHE_FORMAT, "key": key, "data_fingerprint": fingerprint, "rows": n_rows}
    found = {name: meta.get(name) for name in expected}
    # JSON turns tuples into lists: compare through one JSON round trip.
    if json.loads(json.dumps(expected, sort_keys=True)) != found:
        raise RuntimeError(f"Reference cache {path} does not match its key (expected {expected}, found {found}).")
    values = np.load(path / "ref_logps.npy")
    if values.shape != (n_rows, 2) or not np.isfinite(values).all():
        raise RuntimeError(f"Reference cache {path} is corrupt: shape {values.shape}, expected ({n_rows}, 2), finite.")
    return values


def _write(path: Path, values: np.ndarray, meta: dict) -> None:
    """Atomic: a reader sees the whole folder or none of it. If another job finished first, keep its copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        np.save(tmp / "ref_logps.npy", values)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").exists():
                raise
            logger.info("Reference cache %s was written meanwhile by another job; keeping that copy.", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compute_shard(dataset, compute_fn, indices, pair_tokens, token_budget, batch_size, show_progress, desc):
    from tqdm.auto import tqdm

    chosen = np.full(len(indices), np.nan)
    rejected = np.full(len(indices), np.nan)
    position = {int(row): k for k, row in enumerate(indices)}
    bar = tqdm(
        total=int(pair_tokens[indices].sum()), unit="tok", unit_scale=True, desc=desc, disable=not show_progress
    )
    for group in batches(indices, pair_tokens, token_budget, batch_size):
        rows = [dataset[i] for i in group]
        out_chosen, out_rejected = compute_fn(rows)
        out_chosen = np.asarray([float(x) for x in out_chosen])
        out_rejected = np.asarray([float(x) for x in out_rejected])
        if out_chosen.shape != (len(group),) or out_rejected.shape != (len(group),):
            raise RuntimeError(
                f"compute_fn returned {out_chosen.shape} and {out_rejected.shape} values for {len(group)} rows."
            )
        for row, c, r in zip(group, out_chosen, out_rejected, strict=True):
            chosen[position[row]], rejected[position[row]] = c, r
        bar.update(int(pair_tokens[group].sum()))
    bar.close()
    return chosen, rejected


def load_or_compute(
    dataset,
    compute_fn: ComputeFn,
    cache_dir: str | os.PathLike,
    key: dict,
    accelerator,
    *,
    token_budget: int | None = None,
    batch_size: int | None = None,
    allow_compute: bool = True,
    desc: str = "Reference log-probs",
):
    """Return `dataset` with float columns `ref_chosen_logps`, `ref_rejected_logps`: the reference model's log-probs
    of each completion, summed over its tokens, shape (rows,) each.

    Every rank calls this with the same dataset. On a cache hit nothing is computed. On a miss each rank calls
    `compute_fn(rows) -> (chosen_logps, rejected_logps)` on its shard (rows = list of dataset rows, at most
    `batch_size` of them or `token_budget` tokens), the results are gathered to every rank, and rank 0 stores them
    under `cache_dir`. `key` must name everything besides the token ids that the values depend on (model
    identity/revision, dtype, max_length, max_prompt_length, chat template, truncation policy, forward version): it is
    stored and compared verbatim. `allow_compute=False` (a resumed job, whose weights are no longer the reference)
    turns a miss into an error.
    """
    _check_distributed(accelerator)
    if not isinstance(key, dict) or not key:
        raise ValueError("key must be a non-empty dict naming what the reference log-probs depend on.")
    json.dumps(key)  # fail now, not after the pass, if the key cannot be stored
    n_rows = len(dataset)
    fingerprint = data_fingerprint(dataset)
    from accelerate.utils import broadcast_object_list, gather_object

    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"Ranks hold different data (fingerprints {fingerprints}); the reference pass needs one.")
    path = cache_path(cache_dir, key, fingerprint, n_rows)

    found = [_read(path, key, fingerprint, n_rows) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    values = found[0]
    if values is not None:
        logger.info("Reference log-probs: cache hit, %d rows from %s", n_rows, path)
    elif not allow_compute:
        raise RuntimeError(
            f"No reference log-prob cache at {path} for this key and data, and computing it is not allowed here "
            "(a resumed job: the loaded weights are the trained policy, not the reference)."
        )
    else:
        logger.info("Reference log-probs: cache miss at %s; computing %d rows on %d ranks", path, n_rows,
                    accelerator.num_processes)  # fmt: skip
        start = time.perf_counter()
        pair_tokens = _pair_tokens(dataset)
        mine = shard_rows(pair_tokens, accelerator.process_index, accelerator.num_processes)
        chosen, rejected = _compute_shard(dataset, compute_fn, mine, pair_tokens, token_budget, batch_size,
                                          accelerator.is_main_process, desc)  # fmt: skip
        gathered = gather_object([(mine, chosen, rejected)])
        values = np.full((n_rows, 2), np.nan)
        seen = np.zeros(n_rows, dtype=np.int64)
        for idx, c, r in gathered:
            values[idx, 0], values[idx, 1] = c, r
            np.add.at(seen, idx, 1)
        if not (seen == 1).all():
            raise RuntimeError(f"Reference pass covered rows {np.flatnonzero(seen != 1)[:10]}... not exactly once.")
        if not np.isfinite(values).all():
            raise RuntimeError(f"Reference log-probs are not finite for rows {np.flatnonzero(~np.isfinite(values))}.")
        seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            import torch

            meta = {
                "format": CACHE_FORMAT, "key": key, "data_fingerprint": fingerprint, "rows": n_rows,
                "pair_tokens": int(pair_tokens.sum()), "seconds": round(seconds, 3),
                "world_size": accelerator.num_processes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(), "torch": torch.__version__,
            }  # fmt: skip
            _write(path, values, meta)
        logger.info("Reference log-probs: computed %d rows (%d tokens) in %.1f s (%.0f tokens/s), saved to %s",
                    n_rows, int(pair_tokens.sum()), seconds, pair_tokens.sum() / max(seconds, 1e-9), path)  # fmt: skip
    accelerator.wait_for_everyone()
    dataset = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    dataset = dataset.add_column(COLUMNS[0], values[:, 0].tolist())
    return dataset.add_column(COLUMNS[1], values[:, 1].tolist())


def model_identity(model_name_or_path: str, revision: str | None = None, sample_blocks: int = 16) -> dict:
    """A cheap identity of the reference weights for `key`. Hub id: the id plus the resolved commit, if the local
    snapshot is a Hub cache. Local folder: each weight file's name and size, its safetensors header (names, dtypes,
    shapes) and `sample_blocks` 64 KiB blocks spread through it, hashed; so a retrained or edited checkpoint of the
    same shape changes the identity without reading 14 GB on every start."""
    path = Path(model_name_or_path)
    if not path.is_dir():
        return {"model": model_name_or_path, "revision": revision}
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"} or p.name == "config.json")
    if not any(p.suffix in {".safetensors", ".bin", ".pt"} for p in files):
        raise ValueError(f"No weight files in {path}; cannot identify the reference model.")
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            if p.suffix == ".safetensors":
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(header_len))
            step = max(1, size // sample_blocks)
            for offset in range(0, size, step):
                f.seek(offset)
                h.update(f.read(65536))
    return {"model": str(path.resolve()), "revision": revision, "weights_sha256_sampled": h.hexdigest()}


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
