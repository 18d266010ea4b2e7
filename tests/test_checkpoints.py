"""Atomic checkpoints: the completion marker, resume picking the newest complete one, rotation only after it.

`tiny_trainer` (also used by test_nonfinite.py and test_preemption.py) is a plain transformers Trainer with our mixins
on a tiny random GPT-NeoX causal LM, single process, fp32 on the CPU: seconds per run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from sfm_dpo import checkpoints
from sfm_dpo.checkpoints import (
    MARKER,
    AtomicCheckpointMixin,
    finished_training,
    is_complete,
    latest_complete_checkpoint,
    mark_complete,
)
from sfm_dpo.nonfinite import NonFiniteGuardMixin
from sfm_dpo.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
# Not gpt_neox: transformers 5.24 resumes a plain-Trainer (non-DeepSpeed) GPT-NeoX checkpoint without its head
# ("missing keys: lm_head.weight, unexpected: embed_out.weight"); under DeepSpeed the engine loads its own state.
ARCH = "llama"


class GuardedTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, Trainer):
    """The bases SFMDPOTrainer gets in train_dpo.py, on a plain Trainer."""


def tiny_dataset(n: int = 64, length: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def tiny_trainer(output_dir, trainer_cls=GuardedTrainer, callbacks=(), trainer_kwargs=None, **overrides) -> Trainer:
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return trainer_cls(
        model=build_tiny_model(ARCH, VOCAB, seed=0),
        args=TrainingArguments(**args),
        train_dataset=tiny_dataset(),
        callbacks=list(callbacks),
        **(trainer_kwargs or {}),
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_marker_decides_which_checkpoint_is_resumed(tmp_path):
    for step in (2, 4, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert latest_complete_checkpoint(tmp_path) is None
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    mark_complete(tmp_path / "checkpoint-2")
    mark_complete(tmp_path / "checkpoint-4")
    # checkpoint-10 is newer but half-written (no marker): numeric order, not string order ("10" < "4").
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert json.loads((tmp_path / "checkpoint-4" / MARKER).read_text())["step"] == 4
    assert not (tmp_path / "checkpoint-4" / f".{MARKER}.tmp").exists()


def test_trainer_marks_rotates_and_never_keeps_a_broken_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # Left by an earlier life of the job killed while saving: a future step, no marker.
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_text("half")
    trainer = tiny_trainer(out, save_total_limit=1, max_steps=6)
    trainer.train()
    # Rotation kept one complete checkpoint, the new checkpoint-6 replaced the broken one and vouches for itself.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert is_complete(out / "checkpoint-6")
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


class KilledWhileSaving(GuardedTrainer):
    """Dies in the middle of the checkpoint at step `kill_at`: model and optimizer written, RNG and state not."""

    kill_at = 4

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.kill_at:
            raise KeyboardInterrupt("killed while saving")
        super()._save_rng_state(output_dir)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = tiny_trainer(out, trainer_cls=KilledWhileSaving, save_total_limit=1, max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # transformers alone would resume from the half-written folder; we take the complete one.
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert not is_complete(out / "checkpoint-4")
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_resume_from_complete_checkpoint_matches_uninterrupted_run(tmp_path):
    reference = tiny_trainer(tmp_path / "ref", max_steps=6)
    reference.train()
    expected = weights(reference.model)

    killed = tiny_trainer(tmp_path / "run", trainer_cls=KilledWhileSaving, max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = tiny_trainer(tmp_path / "run", max_steps=6)
    checkpoint = latest_complete_checkpoint(tmp_path / "run")
    assert checkpoint.endswith("checkpoint-2")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 6
    got = weights(resumed.model)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_finished_training_reads_the_state_against_the_request(tmp_path):
    def state(name, **fields):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps(fields))
        return folder

    last = state("checkpoint-6", global_step=6, max_steps=6, num_train_epochs=1)
    assert finished_training(last, max_steps=6, num_train_epochs=1)
    assert not finished_training(last, max_steps=8, num_train_epochs=1)  # extended: resume it
    assert finished_training(last, max_steps=-1, num_train_epochs=1)  # epoch-based, same plan
    assert not finished_training(last, max_steps=-1, num_train_epochs=2)  # more epochs asked
    middle = state("checkpoint-3", global_step=3, max_steps=6, num_train_epochs=1)
    assert not finished_training(middle, max_steps=-1, num_train_epochs=1)
    assert not finished_training(tmp_path / "no-state", max_steps=6, num_train_epochs=1)


def test_a_damaged_complete_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    """A crash after the marker (or a bad copy) can leave a COMPLETE checkpoint with a truncated file: resume takes the
    previous checkpoint, with a warning naming the damaged one and the file."""
    out = tmp_path / "run"
    tiny_trainer(out, max_steps=4, save_steps=2, save_total_limit=2).train()
    record = json.loads((out / "checkpoint-4" / MARKER).read_text())
    assert record["world_size"] == 1
    assert record["files"]["trainer_state.json"]["sampled"] is None  # small: digested whole
    sizes = {name: (out / "checkpoint-4" / name).stat().st_size for name in record["files"]}
    assert {name: entry["bytes"] for name, entry in record["files"].items()} == sizes
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-4")

    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: sizes["optimizer.pt"] // 2])
    with caplog.at_level("WARNING", logger="sfm_dpo.checkpoints"):
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert f"Skipping checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert f"optimizer.pt has {sizes['optimizer.pt'] // 2} bytes, {sizes['optimizer.pt']} were saved" in caplog.text

    (out / "checkpoint-2" / "rng_state.pth").unlink()  # both damaged: a fresh start rather than a broken resume
    assert latest_complete_checkpoint(out) is None


def test_manifest_digests_small_files_whole_and_large_ones_at_both_ends(tmp_path, monkeypatch):
    """Above WHOLE_DIGEST_BYTES only the first and last SAMPLE_BYTES are digested: a zero-filled tail (unwritten
    extents after a crash) is caught, a changed byte in the middle of a large file is not (the sizes still match)."""
    monkeypatch.setattr(checkpoints, "WHOLE_DIGEST_BYTES", 1 << 16)
    monkeypatch.setattr(checkpoints, "SAMPLE_BYTES", 1 << 12)
    folder = tmp_path / "checkpoint-1"
    (folder / "global_step1").mkdir(parents=True)
    big, small = folder / "global_step1" / "shard.pt", folder / "state.json"
    big.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    small.write_bytes(b"x" * 1000)
    mark_complete(folder)
    assert checkpoints.verify(folder) == []

    def poke(path, offset, value):
        data = bytearray(path.read_bytes())
        data[offset] = value
        path.write_bytes(bytes(data))

    poke(small, 500, ord("y"))
    assert checkpoints.verify(folder) == ["state.json differs from what was saved (its content, sha256)"]
    poke(small, 500, ord("x"))
    poke(big, len(big.read_bytes()) // 2, 0)  # not sampled
    assert checkpoints.verify(folder) == []
    poke(big, len(big.read_bytes()) - 10, 0)
    assert checkpoints.verify(folder) == [
        "global_step1/shard.pt differs from what was saved (its first and last 4096 bytes, sha256)"
    ]


KILL_RANKS = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import torch
from transformers import TrainerCallback
from sfm_dpo.checkpoints import MARKER, latest_complete_checkpoint
from tests.test_checkpoints import GuardedTrainer, tiny_trainer, weights

out, mode, rank = Path(sys.argv[1]), sys.argv[2], int(os.environ["RANK"])
fsynced = []  # [path, whether its checkpoint had the marker at that moment]
real_fsync = os.fsync
def recording_fsync(fd):
    path = Path(os.readlink(f"/proc/self/fd/{fd}"))
    folder = next((p for p in [path, *path.parents] if p.name.startswith("checkpoint-")), None)
    fsynced.append([str(path), folder is not None and (folder / MARKER).exists()])
    real_fsync(fd)
os.fsync = recording_fsync

class KillRankOneWhileSaving(GuardedTrainer):
    def _save_rng_state(self, output_dir):  # model and this rank's ZeRO shard written, RNG and state not
        if mode == "kill" and rank == 1 and self.state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)

class Probe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if rank == 0 and 3 <= state.global_step <= 6:
            torch.save(weights(model), out / f"{mode}-weights-{state.global_step}.pt")
    def on_save(self, args, state, control, **kwargs):
        (out / f"{mode}-fsync{rank}.json").write_text(json.dumps(fsynced))

checkpoint = latest_complete_checkpoint(out / "run") if mode == "resume" else None
trainer = tiny_trainer(
    out / "run", trainer_cls=KillRankOneWhileSaving, callbacks=[Probe()], max_steps=8, save_steps=2, save_total_limit=3
)
trainer.train(resume_from_checkpoint=checkpoint)
(out / f"{mode}-rank{rank}.json").write_text(json.dumps({"checkpoint": checkpoint, "step": trainer.state.global_step}))
torch.distributed.destroy_process_group()  # left up, gloo's threads can abort the interpreter's exit
"""


def _launch_two_ranks(script, out: Path, mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would turn DeepSpeed off
    with socket.socket() as s:  # other test sessions may share this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
            str(script), str(out), mode, str(REPO),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def killed_while_saving(tmp_path_factory):
    """2 DeepSpeed ZeRO-2 ranks (accelerate launch, gloo on the CPU) checkpoint at steps 2 and 4; rank 1 is killed
    (SIGKILL) in the middle of the save of step 6. A copy of checkpoint-2 is kept aside for the world-size tests."""
    out = tmp_path_factory.mktemp("killed")
    script = out / "ranks.py"
    script.write_text(KILL_RANKS)
    result = _launch_two_ranks(script, out, "kill")
    shutil.copytree(out / "run" / "checkpoint-2", out / "saved-by-2-ranks" / "checkpoint-2")
    return out, script, result


def test_every_rank_fsyncs_its_files_before_the_marker(killed_while_saving):
    out, _, _ = killed_while_saving
    checkpoint = out / "run" / "checkpoint-4"
    files = json.loads((checkpoint / MARKER).read_text())["files"]
    assert json.loads((checkpoint / MARKER).read_text())["world_size"] == 2
    written_by = {
        0: ["model.safetensors", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_0.pth"],
        1: ["global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_1.pth"],
    }
    for rank, names in written_by.items():
        fsynced = {path: marked for path, marked in json.loads((out / f"kill-fsync{rank}.json").read_text())}
        for name in names:
            assert name in files, name
            path = str(checkpoint / name)
            assert path in fsynced and not fsynced[path], (rank, name)  # flushed, and before the marker existed
        assert str(checkpoint / "global_step4") in fsynced and str(checkpoint) in fsynced  # the folders, too


def test_kill_9_of_one_rank_while_saving_then_resume_skips_the_broken_checkpoints(killed_while_saving):
    """The killed save (step 6) has no marker; checkpoint-4, complete, then gets a truncated ZeRO shard (a node crash
    in the write-back window): the resumed job takes checkpoint-2 and retrains steps 3-6 to the very weights of the
    first job."""
    out, script, killed = killed_while_saving
    log = killed.stdout + killed.stderr
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert (out / "run" / "checkpoint-6").is_dir() and not is_complete(out / "run" / "checkpoint-6")
    assert is_complete(out / "run" / "checkpoint-4")
    shard = out / "run" / "checkpoint-4" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    resumed = _launch_two_ranks(script, out, "resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    assert f"Skipping checkpoint {out / 'run' / 'checkpoint-4'}" in log and "zero_pp_rank_1_mp_rank_00" in log
    for rank in (0, 1):
        got = json.loads((out / f"resume-rank{rank}.json").read_text())
        assert got == {"checkpoint": str(out / "run" / "checkpoint-2"), "step": 8}, got
    for step in (3, 4, 5, 6):
        first, again = torch.load(out / f"kill-weights-{step}.pt"), torch.load(out / f"resume-weights-{step}.pt")
        for name in first:
            assert torch.equal(again[name], first[name]), (step, name)
    assert [p.name for _, p in checkpoints._checkpoints(out / "run")] == [
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert all(checkpoints.verify(p) == [] for _, p in checkpoints._checkpoints(out / "run"))


def test_a_resume_at_another_world_size_is_refused_before_loading(killed_while_saving, tmp_path):
    out, _, _ = killed_while_saving
    saved = out / "saved-by-2-ranks" / "checkpoint-2"
    assert checkpoints.checkpoint_world_size(saved) == 2
    checkpoints.check_world_size(saved, 2)
    with pytest.raises(RuntimeError, match=r"saved by 2 processes .* this job runs 1\. .* Resume with 2 processes"):
        checkpoints.check_world_size(saved, 1)
    # A checkpoint whose marker does not record it: counted from the ZeRO shards.
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(saved, copy)
    record = json.loads((copy / MARKER).read_text())
    (copy / MARKER).write_text(json.dumps({**record, "world_size": None}))
    assert checkpoints.checkpoint_world_size(copy) == 2
    # A plain (not DeepSpeed) checkpoint resumes at any world size.
    plain = tmp_path / "plain"
    tiny_trainer(plain, max_steps=2, save_steps=2).train()
    checkpoints.check_world_size(plain / "checkpoint-2", 4)


def test_train_dpo_refuses_another_world_size_before_loading_anything(killed_while_saving, demo_assets, tmp_path):
    """train_dpo.py as one process on an output folder whose checkpoint 2 DeepSpeed ranks saved: a clear error at
    start-up, before the data preparation and the model load (DeepSpeed would fail only inside its checkpoint load)."""
    out, _, _ = killed_while_saving
    output_dir = tmp_path / "run"
    shutil.copytree(out / "saved-by-2-ranks" / "checkpoint-2", output_dir / "checkpoint-2")
    result = subprocess.run(
        [
            sys.executable, "train_dpo.py", "--config", "configs/demo.yaml",
            "--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(demo_assets["think"]),
            "--output_dir", str(output_dir),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert f"Cannot resume from {output_dir / 'checkpoint-2'}: it was saved by 2 processes" in log, log[-3000:]
    assert "this job runs 1" in log and "Resume with 2 processes" in log
    assert "B parameters" not in log and not (output_dir / "data_report.json").exists()


def test_a_new_checkpoint_that_does_not_read_back_keeps_the_previous_one(tmp_path, monkeypatch):
    """The previous checkpoint is rotated away only once the new one matches its manifest: a read-back failure
    (injected: the filesystem is assumed to have lost a file) unmarks the new one, keeps the old, and stops the run."""
    out = tmp_path / "run"
    real_verify = checkpoints.verify
    monkeypatch.setattr(
        checkpoints, "verify", lambda c: ["optimizer.pt is missing"] if str(c).endswith("-4") else real_verify(c)
    )
    with pytest.raises(RuntimeError, match=r"checkpoint-4 does not read back as written"):
        tiny_trainer(out, max_steps=6, save_steps=2, save_total_limit=1).train()
    assert not is_complete(out / "checkpoint-4")
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")


def test_a_closing_stage_is_recorded_only_once_the_files_are_on_disk(tmp_path, monkeypatch):
    """run_status.json says "save" done only after every file of the final model (the trainer's save, or the copy
    from the final checkpoint) and the folder are fsynced: after a node crash (no kill: power, kernel) the record
    could otherwise outlive truncated weights, and the next launch would push them. The checkpoints, made durable
    when they were marked complete, are not read again."""
    from sfm_dpo.run_status import STATUS_FILE, RunStatus, final_model_from_checkpoint

    trainer = tiny_trainer(tmp_path / "run", max_steps=2, save_steps=2)
    trainer.train()
    out = tmp_path / "run"
    trainer.save_model(str(out))
    trainer.save_state()
    fsynced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        recorded = path.name.startswith(f"{STATUS_FILE}.") and "save" in json.loads(path.read_text())["stages"]
        fsynced.append((path, recorded))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    RunStatus(out, write=True).record("save", 2)
    first_record = next(k for k, (_, recorded) in enumerate(fsynced) if recorded)
    before = {path for path, _ in fsynced[:first_record]}
    final_files = {p for p in out.iterdir() if p.is_file() and p.name != STATUS_FILE}
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= {p.name for p in final_files}
    assert final_files <= before and out in before, sorted(map(str, final_files - before))
    assert not [path for path, _ in fsynced if "checkpoint-2" in path.parts]
    assert json.loads((out / STATUS_FILE).read_text())["stages"]["save"]["step"] == 2

    # The copy from the final checkpoint (the save of an earlier launch never happened), then its record.
    copy = tmp_path / "copy"
    copy.mkdir()
    fsynced.clear()
    names = final_model_from_checkpoint(out / "checkpoint-2", copy)
    RunStatus(copy, write=True).record("save", 2, source="checkpoint-2")
    first_record = next(k for k, (_, recorded) in enumerate(fsynced) if recorded)
    assert {copy / name for name in [*names, "trainer_state.json"]} <= {path for path, _ in fsynced[:first_record]}
