"""The supported floor: what pip/uv see (requirements.txt, pyproject's requires-python) equals what the entry points
check (sfm_dpo/versions.py), and an unsupported Python or package stops every entry point with one line and exit 3,
before any heavy import: a real Python 3.10 interpreter, and this venv with an old trl's metadata put first."""

import ast
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml

from sfm_dpo import versions
from sfm_dpo.compat import RENAMED_ARGS, quiet_known_noise, renamed_args
from sfm_dpo.versions import ENVIRONMENT_EXIT_CODE, find_problems, parse_version

REPO = Path(__file__).resolve().parents[1]
SUPPORTED = {
    "torch": "2.11.0+cu128",
    "transformers": "5.23.0",
    "trl": "1.16.0",
    "accelerate": "1.15.0",
    "deepspeed": "0.19.0",
    "datasets": "4.7.0",
}
ENTRY_POINTS = (["train_dpo.py", "--help"], ["scripts/analyze_dataset.py", "--help"], ["-m", "sfm_dpo.versions"])


def test_parse_version():
    assert parse_version("2.9.1+cu128") == (2, 9, 1)
    assert parse_version("2.10.0a0+git1a2b3c") == (2, 10, 0)
    assert parse_version("0.19.8") == (0, 19, 8)
    assert parse_version("1.15.0rc1") == (1, 15, 0)
    assert parse_version("2.13.0.dev20261101") == (2, 13, 0)
    assert parse_version("5") == (5,)


def test_supported_environment_passes():
    assert find_problems((3, 11, 7), SUPPORTED) == (None, [])
    newest = {
        "torch": "2.15.0",
        "transformers": "5.99.1",
        "trl": "1.16.0",
        "accelerate": "1.99",
        "deepspeed": "0.19.8",
    }
    assert find_problems((3, 12, 1), {**SUPPORTED, **newest}) == (None, [])


def test_old_python_is_one_line_with_the_fix():
    message, _ = find_problems((3, 10, 13), SUPPORTED)
    assert "needs Python >= 3.11" in message and "this is Python 3.10.13" in message
    assert "uv venv -p 3.11 .venv" in message and "uv pip install --python .venv -r requirements.txt" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, version, needed",
    [
        ("trl", "1.14.2", "trl>=1.16,<2 (found 1.14.2; needed for trl.trainer.utils.add_fused_lm_head"),
        ("trl", "1.15.0", "trl>=1.16,<2 (found 1.15.0; needed for trl.trainer.utils.add_fused_lm_head"),
        ("transformers", "5.22.2", "transformers>=5.23,<6 (found 5.22.2; needed for the recipes' activation_check"),
        ("torch", "2.9.1+cu128", "torch>=2.11,<2.16 (found 2.9.1+cu128; needed for varlen_attn with window_size"),
        ("accelerate", "1.14.0", "accelerate>=1.15,<2 (found 1.14.0"),
        ("deepspeed", "0.18.0", "deepspeed>=0.19,<0.20 (found 0.18.0; needed for ZeRO-2 (under 0.18"),
        ("datasets", "4.6.1", "datasets>=4.7 (found 4.6.1"),
    ],
)
def test_too_old_package_names_its_bound_and_the_install_line(name, version, needed):
    message, _ = find_problems((3, 11, 7), {**SUPPORTED, name: version})
    assert message.startswith("sfm-post-training needs " + needed), message
    assert "uv pip install -r requirements.txt" in message and "\n" not in message


def test_missing_packages_and_untested_newer_ones():
    message, _ = find_problems((3, 11, 7), {**SUPPORTED, "torch": None, "trl": None})
    assert "torch>=2.11,<2.16 (not installed), trl>=1.16,<2 (not installed)" in message
    assert "CUDA build of torch first" in message and "--index-url https://download.pytorch.org/whl/cu128" in message

    newer = {**SUPPORTED, "torch": "2.16.0"}
    message, warnings = find_problems((3, 11, 7), newer)
    assert (
        "torch>=2.11,<2.16 (found 2.16.0, newer than tested)" in message and "SFM_ALLOW_UNTESTED_VERSIONS=1" in message
    )
    assert warnings == []
    assert find_problems((3, 11, 7), newer, allow_untested=True) == (
        None,
        ["torch>=2.11,<2.16 (found 2.16.0, newer than tested)"],
    )
    # Too old stays an error whatever the override.
    message, _ = find_problems((3, 11, 7), {**newer, "trl": "1.14.2"}, allow_untested=True)
    assert "trl>=1.16,<2 (found 1.14.2" in message


def test_installers_see_the_same_floor():
    """requirements.txt (what pip/uv resolve) bounds each package exactly as versions.py checks it, and pyproject's
    requires-python is the Python floor."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    bounds = dict(re.match(r"([A-Za-z0-9_.-]+)(\S*)", line).groups() for line in lines if line and line[0] != "#")
    for name, *_ in versions.REQUIREMENTS:
        assert bounds[name] == versions.spec(name), name
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">={}.{}".format(*versions.MIN_PYTHON)
    assert f"'torch{versions.spec('torch')}'" in versions.SETUP_HINT


def test_what_runs_before_the_check_parses_as_old_python():
    """An old interpreter compiles a whole file before running its first line: the entry points must parse on
    Python 3.10 (they then stop at the check), and the check module on 3.8."""
    ast.parse((REPO / "sfm_dpo" / "versions.py").read_text(), feature_version=(3, 8))
    ast.parse((REPO / "sfm_dpo" / "__init__.py").read_text(), feature_version=(3, 8))
    for path in ("train_dpo.py", "scripts/analyze_dataset.py"):
        source = (REPO / path).read_text()
        ast.parse(source, feature_version=(3, 10))
        body = ast.parse(source).body
        check = next(
            i for i, n in enumerate(body) if isinstance(n, ast.Expr) and "require_supported" in ast.unparse(n)
        )
        before = [n for n in body[:check] if isinstance(n, ast.Import | ast.ImportFrom)]
        modules = {a.name for n in before if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in before if isinstance(n, ast.ImportFrom)}
        heavy = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "sfm_dpo.versions"}
        assert not heavy, (path, heavy)
        assert any(isinstance(n, ast.Import | ast.ImportFrom) for n in body[check:]), path


def python310() -> str:
    """A real Python 3.10 interpreter: pyenv's (this machine and CI have 3.10.13), else python3.10 on PATH."""
    root = (
        subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        if shutil.which("pyenv")
        else ""
    )
    for candidate in sorted(Path(root or "/nonexistent").glob("versions/3.10.*/bin/python")):
        return str(candidate)
    found = shutil.which("python3.10")
    if not found:
        pytest.skip("no Python 3.10 interpreter here (pyenv's versions/3.10.* or python3.10 on PATH)")
    return found


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def test_entry_points_on_bare_python310_print_one_line_and_exit_3(tmp_path):
    python = python310()
    for args in ENTRY_POINTS:
        run = subprocess.run([python, *args], cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=60)
        assert run.returncode == ENVIRONMENT_EXIT_CODE, (args, run.stderr)
        assert run.stdout == "" and run.stderr.count("\n") == 1, (args, run.stderr)
        assert "needs Python >= 3.11" in run.stderr and "this is Python 3.10" in run.stderr
        assert "uv venv -p 3.11 .venv" in run.stderr
    # The launcher asks the same check before it imports torch (its cluster probe) or launches anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(python)
    env = clean_env(VENV="none", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SITE_PROFILE="default")
    run = subprocess.run(
        ["bash", "scripts/launch.sh", "demo"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == ENVIRONMENT_EXIT_CODE, run.stderr
    assert "needs Python >= 3.11" in run.stderr and "Traceback" not in run.stderr + run.stdout
    assert "accelerate launch" not in run.stdout


def test_entry_points_with_an_old_trl_print_one_line_and_exit_3(tmp_path):
    """This venv, with an old trl's metadata first on sys.path (importlib.metadata reads the first found): the line
    names trl's bound and what needs it, before anything imports trl."""
    dist = tmp_path / "trl-1.14.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 1.14.2\n")
    for args in ENTRY_POINTS:
        env = clean_env(PYTHONPATH=str(tmp_path))
        run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == ENVIRONMENT_EXIT_CODE, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, (args, run.stderr)
        assert "trl>=1.16,<2 (found 1.14.2; needed for trl.trainer.utils.add_fused_lm_head" in run.stderr


RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def parse_recipe(recipe: Path, *extra: str):
    from sfm_dpo.config import make_parser

    # bf16 recipes need a GPU to parse; the flags added here are not deprecated ones.
    return make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--use_cpu", "true", "--bf16", "false", *extra]
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse_without_deprecation_warnings(recipe):
    """What our settings make the real parser say: nothing deprecated (transformers 5.23+ warns FutureWarning for
    gradient_checkpointing, which TRL's DPOConfig also defaults, so the recipes set activation_checkpointing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, training_args, _ = parse_recipe(recipe)
    deprecated = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert deprecated == [], deprecated
    assert not set(yaml.safe_load(recipe.read_text())) & set(RENAMED_ARGS), "a recipe uses a deprecated name"
    assert training_args.gradient_checkpointing == training_args.activation_checkpointing  # transformers mirrors them


def test_old_checkpointing_flag_is_read_as_the_new_one(caplog):
    """Untranslated, `--gradient_checkpointing false` over a recipe that sets activation_checkpointing is silently
    ignored by transformers (the new name wins); translated, it takes effect, with a log line and no FutureWarning."""
    think = REPO / "configs" / "think.yaml"
    _, ignored, _ = parse_recipe(think, "--gradient_checkpointing", "false")
    assert ignored.activation_checkpointing is True
    for flag in (["--gradient_checkpointing", "false"], ["--gradient_checkpointing=false"]):
        with caplog.at_level(logging.WARNING, logger="sfm_dpo.compat"):
            argv = renamed_args(flag)
        assert argv[0].startswith("--activation_checkpointing")
        assert "--gradient_checkpointing is the deprecated name of --activation_checkpointing" in caplog.text
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, training_args, _ = parse_recipe(think, *argv)
        assert training_args.activation_checkpointing is False and training_args.gradient_checkpointing is False
        assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert renamed_args(["--gradient_checkpointing_kwargs", "{}", "--learning_rate", "1"]) == [
        "--activation_checkpointing_kwargs", "{}", "--learning_rate", "1"
    ]  # fmt: skip


def test_known_noise_is_dropped_and_noted_once(tmp_path, caplog):
    """The real DeepSpeed-era warning (torch.distributed.all_gather_into_tensor, one gloo process) and accelerate's
    accumulation line are dropped and noted once each; any other warning or log line still shows."""
    import torch
    import torch.distributed as dist

    accelerate_logger = logging.getLogger("accelerate.accelerator")
    saved_filters = list(accelerate_logger.filters)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        # catch_warnings restores the showwarning hook afterwards; record=True: what would be shown lands in `shown`.
        with caplog.at_level(logging.INFO, logger="sfm_dpo.compat"), warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            quiet_known_noise()
            out = torch.zeros(2)
            for _ in range(3):
                dist.all_gather_into_tensor(out, torch.ones(2))
            warnings.warn("some other future change", FutureWarning, stacklevel=1)
            for _ in range(2):
                accelerate_logger.warning(
                    "[RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed "
                    "config has 8. Using DeepSpeed's value."
                )
            accelerate_logger.warning("a real accelerate problem")
        assert torch.equal(out, torch.ones(2))
        assert [str(w.message) for w in shown] == ["some other future change"]
        notes = [r.getMessage() for r in caplog.records if r.name == "sfm_dpo.compat"]
        assert len(notes) == 2 and "DeepSpeed's ZeRO-2" in notes[0] and "accumulates itself" in notes[1], notes
        messages = [r.getMessage() for r in caplog.records if r.name == "accelerate.accelerator"]
        assert messages == ["a real accelerate problem"]
    finally:
        dist.destroy_process_group()
        accelerate_logger.filters[:] = saved_filters
