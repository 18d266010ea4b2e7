"""Run identity: what ties an output folder to the run that made it, the folder of each sweep point, the folder lock,
and the record of how a launch ended (run_status.json)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfm_dpo.config import derive_run_names, make_parser
from sfm_dpo.run_identity import (
    IDENTITY_FILE,
    OWNER_FILE,
    STALE_S,
    FolderLock,
    RunConflict,
    check_identity,
    claim_output_dir,
    run_identity,
)
from sfm_dpo.run_status import RunStatus, final_model_from_checkpoint
from tests.conftest import REPO


def parse(*overrides: str, recipe: str = "think"):
    argv = ["--config", str(REPO / "configs" / f"{recipe}.yaml"), *overrides]
    script_args, training_args, model_args = make_parser().parse_args_and_config([*argv, "--use_cpu", "true"])
    return script_args, training_args, model_args, argv


def identity(*overrides: str, recipe: str = "think") -> dict:
    script_args, training_args, model_args, _ = parse(*overrides, recipe=recipe)
    return run_identity(script_args, training_args, model_args)


def derived(*overrides: str) -> tuple[str, str]:
    _, training_args, _, argv = parse(*overrides)
    derive_run_names(training_args, argv, __import__("logging").getLogger("test"))
    return training_args.output_dir, training_args.hub_model_id


def test_identity_counts_what_changes_the_result_and_nothing_else():
    base = identity()
    assert base == identity()
    for override in (
        ["--learning_rate", "5e-7"], ["--beta", "0.1"], ["--loss_type", "sigmoid"], ["--effective_batch_size", "64"],
        ["--max_length", "4096"], ["--seed", "1"], ["--model_name_or_path", "org/other"],
        ["--dataset_name", "org/data"], ["--dataset_config", "x"], ["--max_prompt_length", "2048"],
    ):  # fmt: skip
        assert identity(*override)["fingerprint"] != base["fingerprint"], override
    for override in (
        ["--max_steps", "10"], ["--num_train_epochs", "2"], ["--logging_steps", "5"], ["--save_steps", "7"],
        ["--save_total_limit", "1"], ["--report_to", "none"], ["--push_to_hub", "false"], ["--hub_model_id", "a/b"],
        ["--output_dir", "elsewhere"], ["--dataloader_num_workers", "0"], ["--per_device_train_batch_size", "2"],
        ["--max_tokens_per_microbatch", "32768"], ["--gradient_checkpointing", "false"], ["--compile_layers", "true"],
    ):  # fmt: skip
        assert identity(*override) == base, override


def test_local_model_and_data_files_are_part_of_the_identity(demo_assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(demo_assets["think"].read_bytes())
    args = ("--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(data))
    first = identity(*args, recipe="demo")
    data.write_bytes(data.read_bytes() + b"\n")  # the same path, other content
    second = identity(*args, recipe="demo")
    assert first["settings"] == second["settings"]
    assert first["content"]["data_files"] != second["content"]["data_files"]
    assert first["content"]["model_files"] == second["content"]["model_files"]
    assert "model.safetensors" in first["content"]["model_files"]


def test_an_edit_inside_a_large_weight_file_is_another_model(tmp_path):
    """One changed tensor in the middle of a 300 MiB weights file (sparse: no disk used) is another model, though the
    file keeps its size and its first and last bytes. A digest of sampled blocks would miss it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    size = 300 * 2**20
    with open(weights, "wb") as f:
        f.truncate(size)
    args = ("--model_name_or_path", str(model))
    folder = str(tmp_path / "run")
    first = identity(*args)
    check_identity(folder, first, record=True)
    with open(weights, "r+b") as f:
        f.seek(size // 64 * 32 + 65536 + 4096)  # between two of 64 evenly spaced 64 KiB blocks
        f.write(b"\x01" * 8)
    assert weights.stat().st_size == size
    second = identity(*args)
    assert second["settings"] == first["settings"]
    assert (
        second["content"]["model_files"]["model.safetensors"] != first["content"]["model_files"]["model.safetensors"]
    )
    with pytest.raises(RunConflict, match="model_files: the files differ from those the folder's run used"):
        check_identity(folder, second, record=True)


def test_file_digests_are_full_xxh3_stored_once_for_the_run_and_the_reference_cache(
    demo_assets, tmp_path, monkeypatch
):
    """The run identity's digests are the reference cache's (`ref_cache.stored_file_digest`): the whole file's xxh3,
    stored per file, so a 7B model's weights are read once for both and not again by the next sweep point."""
    from sfm_dpo import ref_cache

    data = tmp_path / "pairs.jsonl"
    data.write_bytes(demo_assets["think"].read_bytes())
    digests = tmp_path / "ref_cache" / "file_digests"
    read = []
    real = ref_cache.file_digest
    monkeypatch.setattr(ref_cache, "file_digest", lambda path: read.append(Path(path).name) or real(path))
    script_args, training_args, model_args, _ = parse(
        "--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(data), recipe="demo"
    )
    first = run_identity(script_args, training_args, model_args, digest_dir=digests)
    model_files = first["content"]["model_files"]
    assert "model.safetensors" in model_files and "config.json" in model_files
    assert sorted(read) == sorted([*model_files, "pairs.jsonl"])
    assert model_files["model.safetensors"] == real(demo_assets["model"] / "model.safetensors")
    assert first["content"]["data_files"] == {"pairs.jsonl": real(data)}
    assert len(list(digests.glob("*.json"))) == len(read)
    read.clear()
    assert run_identity(script_args, training_args, model_args, digest_dir=digests) == first
    ref_cache.model_identity(str(demo_assets["model"]), None, digest_dir=digests)
    assert read == []  # nothing read again: the next sweep point and the reference cache reuse the stored digests


def test_a_record_with_sampled_digests_is_kept_and_its_files_redigested(demo_assets, tmp_path, caplog):
    """A folder recorded by the version that digested files by sampling (sha256, no "digest" in its content): its run
    continues (the settings are compared, the files cannot be), and its record gets the full digests, compared from
    then on."""
    args = ("--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(demo_assets["think"]))
    current = identity(*args, recipe="demo")
    folder = tmp_path / "run"
    folder.mkdir()
    sampled = {name: "0" * 64 for name in current["content"]["model_files"]}
    old = {**current, "content": {"model_files": sampled, "data_files": {demo_assets["think"].name: "1" * 64}}}
    (folder / IDENTITY_FILE).write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="sfm_dpo.run_identity"):
        claim_output_dir(str(folder), current).release()  # checks the folder twice: before and after the lock
    assert caplog.text.count("digests the files another way (sampled sha256; this version: xxh3_128)") == 1
    assert json.loads((folder / IDENTITY_FILE).read_text())["content"] == current["content"]
    with pytest.raises(RunConflict, match="learning_rate"):
        check_identity(str(folder), identity(*args, "--learning_rate", "1e-5", recipe="demo"), record=True)


def test_a_folder_of_another_run_is_refused_naming_the_settings(tmp_path):
    folder = str(tmp_path / "run")
    check_identity(folder, identity(), record=True)
    check_identity(folder, identity("--max_steps", "10", "--save_steps", "5"), record=True)  # the same run
    with pytest.raises(RunConflict) as refused:
        check_identity(folder, identity("--learning_rate", "5e-7", "--beta", "0.1"), record=True)
    message = str(refused.value)
    assert f"{folder} holds another run" in message
    assert "learning_rate: 1e-06 in the folder, 5e-07 now" in message
    assert "beta: 5.0 in the folder, 0.1 now" in message
    assert "max_steps" not in message and "Pass another --output_dir" in message


def test_sweep_points_get_their_own_folder_and_hub_repo():
    assert derived() == ("outputs/dpo", "geodesic-research/sfm-sft_dolci_think_unfiltered-DPO")
    assert derived("--max_steps", "10", "--logging_steps", "3") == derived()  # not part of the identity
    assert derived("--learning_rate", "1e-6") == derived()  # the recipe's own value
    assert derived("--learning_rate", "5e-7") == (
        "outputs/dpo/learning_rate-5e-07",
        "geodesic-research/sfm-sft_dolci_think_unfiltered-DPO-learning_rate-5e-07",
    )
    assert derived("--learning_rate=5e-7", "--beta", "2")[0] == "outputs/dpo/beta-2.0__learning_rate-5e-07"
    assert derived("--beta", "2", "--learning_rate", "5e-7") == derived("--learning_rate=5e-7", "--beta", "2")
    assert derived("--model_name_or_path", "geodesic-research/sfm-other", "--learning_rate", "2e-6") == (
        "outputs/dpo/sfm-other__learning_rate-2e-06",
        "geodesic-research/sfm-other-DPO-learning_rate-2e-06",
    )
    assert derived("--learning_rate", "5e-7", "--output_dir", "mine")[0] == "mine"  # explicit values win
    assert derived("--learning_rate", "5e-7", "--hub_model_id", "me/x")[1] == "me/x"
    long = derived("--beta", "2", "--seed", "3", "--max_length", "4000")
    assert long[0] == "outputs/dpo/beta-2.0__max_length-4000__seed-3"
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(long[1])


def test_the_launcher_prints_the_sweep_points_folder():
    """scripts/launch.sh's probe asks the same function (derive_run_names), before anything is launched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["VENV"] = str(Path(sys.executable).parents[1])
    env["GPUS_PER_NODE"] = "4"  # a dry run as on a GPU node
    result = subprocess.run(
        ["bash", "scripts/launch.sh", "--dry-run", "think", "--learning_rate", "5e-7"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "output_dir outputs/dpo/learning_rate-5e-07" in result.stdout


HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from sfm_dpo.run_identity import FolderLock
lock = FolderLock({folder!r}).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_job_holds_the_folder_and_a_dead_one_does_not(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(repo=str(REPO), folder=folder)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SLURM_JOB_ID": "4242"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunConflict) as refused:
            FolderLock(folder).acquire()
        message = str(refused.value)
        assert f"{folder} is in use by Slurm job 4242 on host {socket.gethostname()} (pid {holder.pid}" in message
        assert "scancel 4242" in message
    finally:
        holder.kill()
        holder.wait()
    # Killed: the flock died with it, and its record does not block this host.
    lock = FolderLock(folder).acquire()
    assert json.loads((tmp_path / "run" / OWNER_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / OWNER_FILE).exists()


def test_a_requeued_job_outwaits_the_lock_of_its_dead_life(tmp_path, monkeypatch, caplog):
    """On NFS a dead node's lock lingers until its lease expires: a later life of the same Slurm job (a requeue after
    a node failure) waits for it, then goes on, rather than end the requeue chain."""
    import sfm_dpo.run_identity as run_identity_module

    folder = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(repo=str(REPO), folder=folder)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SLURM_JOB_ID": "99"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "99")
        monkeypatch.setattr(run_identity_module, "STALE_S", 1)
        with caplog.at_level("INFO", logger="sfm_dpo.run_identity"):
            FolderLock(folder).acquire().release()
        assert "still locked by an earlier life of this job (Slurm job 99" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_the_heartbeat_guards_filesystems_whose_locks_stay_on_one_node(tmp_path, monkeypatch):
    """flock succeeds here, as it does on another node of a filesystem with node-local locks: a fresh record from
    another host refuses, a stale one or one of this very Slurm job (a requeue) does not."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    folder = tmp_path / "run"
    folder.mkdir()

    def record(age_s: float, job_id: str | None) -> None:
        owner = {"host": "node-b", "pid": 1, "job_id": job_id, "started": 0, "heartbeat": time.time() - age_s}
        (folder / OWNER_FILE).write_text(json.dumps(owner))

    record(age_s=30, job_id="77")
    with pytest.raises(RunConflict, match="Slurm job 77 on host node-b .* heartbeat is 30 s old"):
        FolderLock(str(folder)).acquire()
    record(age_s=STALE_S + 1, job_id="77")
    FolderLock(str(folder)).acquire().release()
    record(age_s=30, job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    FolderLock(str(folder)).acquire().release()


def test_claim_checks_identity_before_the_lock(tmp_path):
    folder = str(tmp_path / "run")
    lock = claim_output_dir(folder, identity())
    try:
        assert json.loads((tmp_path / "run" / IDENTITY_FILE).read_text())["fingerprint"] == identity()["fingerprint"]
        with pytest.raises(RunConflict, match="holds another run"):  # named for what it is, though it is locked too
            claim_output_dir(folder, identity("--seed", "7"))
        with pytest.raises(RunConflict, match="is in use by"):
            claim_output_dir(folder, identity())
    finally:
        lock.release()


def test_stages_are_done_only_at_the_step_they_were_recorded(tmp_path):
    status = RunStatus(tmp_path, write=True)
    status.enter("save")
    status.record("save", 6)
    status.enter("push")
    status.end("failed", "Push to a/b failed")
    saved = json.loads((tmp_path / "run_status.json").read_text())
    assert (saved["state"], saved["stage"], saved["message"]) == ("failed", "push", "Push to a/b failed")
    again = RunStatus(tmp_path, write=False)  # the next launch, any rank
    assert again.done("save", 6) and not again.done("save", 8) and not again.done("push", 6)
    status.record("push", 6, repo="a/b")
    assert RunStatus(tmp_path, write=False).done("push", 6, repo="a/b")
    assert not RunStatus(tmp_path, write=False).done("push", 6, repo="a/c")  # another repo is pushed again


def test_the_final_model_from_a_checkpoint_is_weights_config_and_tokenizer(tmp_path):
    checkpoint, out = tmp_path / "checkpoint-6", tmp_path
    checkpoint.mkdir()
    names = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "trainer_state.json", "training_args.bin", "optimizer.pt", "rng_state_0.pth",
             "scheduler.pt", "latest", "zero_to_fp32.py", "COMPLETE"]  # fmt: skip
    for name in names:
        (checkpoint / name).write_text(name)
    (checkpoint / "global_step6").mkdir()
    copied = final_model_from_checkpoint(checkpoint, out)
    assert copied == sorted(names[:6])
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted([*names[:7]])
    assert (out / "model.safetensors").read_text() == "model.safetensors"
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        final_model_from_checkpoint(checkpoint, out)
