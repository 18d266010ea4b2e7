import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# One single-node Slurm cluster per session, here so that every module shares it (a fixture imported into a test
# module is that module's own: a second cluster, and a second reference job).
from tests.slurm_cluster import slurm_cluster  # noqa: E402, F401

# No test may reach the network: the Hub is unreachable here and in CI.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
# DeepSpeed compiles its CPU shm op once; keep it across tests and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs .venv/bin/python without activating the venv: the tests' `accelerate` and `torchrun` come from it.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def _remove_stale_extension_locks(max_age_s: float = 600) -> None:
    """A compile of DeepSpeed's CPU op that was killed leaves its `lock` file, and every later run then waits on it
    forever; no compile takes minutes, so an old lock is a dead one."""
    import time

    for lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/lock"):
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink(missing_ok=True)


_remove_stale_extension_locks()


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-gpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: pass --run-gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The tiny tokenizer + GPT-NeoX model and the Dolci-shaped Think/Instruct data, built once per session."""
    from sfm_dpo.tiny import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo_assets"))


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets["model"])


@pytest.fixture(scope="session")
def reference_job(slurm_cluster, demo_assets, tmp_path_factory):  # noqa: F811
    """The uninterrupted 1-node, 2-process batch job of the demo's values (tests/test_slurm.py): what the preempted
    job of tests/test_slurm.py and the 2-node job of tests/test_multinode.py must equal. One job for both: a launch
    costs half a minute."""
    from tests.test_slurm import run_reference_job

    return run_reference_job(slurm_cluster, demo_assets, tmp_path_factory.mktemp("slurm") / "reference")


HELD_OUT_RUN_ROWS = 96


@pytest.fixture(scope="session")
def held_out_run(demo_assets, tmp_path_factory):
    """One real demo run to its end (scripts/launch.sh demo: 2 processes, DeepSpeed ZeRO-2, float32, 96 rows: 81
    pairs trained in 6 steps, 15 held out), with its decoder layers compiled under gradient checkpointing and every
    step logged. tests/test_report.py checks its held-out figures and report, tests/test_train_e2e.py the compiled
    layers: one launch for both (a launch costs half a minute). Returns (output_dir, log)."""
    import subprocess
    import time

    output_dir = tmp_path_factory.mktemp("held_out") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CPU_PROCESSES": "2"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    cmd = [
        "bash", "scripts/launch.sh", "demo", "--model_name_or_path", str(demo_assets["model"]),
        "--dataset_name", str(demo_assets["think"]), "--output_dir", str(output_dir),
        "--max_train_samples", str(HELD_OUT_RUN_ROWS), "--save_steps", "4", "--logging_steps", "1",
        "--gradient_checkpointing", "true", "--compile_layers", "true",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(f"demo run with a held-out split and compiled layers: {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return output_dir, result.stdout + result.stderr
