"""The README's cluster set-up, run as a new user would: a fresh `uv venv`, torch first, then requirements.txt from the
package index, then the entry point. On a cluster the torch line names the CUDA index; here it installs this machine's
local CPU wheel (the one pip is configured to find), since uv does not read pip's configuration.

Needs the package index (PyPI) and ~1 GB of uv cache (~/.cache/uv, or UV_CACHE_DIR): about a minute once cached,
a few minutes on a fresh machine."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_INDEX = "--index-url https://download.pytorch.org/whl/cu128"
# The README's lines ("Training on the cluster"), with .venv as {venv}. Keep them equal to the README's.
SETUP_LINES = (
    "uv venv -p 3.11 {venv}",
    f"uv pip install --python {{venv}} 'torch>=2.11,<2.16' {CUDA_INDEX}",
    "uv pip install --python {venv} -r requirements.txt",
)

pytestmark = pytest.mark.install


def local_torch_wheel() -> Path:
    """The CPU torch wheel pip finds here (its find-links folder, from `pip config list` or PIP_FIND_LINKS)."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = [os.environ.get("PIP_FIND_LINKS", "")]
    folders += [line.split("=", 1)[1].strip("'\"") for line in listing.splitlines() if "find-links" in line]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in filter(None, folders):
        for wheel in sorted(Path(folder).glob(f"torch-*{tag}*.whl")):
            return wheel
    raise AssertionError(
        f"no local torch wheel for {tag} in pip's find-links ({folders}): without one this test would download a "
        "multi-GB CUDA torch"
    )


def test_readme_setup_lines_install_and_start(tmp_path):
    uv = [sys.executable, "-m", "uv"]  # requirements-dev.txt installs uv
    venv = tmp_path / "venv"
    wheel = local_torch_wheel()
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    env.pop("VIRTUAL_ENV", None)
    start = time.perf_counter()
    for line in SETUP_LINES:
        line = line.format(venv=venv)
        # The two substitutions a CPU machine without a managed-Python download needs; the rest runs as written.
        line = line.replace("-p 3.11", f"-p {sys._base_executable}")
        line = line.replace(f"'torch>=2.11,<2.16' {CUDA_INDEX}", str(wheel))
        args = shlex.split(line)
        assert args[0] == "uv", line
        run = subprocess.run([*uv, *args[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr}"
    installed = time.perf_counter() - start

    python = str(venv / "bin" / "python")
    check = subprocess.run([python, "-m", "sfm_dpo.versions"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    help_run = subprocess.run(
        [python, "train_dpo.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert help_run.returncode == 0, help_run.stderr
    for flag in ("--effective_batch_size", "--activation_checkpointing", "--max_tokens_per_microbatch"):
        assert flag in help_run.stdout, flag
    print(f"install {installed:.0f} s, total {time.perf_counter() - start:.0f} s")
