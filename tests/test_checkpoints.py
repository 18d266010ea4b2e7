"""Atomic checkpoints: the completion marker, resume picking the newest complete one, rotation only after it.

`tiny_trainer` (also used by test_nonfinite.py and test_preemption.py) is a plain transformers Trainer with our mixins
on a tiny random GPT-NeoX causal LM, single process, fp32 on the CPU: seconds per run.
"""

import json

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
