"""The real thing on the CPU: scripts/launch.sh -> accelerate launch (2 processes) -> DeepSpeed ZeRO-2 -> train_dpo.py,
in bf16 as on the GPUs (the Trainer casts floating inputs to the DeepSpeed dtype: it once rounded the cached reference
log-probs to bf16, and step 1 was 0.6877 here, 0.7186 at 6.86B on H100s, instead of ln 2).

One run trains, checkpoints, saves and then fails its Hub push (the Hub is offline here): the local model stays and the
exit code and run_status.json say so. The same command again trains nothing and retries only the push. A run raised to
more steps resumes from the newest complete checkpoint; its final save fails (a folder in the way of model.safetensors,
as a kill or a full disk would) and the next launch saves the final checkpoint's weights as the final model. Fake
secrets are in the environment the whole time and must appear in no log and no file (trl test_dpo_trainer::test_train,
torchtune recipe tests). A sweep of two learning rates without --output_dir trains two folders at once, while a second
job in one of them and another run pointed at it are refused.
"""

import base64
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

SECRETS = {"HF_TOKEN": "hf_TESTSECRETtoken123456", "WANDB_API_KEY": "wandbTESTSECRETkey987654"}


def launch(demo_assets, output_dir: Path, *extra: str, hub: str | None = None) -> subprocess.CompletedProcess:
    """`hub`: the endpoint of a local Hub (`local_hub`) to push to; without it the Hub is offline."""
    env = {**os.environ, **SECRETS, "HF_HUB_OFFLINE": "1", "CPU_PROCESSES": "2"}
    if hub:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub)
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    cmd = [
        "bash", "scripts/launch.sh", "demo",
        "--model_name_or_path", str(demo_assets["model"]), "--dataset_name", str(demo_assets["think"]),
        "--output_dir", str(output_dir), "--max_train_samples", "96", "--save_steps", "3",
        "--bf16", "true", "--dtype", "bfloat16", "--dataloader_num_workers", "2", *extra,  # as the GPU recipes
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def status_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_status.json").read_text())


@pytest.fixture(scope="module")
def first_run(demo_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("e2e") / "run"
    result = launch(
        demo_assets, output_dir, "--max_steps", "6", "--push_to_hub", "true", "--hub_model_id", "test-org/tiny-DPO"
    )
    return output_dir, result


def test_trains_under_deepspeed_zero2_and_saves(first_run, demo_assets):
    output_dir, result = first_run
    log = result.stdout + result.stderr
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["deepspeed_zero_stage"] == 2, log[-3000:]
    assert summary["world_size"] == 2
    assert summary["global_step"] == 6
    # The fast path's cached reference log-probs equal the training forward's: the policy starts as the reference, so
    # the first logged loss (steps 1-2; the warm-up's first step has learning rate 0) is ln 2 and the margins 0.
    first_loss, last_loss = summary["first_and_last"]["loss"]
    assert first_loss == pytest.approx(math.log(2), abs=1e-4)
    assert summary["first_and_last"]["rewards_norm/margins"][0] == pytest.approx(0.0, abs=1e-4)
    assert last_loss < first_loss
    for name in (
        "model.safetensors",
        "tokenizer_config.json",
        "run_config.yaml",
        "data_report.json",
        "trainer_state.json",
    ):
        assert (output_dir / name).exists(), name
    assert (output_dir / "checkpoint-6" / "COMPLETE").exists()
    assert json.loads((output_dir / "run_identity.json").read_text())["settings"]["beta"] == 5.0
    # The run identity's file digests (the data's too) are stored with the reference pass's: weights read once.
    digests = (output_dir.parent / "ref_cache" / "file_digests").glob("*.json")
    stored = {json.loads(p.read_text())["path"] for p in digests}
    assert {str(demo_assets["think"].resolve()), str((demo_assets["model"] / "model.safetensors").resolve())} <= stored
    # What a ZeRO-2 bf16 checkpoint holds per parameter, the disk check's figure (sfm_dpo/preflight.py): the bf16
    # safetensors, DeepSpeed's bf16 module states and the 2 ranks' fp32 master weights + Adam moments.
    from sfm_dpo.preflight import CHECKPOINT_BYTES_PER_PARAM, count_parameters

    checkpoint = output_dir / "checkpoint-6"
    weights = [checkpoint / "model.safetensors", *(checkpoint / "global_step6").glob("*.pt")]
    per_param = sum(p.stat().st_size for p in weights) / count_parameters(str(demo_assets["model"]))
    assert CHECKPOINT_BYTES_PER_PARAM <= per_param < CHECKPOINT_BYTES_PER_PARAM + 1.5, per_param  # + pickle headers
    before = load_file(demo_assets["model"] / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "training did not change the parameters"


def test_failed_push_keeps_the_model_and_fails_the_run(first_run):
    output_dir, result = first_run
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Push to test-org/tiny-DPO failed" in log
    assert f"The model is saved in {output_dir}" in log
    assert (output_dir / "model.safetensors").exists()
    status = status_of(output_dir)
    assert (status["state"], status["stage"]) == ("failed", "push"), status
    assert status["stages"]["save"]["step"] == status["stages"]["summary"]["step"] == 6
    assert "FAILED" in log and "DONE" not in log


def _no_secret_anywhere(output_dir: Path, *results: subprocess.CompletedProcess) -> None:
    """Every byte of every file under the output folder (training_args.bin and the weights included) and the logs."""
    files = [p for p in output_dir.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and len(files) > 20
    blobs = [p.read_bytes() for p in files] + [(r.stdout + r.stderr).encode() for r in results]
    for value in SECRETS.values():
        assert not any(value.encode() in blob for blob in blobs), value


def test_no_secret_in_any_log_or_file(first_run):
    output_dir, result = first_run
    _no_secret_anywhere(output_dir, result)


def test_a_failed_push_is_retried_without_training(first_run, demo_assets):
    """The same command again (the user's retry, or a requeue): nothing is trained, the final model is not saved again,
    only the push is tried again (and fails again: the Hub is offline here)."""
    output_dir, first = first_run
    final = (output_dir / "model.safetensors").stat().st_mtime_ns
    result = launch(
        demo_assets, output_dir, "--max_steps", "6", "--push_to_hub", "true", "--hub_model_id", "test-org/tiny-DPO"
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "is at the last step of this training: nothing to train" in log
    assert "Resuming from" not in log and "Reference log-probs" not in log
    assert (
        "Pushing the final model of step 6 to test-org/tiny-DPO" in log and "Push to test-org/tiny-DPO failed" in log
    )
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == final
    assert not (output_dir / "checkpoint-7").exists()
    assert (status_of(output_dir)["state"], status_of(output_dir)["stage"]) == ("failed", "push")
    _no_secret_anywhere(output_dir, first, result)


class _LocalHub(http.server.BaseHTTPRequestHandler):
    """Stands in for the Hub on 127.0.0.1, speaking the part of its HTTP API that huggingface_hub's create_commit
    uses: whoami, repo creation, model card validation, preupload (every file as a regular git blob, so no LFS or Xet
    transfer) and the ndjson commit, whose files it records (server.files: path -> bytes)."""

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/api/whoami-v2"):
            return self._reply({"name": "test-org", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        self.send_error(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            return self._reply({"url": f"http://{self.headers['Host']}/{repo['organization']}/{repo['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(body)["files"]]  # fmt: skip
            return self._reply({"files": files})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            return self._reply(
                {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40}
            )
        self.send_error(404)


@pytest.fixture
def local_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LocalHub)
    server.files = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_rerun_pushes_what_a_failed_push_left(first_run, demo_assets, local_hub):
    """The Hub reachable again: the same command trains nothing and pushes the final model; the upload holds the
    model, tokenizer, card, summaries, held-out split and run report (report.md and its plots) only, and no secret."""
    output_dir, _ = first_run
    result = launch(
        demo_assets, output_dir, "--max_steps", "6", "--push_to_hub", "true", "--hub_model_id", "test-org/tiny-DPO",
        hub=f"http://127.0.0.1:{local_hub.server_address[1]}",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "nothing to train" in log and "Pushed to" in log and "DONE" in log
    status = status_of(output_dir)
    assert (status["state"], status["stages"]["push"]["repo"], status["stages"]["push"]["step"]) == (
        "done", "test-org/tiny-DPO", 6,
    )  # fmt: skip
    plots = {f"plots/{p.name}" for p in (output_dir / "plots").glob("*.png")}
    assert {"plots/loss.png", "plots/margins.png", "plots/learning_rate.png"} <= plots  # the run report's figures
    assert set(local_hub.files) == {
        "README.md", "chat_template.jinja", "config.json", "data_report.json", "generation_config.json",
        "model.safetensors", "run_summary.json", "tokenizer.json", "tokenizer_config.json", "eval_split.json",
        "report.md", "plots/report_data.json", *plots,
    }  # fmt: skip
    for name in ("model.safetensors", "report.md", "plots/loss.png", "eval_split.json"):
        assert local_hub.files[name] == (output_dir / name).read_bytes(), name
    assert "![loss](plots/loss.png)" in local_hub.files["report.md"].decode()  # the links resolve on the Hub
    for value in SECRETS.values():
        assert not any(value.encode() in blob for blob in local_hub.files.values())


def test_resumes_from_the_newest_complete_checkpoint(first_run, demo_assets):
    """Raising --max_steps continues the run. Its final save then fails (a folder where model.safetensors goes, as a
    kill or a full disk would leave it): checkpoint-8 is complete, the final model is not."""
    output_dir, _ = first_run
    (output_dir / "model.safetensors").unlink()
    (output_dir / "model.safetensors").mkdir()
    result = launch(demo_assets, output_dir, "--max_steps", "8", "--save_steps", "4")  # a checkpoint at the last step
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert f"Resuming from {output_dir}/checkpoint-6" in log
    assert (output_dir / "checkpoint-8" / "COMPLETE").exists()
    status = status_of(output_dir)
    assert (status["state"], status["stage"]) == ("failed", "save"), status
    assert "Is a directory" in status["message"]


def test_the_next_launch_finishes_an_interrupted_final_save(first_run, demo_assets):
    """The run is at its last step but its final save never happened (as after a USR1 in the last step, a kill
    while saving, or a requeue after a node failure): the same command trains nothing (the Trainer would resume
    checkpoint-8 and run step 9 of 8) and saves checkpoint-8's weights as the final model, then the summary."""
    output_dir, _ = first_run
    (output_dir / "model.safetensors").rmdir()  # the obstacle gone
    result = launch(demo_assets, output_dir, "--max_steps", "8", "--save_steps", "4")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "is at the last step of this training: nothing to train" in log
    assert "The final save of step 8 had not happened" in log and "DONE" in log
    final, checkpoint = (
        load_file(output_dir / "model.safetensors"),
        load_file(output_dir / "checkpoint-8" / "model.safetensors"),
    )
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 8
    assert json.loads((output_dir / "run_summary.json").read_text())["global_step"] == 8
    assert (output_dir / "tokenizer_config.json").exists() and (output_dir / "README.md").exists()
    assert not (output_dir / "checkpoint-9").exists()
    status = status_of(output_dir)
    assert (status["state"], status["stages"]["save"]["step"], status["stages"]["save"]["source"]) == (
        "done", 8, str(output_dir / "checkpoint-8"),
    )  # fmt: skip


def test_compiled_layers_under_gradient_checkpointing(held_out_run):
    """--compile_layers with gradient checkpointing under DeepSpeed (2 processes; tests/conftest.py's run to its end,
    whose held-out figures tests/test_report.py recomputes eagerly): the reference pass and the training forward run
    the compiled layers, the checkpoint stays eager around them, and step 1 is ln 2 (float32, so that only the kernels
    could differ)."""
    output_dir, log = held_out_run
    assert "Compiled the forward of 2 decoder layers (GPTNeoXLayer)" in log
    assert "gradient_checkpointing: true" in (output_dir / "run_config.yaml").read_text()
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 6  # 81 training pairs, 16 per step
    first_loss, last_loss = summary["first_and_last"]["loss"]  # steps 1 and 6 (step 1 is the warm-up's, at lr 0)
    assert first_loss == pytest.approx(math.log(2), abs=1e-5)
    assert last_loss < first_loss


def _accelerate(recipe: Path, *args: str) -> subprocess.Popen:
    """`accelerate launch` of 2 processes as scripts/launch.sh starts it on the CPU, with a recipe of the test's own
    (launch.sh takes recipes from configs/ only, and the sweep's folders derive from the recipe's output_dir)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SECRETS, HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
        "--num_machines", "1", "--num_processes", "2", "--machine_rank", "0", "--main_process_port", str(port),
        "train_dpo.py", "--config", str(recipe), *args,
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def sweep(demo_assets, tmp_path_factory):
    """Two sweep points of the learning rate, one command each and no --output_dir, run at once. While the first
    holds its folder (its rank 0 stopped right after taking it), a second job of the same run and another run pointed
    at that folder start and are refused."""
    root = tmp_path_factory.mktemp("sweep")
    recipe = root / "recipe.yaml"
    text = (REPO / "configs" / "demo.yaml").read_text()
    for key, value in (("model_name_or_path", demo_assets["model"]), ("dataset_name", demo_assets["think"]),
                       ("output_dir", root / "dpo")):  # fmt: skip
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines())
    recipe.write_text(text + "\nmax_train_samples: 64\n")  # in the recipe: on the command line it names the folder
    common = ("--max_steps", "4", "--save_steps", "100", "--logging_steps", "1")
    start = time.monotonic()
    first = _accelerate(recipe, *common, "--learning_rate", "1e-3")
    second = _accelerate(recipe, *common, "--learning_rate", "2e-3")
    folder = root / "dpo" / "learning_rate-0.001"
    try:
        _wait_for(folder / "run_identity.json", first)  # written last when a job takes a folder
        holder = json.loads((folder / "run_owner.json").read_text())
        os.kill(holder["pid"], signal.SIGSTOP)
        try:
            again = _accelerate(recipe, *common, "--learning_rate", "1e-3")
            other = _accelerate(recipe, *common, "--learning_rate", "2e-3", "--output_dir", str(folder))
            refused = {"again": again.communicate(timeout=300)[0], "other": other.communicate(timeout=300)[0]}
            codes = {"again": again.returncode, "other": other.returncode}
        finally:
            os.kill(holder["pid"], signal.SIGCONT)
        logs = {"first": first.communicate(timeout=600)[0], "second": second.communicate(timeout=600)[0]}
    finally:
        for process in (first, second):
            process.kill()
    codes.update(first=first.returncode, second=second.returncode)
    print(f"sweep: {time.monotonic() - start:.0f} s")
    return root / "dpo", holder, {**logs, **refused}, codes


def test_a_sweep_without_output_dir_trains_each_point_in_its_own_folder(sweep):
    root, _, logs, codes = sweep
    assert codes["first"] == 0, logs["first"][-3000:]
    assert codes["second"] == 0, logs["second"][-3000:]
    assert f"output_dir -> {root}/learning_rate-0.001" in logs["first"]
    weights = {}
    for lr, name in ((1e-3, "learning_rate-0.001"), (2e-3, "learning_rate-0.002")):
        folder = root / name
        assert json.loads((folder / "run_summary.json").read_text())["global_step"] == 4
        assert status_of(folder)["state"] == "done"
        assert json.loads((folder / "run_identity.json").read_text())["settings"]["learning_rate"] == lr
        weights[name] = load_file(folder / "model.safetensors")
    assert any(
        not torch.equal(weights["learning_rate-0.001"][k], weights["learning_rate-0.002"][k])
        for k in weights["learning_rate-0.001"]
    )
    assert not (root / "model.safetensors").exists() and not (root / "run_identity.json").exists()


def test_a_second_job_in_a_held_folder_is_refused(sweep):
    root, holder, logs, codes = sweep
    assert codes["again"] != 0
    assert (
        f"{root}/learning_rate-0.001 is in use by a job outside Slurm on host {holder['host']} (pid {holder['pid']}"
        in logs["again"]
    )
    assert "Reference log-probs" not in logs["again"]  # refused at start-up


def test_another_run_in_a_folder_is_refused_naming_the_settings(sweep):
    root, _, logs, codes = sweep
    assert codes["other"] != 0
    assert f"{root}/learning_rate-0.001 holds another run" in logs["other"]
    assert "learning_rate: 0.001 in the folder, 0.002 now" in logs["other"]
    # Neither refused job wrote into the folder it was refused: its status is the first job's.
    assert status_of(root / "learning_rate-0.001")["state"] == "done"


def test_a_token_on_the_command_line_is_refused_and_appears_nowhere(demo_assets, tmp_path):
    """Before parsing (so not even a parse error echoes it), in train_dpo.py and in the launcher."""
    token = "hf_" + "TokenOnTheCommandLine1234567890ab"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    direct = subprocess.run(
        [sys.executable, "train_dpo.py", "--config", "configs/demo.yaml", "--output_dir", str(tmp_path / "a"),
         "--hub_token", token, "--no_such_flag"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    launcher = subprocess.run(
        ["bash", "scripts/launch.sh", "demo", "--output_dir", str(tmp_path / "b"), f"--hub_token={token}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    for result in (direct, launcher):
        assert result.returncode != 0
        assert token not in result.stdout + result.stderr
        assert "HF_TOKEN" in result.stdout + result.stderr and ".env" in result.stdout + result.stderr
    assert "Put HF_TOKEN=... in .env" in direct.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for log in (REPO / "logs").glob("*"):
        assert not log.is_file() or token not in log.read_text(errors="ignore")
