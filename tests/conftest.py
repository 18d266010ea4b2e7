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
