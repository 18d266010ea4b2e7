"""The Python and package versions this code runs with, checked by every entry point before its heavy imports.

An unsupported environment then stops with one line that says what to install, instead of an ImportError deep in
TRL (trl < 1.15 has no `add_fused_lm_head`; 1.15's needs Triton, absent from CPU builds of torch) or a SyntaxError
from a package that needs a newer Python.

    python -m sfm_dpo.versions          # exit 0 and silent when this environment can train; else one line, exit 3
    python3 -m sfm_dpo.versions --python   # the interpreter only

This module imports only the standard library and keeps to Python 3.8 syntax: an old interpreter must be able to
import it to be told that it is too old. The bounds are requirements.txt's (a test keeps the two equal).
"""

import os
import sys
from importlib import metadata

ENVIRONMENT_EXIT_CODE = 3
MIN_PYTHON = (3, 11)
ALLOW_UNTESTED_ENV = "SFM_ALLOW_UNTESTED_VERSIONS"  # "1": a version above the tested range warns instead of failing

# (distribution, lowest supported, first unsupported or None, what needs the floor)
REQUIREMENTS = (
    (
        "torch",
        "2.11",
        "2.16",
        "varlen_attn with window_size, the fast exact packed attention (2.9: none; 2.10: no window)",
    ),
    ("transformers", "5.23", "6", "the recipes' activation_checkpointing, Trainer.loss_is_scaled_for_ga"),
    ("trl", "1.16", "2", "trl.trainer.utils.add_fused_lm_head, the fast path's log-prob head (1.15's needs Triton)"),
    ("accelerate", "1.15", "2", "the accelerate launch and DeepSpeed plugin transformers 5.23+ drive"),
    ("deepspeed", "0.19", "0.20", "ZeRO-2 (under 0.18 the fast path's embedding gradient stayed zero)"),
    ("datasets", "4.7", None, "TRL's own floor"),
)
TRAINING = tuple(name for name, *_ in REQUIREMENTS)
ANALYSIS = ("torch", "transformers", "trl", "accelerate", "datasets")  # scripts/analyze_dataset.py: no DeepSpeed

SETUP_HINT = (
    "uv venv -p 3.11 .venv && uv pip install --python .venv 'torch>=2.11,<2.16' --index-url "
    "https://download.pytorch.org/whl/cu128 && uv pip install --python .venv -r requirements.txt "
    "(your cluster's CUDA build of torch; README, 'Training on the cluster')"
)


def parse_version(text):
    """`2.9.1+cu128` -> (2, 9, 1), `2.10.0a0+git1a2b` -> (2, 10, 0): the release numbers. A pre-release counts as its
    release, which is lenient by one pre-release at a floor and never refuses a final release."""
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):  # "0a0", "0rc1", "0dev2025": the release ends here
            break
    return tuple(numbers)


def _at_least(version, bound):
    v, b = parse_version(version), parse_version(bound)
    width = max(len(v), len(b))
    return v + (0,) * (width - len(v)) >= b + (0,) * (width - len(b))


def installed_versions(names):
    """{distribution: version, or None where it is not installed}, read from the installed metadata (no import)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def spec(name):
    """requirements.txt's bounds of `name`, e.g. `>=1.16,<2`."""
    low, high = next((low, high) for n, low, high, _ in REQUIREMENTS if n == name)
    return f">={low},<{high}" if high else f">={low}"


def find_problems(python, installed, allow_untested=False):
    """(the one-line message for this environment or None when it is supported, warnings): a version above the
    tested range is an error, or a warning with allow_untested (SFM_ALLOW_UNTESTED_VERSIONS=1).

    python: a version tuple (sys.version_info); installed: {distribution: version string, or None if missing}."""
    if tuple(python[:2]) < MIN_PYTHON:
        this = ".".join(str(p) for p in python[:3])
        return (
            f"sfm-post-training needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} (as do trl >= 1.16 and transformers "
            f">= 5.23), this is Python {this} ({sys.executable}). Create a Python 3.11+ environment: {SETUP_HINT}",
            [],
        )
    wrong, newer = [], []
    for name, low, high, why in REQUIREMENTS:
        if name not in installed:
            continue
        version = installed[name]
        if version is None:
            wrong.append(f"{name}{spec(name)} (not installed)")
        elif not _at_least(version, low):
            wrong.append(f"{name}{spec(name)} (found {version}; needed for {why})")
        elif high and _at_least(version, high):
            newer.append(f"{name}{spec(name)} (found {version}, newer than tested)")
    if allow_untested:
        wrong, warnings = wrong, newer
    else:
        wrong, warnings = wrong + newer, []
    if not wrong:
        return None, warnings
    if installed.get("torch", "") is None:
        fix = f"install your cluster's CUDA build of torch first, then the rest: {SETUP_HINT}"
    else:
        fix = "uv pip install -r requirements.txt (or pip install -r requirements.txt) in this environment"
    if newer and not allow_untested:
        fix += f"; {ALLOW_UNTESTED_ENV}=1 runs newer versions anyway"
    return f"sfm-post-training needs {', '.join(wrong)}. Fix: {fix}.", warnings


def require_supported(packages=TRAINING):
    """Exits with ENVIRONMENT_EXIT_CODE and one line on stderr unless this Python and the installed `packages`
    are within the supported range; call it before importing any of them."""
    installed = installed_versions(packages) if sys.version_info[:2] >= MIN_PYTHON else {}
    message, warnings = find_problems(
        sys.version_info, installed, allow_untested=os.environ.get(ALLOW_UNTESTED_ENV) == "1"
    )
    for warning in warnings:
        print(f"sfm-post-training: WARNING: running an untested version: {warning}", file=sys.stderr)
    if message:
        print(message, file=sys.stderr)
        sys.exit(ENVIRONMENT_EXIT_CODE)


if __name__ == "__main__":
    # `--python`: the interpreter only (the Makefile asks before it creates the venv, when nothing is installed yet).
    require_supported(() if sys.argv[1:] == ["--python"] else TRAINING)
