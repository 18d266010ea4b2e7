"""The reference pass's unit of work: chunks of rows that the ranks of every job on one cache claim, compute and
write once, so that the points of a sweep started together share one pass instead of each computing all of it.

The rows, longest first, are cut into about `CHUNKS` chunks of equal tokens. Only the data decides the cut, so every
job that reaches a cache folder (same key, same tokens: `sfm_dpo.ref_cache`) cuts the same chunks, whatever its world
size or token budget. In the folder's `chunks/`:

- `NNNNN.claim`: a rank of some job has taken chunk NNNNN. Created with a hard link of a finished file, which fails
  if the name exists (atomic and exclusive on local disks, NFS, Lustre and GPFS), so one rank of all jobs wins.
- `NNNNN.npz`: the chunk's values, written once (the same exclusive link): every job reads the same values.
- `NNNNN.<job>.steal`: when no chunk is left unclaimed, a rank also computes chunks that another job claimed and has
  not finished (that job may be dead: no heartbeat is needed), one rank of each job per chunk. Whoever finishes
  first writes it; the others drop it at their next batch. So the tail costs at most a chunk per rank, GPUs that
  would otherwise wait, and a dead job's claims are never waited for.

A preempted or crashed rank loses only the chunk it was computing (~1/CHUNKS of the pass, shared by the ranks); its
claim then counts as another job's for the next launch, which computes it last.
"""

import json
import logging
import os
import platform
import time
import zipfile
from pathlib import Path

import numpy as np

from .durable import atomic_write

logger = logging.getLogger(__name__)

CHUNKS = 256  # about this many chunks: the tail and the loss on preemption are ~1/CHUNKS of the pass


def chunk_rows(pair_tokens: np.ndarray) -> list[np.ndarray]:
    """Row indices, longest first, cut into at most `CHUNKS` consecutive chunks of about equal tokens (each at least
    one row; a row longer than a chunk's share is a chunk alone). Deterministic, from the token counts alone."""
    order = np.argsort(-pair_tokens, kind="stable")
    if not len(order):
        return []
    tokens = pair_tokens[order].astype(np.float64)
    share = max(tokens.sum() / CHUNKS, 1.0)
    chunk_of = np.minimum((np.cumsum(tokens) - tokens) // share, CHUNKS - 1)  # by where each row starts
    return np.split(order, np.flatnonzero(np.diff(chunk_of)) + 1)


def npy_bytes(save, **arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    save(buffer, **arrays)
    return buffer.getvalue()


def set_aside(path: Path, why: str) -> None:
    """Moves a damaged cache folder or chunk out of the way (kept for inspection) and says so."""
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.rename(path, target)
        logger.warning("Reference cache %s is damaged (%s): moved to %s; its rows are recomputed.", path, why, target)
    except FileNotFoundError:  # another job set it aside first
        logger.warning(
            "Reference cache %s is damaged (%s) and was moved meanwhile; its rows are recomputed.", path, why
        )


class ChunkBoard:
    """The `chunks/` folder of one cache, as one rank of one job sees it. `job` is shared by the ranks of a launch
    (rank 0 draws it), `ident` is the cache folder's name, written in every chunk and checked on reading."""

    def __init__(self, folder: Path, chunks: list[np.ndarray], ident: str, job: str, rank: int):
        self.folder, self.chunks, self.ident, self.job, self.rank = folder, chunks, ident, job, rank
        self.folder.mkdir(parents=True, exist_ok=True)

    def _name(self, chunk: int, suffix: str) -> Path:
        return self.folder / f"{chunk:05d}{suffix}"

    def is_done(self, chunk: int) -> bool:
        return self._name(chunk, ".npz").exists()

    def _listing(self) -> tuple[set[int], set[int]]:
        """(done, claimed) chunk numbers, from one listing of the folder."""
        done, claimed = set(), set()
        for entry in os.scandir(self.folder):
            stem, _, suffix = entry.name.partition(".")
            if stem.isdigit() and suffix in ("npz", "claim"):
                (done if suffix == "npz" else claimed).add(int(stem))
        return done, claimed

    def done(self) -> set[int]:
        """The finished chunks (any job, any rank)."""
        return self._listing()[0]

    def _claimant(self, chunk: int) -> str | None:
        try:
            return json.loads(self._name(chunk, ".claim").read_text())["job"]
        except (OSError, ValueError, KeyError):
            return None

    def _take(self, path: Path) -> bool:
        record = {"job": self.job, "rank": self.rank, "host": platform.node(), "pid": os.getpid(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        return atomic_write(path, (json.dumps(record) + "\n").encode(), exclusive=True)

    def next_chunk(self) -> int | None:
        """The next chunk for this rank: the first unclaimed one, claimed now; else the first one another job claimed
        and has not finished, that no other rank of this job is computing; else None (every chunk is done, or being
        done by this job)."""
        done, claimed = self._listing()
        for chunk in range(len(self.chunks)):
            if chunk not in done and chunk not in claimed and self._take(self._name(chunk, ".claim")):
                return chunk
        done, claimed = self._listing()
        for chunk in sorted(claimed - done):
            claimant = self._claimant(chunk)
            if claimant is not None and claimant != self.job and self._take(self._name(chunk, f".{self.job}.steal")):
                return chunk
        return None

    def write(self, chunk: int, values: np.ndarray) -> bool:
        """Store the chunk's (rows, 2) values, unless another rank stored it first (its values are then the ones)."""
        data = npy_bytes(np.savez, rows=self.chunks[chunk], values=values, ident=np.asarray(self.ident))
        return atomic_write(self._name(chunk, ".npz"), data, exclusive=True)

    def announce(self) -> None:
        """Rank 0: a file naming this job, which every rank must see (`sees_announcement`)."""
        atomic_write(self.folder / f"{self.job}.job", (json.dumps({"host": platform.node()}) + "\n").encode())

    def sees_announcement(self) -> bool:
        """Whether this rank sees rank 0's `announce` file: else the folder is not one filesystem for all ranks (a
        node-local folder on several nodes), and the nodes would each compute every chunk."""
        return (self.folder / f"{self.job}.job").exists()

    def request_stop(self) -> None:
        """This rank stops (a preemption signal reached it): the other ranks of the job stop at their next batch, not
        at the end of the pass (a signal may reach one rank only, and the job has minutes left)."""
        atomic_write(self.folder / f"{self.job}.stop", b"")

    def stop_requested(self) -> bool:
        return (self.folder / f"{self.job}.stop").exists()

    def read(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (k,) and values (k, 2) of every valid finished chunk (any job, any rank), each opened by its name (a
        network filesystem's cached listing may lag, a lookup by name does not); each damaged one (truncated, of
        another cache, of other rows: a different cut) is set aside, and its rows are missing."""
        rows, values = [], []
        for chunk, expected_rows in enumerate(self.chunks):
            path = self._name(chunk, ".npz")
            try:
                with np.load(path) as f:
                    chunk_rows_, chunk_values, ident = f["rows"], f["values"], str(f["ident"])
                if ident != self.ident:
                    raise ValueError(f"belongs to cache {ident}, not {self.ident}")
                if not np.array_equal(chunk_rows_, expected_rows):
                    raise ValueError("holds other rows than this chunk's")
                if chunk_values.shape != (len(chunk_rows_), 2) or not np.isfinite(chunk_values).all():
                    raise ValueError(f"values of shape {chunk_values.shape}, or not finite")
            except FileNotFoundError:
                continue  # not finished, or removed by a job that completed the cache meanwhile
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
                set_aside(path, f"{type(e).__name__}: {e}")
                continue
            rows.append(chunk_rows_.astype(np.int64))
            values.append(chunk_values.astype(np.float64))
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty((0, 2))
        return np.concatenate(rows), np.concatenate(values)

    def clear(self) -> None:
        """Once the cache is whole: remove the chunks, claims, steals, job and stop files. Not the folder, the chunks
        set aside as damaged (kept for inspection), nor the temporary files of jobs still writing (which find the
        cache at their next chunk and stop); a temporary file an hour old was left by a writer that was killed."""
        for entry in os.scandir(self.folder):
            try:
                stale = entry.name.endswith(".tmp") and time.time() - entry.stat().st_mtime > 3600
                if stale or not (entry.name.endswith(".tmp") or ".damaged-" in entry.name):
                    Path(entry.path).unlink(missing_ok=True)
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
