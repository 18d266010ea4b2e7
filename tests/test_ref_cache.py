"""The on-disk reference log-prob cache: values equal a direct per-sequence computation, a second call hits the cache,
any change of key or data recomputes, and a 2-process DeepSpeed ZeRO-2 pass with an uneven row count gives the
values of one process.

Run as a script (`torchrun --nproc_per_node 2 tests/test_ref_cache.py OUT CACHE`) it is the 2-process worker.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sfm_dpo import ref_cache, ref_chunks
from sfm_dpo.tiny import build_tiny_model

VOCAB = 97
N_ROWS = 13  # odd: two ranks get 7 and 6 rows
KEY = {"model": "tiny-gpt_neox", "seed": 0, "dtype": "float32", "max_length": 64, "forward": "padded-v1"}


def make_dataset(n_rows: int = N_ROWS, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    rows = [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 30), "rejected_ids": ids(1, 30)} for _ in range(n_rows)]
    return Dataset.from_list(rows)


def direct_logps(model, dataset) -> np.ndarray:
    """Independent reference: one unpadded sequence at a time, full-vocabulary log_softmax, summed over the
    completion tokens (position t predicts token t+1), shape (rows, 2)."""
    out = []
    with torch.no_grad():
        for row in dataset:
            pair = []
            for completion in (row["chosen_ids"], row["rejected_ids"]):
                ids = torch.tensor([row["prompt_ids"] + completion])
                logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
                n_prompt = len(row["prompt_ids"])
                pair.append(sum(logps[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1])))
            out.append(pair)
    return np.asarray(out)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("gpt_neox", VOCAB, seed=0).eval()


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def counting_compute_fn(model, calls: list):
    def compute_fn(rows):
        calls.append(len(rows))
        return ref_cache.completion_logps_padded(model, rows, device="cpu")

    return compute_fn


def columns(dataset) -> np.ndarray:
    return np.stack([dataset["ref_chosen_logps"], dataset["ref_rejected_logps"]], axis=1)


def test_cache_values_hit_and_key_change(model, accelerator, tmp_path):
    dataset = make_dataset()
    expected = direct_logps(model, dataset)
    assert np.all(expected < 0)  # log-probs of random tokens: a sign error or a zero fill would show

    calls = []
    first = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                      token_budget=120)  # fmt: skip
    np.testing.assert_allclose(columns(first), expected, rtol=1e-5, atol=1e-4)
    assert sum(calls) == N_ROWS and len(calls) > 1  # every row computed once, in several budget-sized batches
    assert first["prompt_ids"] == dataset["prompt_ids"]  # row order kept
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"] == KEY and meta["rows"] == N_ROWS and meta["world_size"] == 1

    def must_not_run(rows):
        raise AssertionError("compute_fn called on a cache hit")

    second = ref_cache.load_or_compute(dataset, must_not_run, tmp_path, KEY, accelerator, batch_size=4)
    np.testing.assert_array_equal(columns(second), columns(first))
    # A resumed job (allow_compute=False) reads the cache too.
    resumed = ref_cache.load_or_compute(dataset, must_not_run, tmp_path, KEY, accelerator, batch_size=4,
                                        allow_compute=False)  # fmt: skip
    np.testing.assert_array_equal(columns(resumed), columns(first))

    # Another key (here: another max_length) recomputes, into another folder.
    calls.clear()
    changed = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, {**KEY, "max_length": 32},
                                        accelerator, batch_size=5)  # fmt: skip
    assert sum(calls) == N_ROWS
    np.testing.assert_allclose(columns(changed), expected, rtol=1e-5, atol=1e-4)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2

    # Other tokens under the same key recompute too (the data fingerprint is part of the cache identity).
    calls.clear()
    other = make_dataset(seed=1)
    recomputed = ref_cache.load_or_compute(other, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                           batch_size=5)  # fmt: skip
    assert sum(calls) == N_ROWS
    np.testing.assert_allclose(columns(recomputed), direct_logps(model, other), rtol=1e-5, atol=1e-4)

    # A resumed job with no cache for its key must stop, not compute from the trained weights.
    with pytest.raises(RuntimeError, match="resumed job"):
        ref_cache.load_or_compute(dataset, must_not_run, tmp_path, {**KEY, "seed": 1}, accelerator, batch_size=4,
                                  allow_compute=False)  # fmt: skip


def test_fingerprint_sees_tokens_and_order():
    dataset = make_dataset()
    base = ref_cache.data_fingerprint(dataset)
    assert ref_cache.data_fingerprint(make_dataset()) == base
    assert ref_cache.data_fingerprint(dataset.select(list(range(N_ROWS))[::-1])) != base
    edited = dataset.map(lambda r, i: {"chosen_ids": r["chosen_ids"] + [1] if i == 5 else r["chosen_ids"]},
                         with_indices=True)  # fmt: skip
    assert ref_cache.data_fingerprint(edited) != base
    # Moving a token from the prompt to the completion keeps the flat token stream but not the row.
    moved = dataset.map(lambda r, i: {"prompt_ids": r["prompt_ids"][:-1], "chosen_ids": r["prompt_ids"][-1:] +
                                      r["chosen_ids"]} if i == 0 else r, with_indices=True)  # fmt: skip
    assert ref_cache.data_fingerprint(moved) != base


def only_folder(cache_dir: Path) -> Path:
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


@pytest.mark.parametrize("damage", ["truncated_npy", "bad_meta", "other_key"])
def test_damaged_cache_is_set_aside_and_recomputed(model, accelerator, tmp_path, caplog, damage):
    dataset = make_dataset()
    first = ref_cache.load_or_compute(
        dataset, counting_compute_fn(model, []), tmp_path, KEY, accelerator, batch_size=8
    )
    folder = only_folder(tmp_path)
    if damage == "truncated_npy":
        data = (folder / "ref_logps.npy").read_bytes()
        (folder / "ref_logps.npy").write_bytes(data[: len(data) // 2])
    elif damage == "bad_meta":
        (folder / "meta.json").write_text('{"format": 1, "key": ')
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "key": {**KEY, "max_length": 1}}))
    calls = []
    with caplog.at_level("WARNING", logger="sfm_dpo"):
        again = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                          batch_size=8)  # fmt: skip
    assert sum(calls) == N_ROWS
    assert str(folder) in caplog.text and "recomput" in caplog.text
    np.testing.assert_allclose(columns(again), columns(first), rtol=1e-6, atol=1e-5)
    assert list(tmp_path.glob(f"{folder.name}.damaged-*"))  # kept for inspection, out of the way


def stopping_after(n_calls: int, calls: list):
    return lambda: len(calls) >= n_calls


def chunk_files(folder: Path) -> list[Path]:
    return sorted((folder / "chunks").glob("[0-9]*.npz"))


def test_chunks_cut_the_rows_longest_first_by_tokens(monkeypatch):
    monkeypatch.setattr(ref_chunks, "CHUNKS", 3)
    tokens = np.asarray([5000, 10, 20, 7000, 30, 40, 50, 60, 9000])
    # Longest first: 9000 (row 8), 7000 (3), 5000 (0), then the short rows; a share is 21210 / 3 = 7070 tokens, and a
    # row belongs to the chunk in which it starts: 9000 starts at 0, 7000 at 9000, 5000 at 16000 (chunk 2 from 14140).
    chunks = ref_chunks.chunk_rows(tokens)
    assert [c.tolist() for c in chunks] == [[8], [3], [0, 7, 6, 5, 4, 2, 1]]
    monkeypatch.setattr(ref_chunks, "CHUNKS", 256)  # a share of 82.9 tokens: 60 starts at 21000 (chunk 253.3), 50
    # at 21060 (254.2), 40 at 21110 (254.8), 30 at 21150 (255.3), then the last chunk
    assert [c.tolist() for c in ref_chunks.chunk_rows(tokens)] == [[8], [3], [0], [7], [6, 5], [4, 2, 1]]
    assert ref_chunks.chunk_rows(np.asarray([], dtype=np.int64)) == []
    assert [len(g) for g in ref_cache.batches(np.arange(4), np.asarray([3, 3, 9, 1]), 6, None)] == [2, 1, 1]


def test_a_stopped_pass_keeps_its_finished_chunks_and_the_next_one_computes_the_rest(
    model, accelerator, tmp_path, caplog, monkeypatch
):
    """Four chunks (3, 2, 4 and 4 rows), batches of two: a stop before the fifth forward keeps the first two chunks
    and drops the third (one forward done); the next pass computes the other chunks, once each."""
    from sfm_dpo.preemption import Preempted

    monkeypatch.setattr(ref_chunks, "CHUNKS", 4)
    dataset = make_dataset()
    chunks = ref_chunks.chunk_rows(ref_cache._pair_tokens(dataset))
    assert [len(c) for c in chunks] == [3, 2, 4, 4]
    calls = []
    with pytest.raises(Preempted, match="reference pass"):
        ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                  batch_size=2, should_stop=stopping_after(4, calls))  # fmt: skip
    assert calls == [2, 1, 2, 2]  # two chunks, then two rows of the third
    folder = only_folder(tmp_path)
    assert not (folder / "meta.json").exists()
    kept = chunk_files(folder)
    assert [np.load(f)["rows"].tolist() for f in kept] == [chunks[0].tolist(), chunks[1].tolist()]

    # A damaged chunk (truncated by a crash of its node, written by another job) is set aside; its rows are computed.
    (folder / "chunks" / "00002.npz").write_bytes(kept[0].read_bytes()[:100])
    calls.clear()
    with caplog.at_level("INFO", logger="sfm_dpo"):
        resumed = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                            batch_size=2)  # fmt: skip
    assert sum(calls) == N_ROWS - 5
    assert "5 of 13 rows already computed" in caplog.text and "00002.npz" in caplog.text
    np.testing.assert_allclose(columns(resumed), direct_logps(model, dataset), rtol=1e-5, atol=1e-4)
    assert (folder / "meta.json").exists()
    assert [p.name.split(".damaged-")[0] for p in (folder / "chunks").iterdir()] == ["00002.npz"]  # kept to inspect


def test_chunks_are_on_disk_as_they_finish(model, accelerator, tmp_path):
    """A crash (no signal, no `should_stop`) loses only the chunk being computed: each finished one is a file."""
    dataset = make_dataset()
    seen = []

    def crashing(rows):
        if len(seen) == 3:
            raise KeyboardInterrupt  # a hard stop: nothing after this line of the pass runs
        seen.append(len(rows))
        return ref_cache.completion_logps_padded(model, rows, device="cpu")

    with pytest.raises(KeyboardInterrupt):
        ref_cache.load_or_compute(dataset, crashing, tmp_path, KEY, accelerator, batch_size=2)
    assert sum(len(np.load(f)["rows"]) for f in chunk_files(only_folder(tmp_path))) == 3  # chunks of one row here


def test_two_jobs_started_together_share_one_pass(model, accelerator, tmp_path):
    """Two sweep points on one cache at the same moment: each computes part of the rows (each chunk once, but for
    the one chunk each may take over from the other at the end), and both train on the same values, the direct
    ones."""
    import threading

    dataset = make_dataset(40, seed=2)
    both = threading.Barrier(2)
    computed = [[], []]

    def job(k, out):
        first = [True]

        def compute_fn(rows):
            if first[0]:  # both jobs hold their first chunk before either goes on
                first[0] = False
                both.wait(timeout=60)
            computed[k].extend(rows)
            return ref_cache.completion_logps_padded(model, rows, device="cpu")

        out[k] = columns(ref_cache.load_or_compute(dataset, compute_fn, tmp_path, KEY, accelerator, batch_size=4))

    out = [None, None]
    threads = [threading.Thread(target=job, args=(k, out)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert out[0] is not None and out[1] is not None
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0], direct_logps(model, dataset), rtol=1e-5, atol=1e-4)
    longest_chunk = max(len(c) for c in ref_chunks.chunk_rows(ref_cache._pair_tokens(dataset)))
    assert all(len(c) >= 1 for c in computed) and len(computed[0]) + len(computed[1]) <= 40 + 2 * longest_chunk
    folder = only_folder(tmp_path)
    assert (folder / "meta.json").exists() and not list((folder / "chunks").iterdir())


def test_the_claims_of_a_dead_job_are_computed_not_waited_for(model, accelerator, tmp_path, monkeypatch):
    """Jobs that claimed every chunk between them, finished one and died (no heartbeat: their claims stay): the next
    job computes the other chunks, and only those."""
    monkeypatch.setattr(ref_chunks, "CHUNKS", 4)
    dataset = make_dataset()
    calls = []

    def crashing_after_one_chunk(rows):
        if calls:
            raise KeyboardInterrupt  # in the second chunk, claimed
        return counting_compute_fn(model, calls)(rows)

    with pytest.raises(KeyboardInterrupt):
        ref_cache.load_or_compute(dataset, crashing_after_one_chunk, tmp_path, KEY, accelerator, batch_size=3)
    folder = only_folder(tmp_path)
    board = ref_chunks.ChunkBoard(folder / "chunks", ref_chunks.chunk_rows(ref_cache._pair_tokens(dataset)),
                                  folder.name, "deadjob", 0)  # fmt: skip
    while board.next_chunk() is not None:  # the dead job claims the rest too
        pass
    assert len(list((folder / "chunks").glob("*.claim"))) == 4 and len(chunk_files(folder)) == 1
    calls.clear()
    finished = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), tmp_path, KEY, accelerator,
                                         batch_size=3)  # fmt: skip
    assert sum(calls) == N_ROWS - 3
    np.testing.assert_allclose(columns(finished), direct_logps(model, dataset), rtol=1e-5, atol=1e-4)


def test_two_process_zero2_equals_one_process(model, accelerator, tmp_path):
    """torchrun, 2 ranks, gloo, DeepSpeed ZeRO-2 engine (asserted in the worker): 13 rows. First a signal reaches
    rank 0 only, after its first forward: rank 1 stops at its next batch too, and both raise Preempted, keeping their
    finished chunks; then the requeued pass computes only the rest, the two ranks taking chunks from one board. A cache folder
    that is another folder on each rank is refused."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out), str(cache)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    dataset = make_dataset()
    expected = direct_logps(model, dataset)
    for rank in range(2):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["world_size"] == 2 and result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 2
        assert result["preempted"] == "preempted during reference pass"  # on both ranks, whichever saw the signal
        assert "is not one folder for all ranks" in result["not_shared"]  # refused before any forward, on every rank
    first = [json.loads((out / f"rank{r}.json").read_text())["rows_before_stop"] for r in range(2)]
    second = [json.loads((out / f"rank{r}.json").read_text())["rows_computed"] for r in range(2)]
    # Chunks of one row. Rank 1 stops at its first batch after rank 0 stopped (its second forward waits for that),
    # not at the end of the pass.
    assert first[0] == 1 and first[1] <= 2
    assert sum(second) == N_ROWS - sum(first)  # the rest, each row once
    for rank in range(2):
        result = json.loads((out / f"rank{rank}.json").read_text())
        np.testing.assert_allclose(np.asarray(result["values"]), expected, rtol=1e-5, atol=1e-4)
    one_process = ref_cache.load_or_compute(dataset, counting_compute_fn(model, []), tmp_path / "single", KEY,
                                            accelerator, batch_size=3)  # fmt: skip
    np.testing.assert_allclose(np.asarray(result["values"]), columns(one_process), rtol=1e-6, atol=1e-5)

    # The file the 2-rank pass wrote is a hit for a later 1-process run.
    def must_not_run(rows):
        raise AssertionError("compute_fn called on a cache hit")

    reused = ref_cache.load_or_compute(dataset, must_not_run, cache, KEY, accelerator, batch_size=3)
    np.testing.assert_array_equal(columns(reused), np.asarray(result["values"]))

    # The shards of the preempted 2-rank pass, finished by a job of another world size (1): only the missing rows.
    calls = []
    finished = ref_cache.load_or_compute(dataset, counting_compute_fn(model, calls), out / "stopped_cache", KEY,
                                         accelerator, batch_size=3)  # fmt: skip
    assert sum(calls) == N_ROWS - sum(first)
    np.testing.assert_allclose(columns(finished), expected, rtol=1e-5, atol=1e-4)


def _worker(out: Path, cache: Path) -> None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    PartialState(backend="gloo")  # no CUDA: tell accelerate which backend, DeepSpeed then uses it
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1,
                                           "gradient_accumulation_steps": 1, "train_batch_size": 2})  # fmt: skip
    acc = Accelerator(deepspeed_plugin=plugin)
    policy = build_tiny_model("gpt_neox", VOCAB, seed=0)
    engine, _ = acc.prepare(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3))
    from sfm_dpo.preemption import Preempted

    calls = []
    # The pass runs on the prepared ZeRO-2 engine's module, as it does in training.
    counting = counting_compute_fn(acc.unwrap_model(engine).eval(), calls)

    def compute_fn(rows):
        if acc.process_index == 1 and len(calls) == 1:  # rank 1's second forward ends once rank 0 has stopped
            deadline = time.monotonic() + 20
            while not list(cache.glob("*/chunks/*.stop")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return counting(rows)

    signal_seen = lambda: acc.process_index == 0 and len(calls) >= 1  # noqa: E731 - the signal on rank 0 only
    try:
        ref_cache.load_or_compute(make_dataset(), compute_fn, cache, KEY, acc, batch_size=2, should_stop=signal_seen)
        preempted = None
    except Preempted as e:
        preempted = str(e)
    rows_before_stop = sum(calls)
    acc.wait_for_everyone()
    if acc.is_main_process:  # the shards as a preempted 2-rank job leaves them, for a 1-process job to finish
        shutil.copytree(cache, out / "stopped_cache")
    calls.clear()
    dataset = ref_cache.load_or_compute(make_dataset(), compute_fn, cache, KEY, acc, batch_size=2)
    rows_computed = sum(calls)
    try:  # a cache folder that is not the same folder on every rank, as a node-local one on several nodes
        ref_cache.load_or_compute(
            make_dataset(), compute_fn, out / f"local{acc.process_index}", KEY, acc, batch_size=2
        )
        not_shared = None
    except RuntimeError as e:
        not_shared = str(e)
    result = {
        "world_size": acc.num_processes, "engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
        "preempted": preempted, "rows_before_stop": rows_before_stop, "rows_computed": rows_computed,
        "not_shared": not_shared,
        "values": columns(dataset).tolist(),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
    torch.distributed.destroy_process_group()  # left up, gloo's threads can abort the interpreter's exit
