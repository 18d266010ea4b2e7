"""The Python side of scripts/launch.sh: what bash cannot do safely.

- `python -m sfm_dpo.launcher dotenv .env` prints shell-quoted `export` lines for the variables of `.env` that the
  environment does not set yet, read by python-dotenv exactly as `credentials.load_secrets` reads it (override=False,
  its quoting and `${VAR}` rules), so that the launcher's shell and train_dpo.py agree. `source .env` would instead
  override the caller, run `lr sweep` as a command and expand `$`. It warns when the file holds a token and is
  readable by group or others. No value is printed anywhere but in the `export` lines, which the launcher evals.
  Runs before the launcher activates a virtualenv, on any python that has python-dotenv (nothing else is imported
  but the stdlib and two small modules of ours, credentials and run_status).
- `python -m sfm_dpo.launcher fingerprint FILE` / `outcome OUTPUT_DIR RC FINGERPRINT`: the end-of-run verdict from
  `<output_dir>/run_status.json`, which train_dpo.py writes on rank 0 at the end of every run. The exit code of
  `accelerate launch` is not enough: it turns any worker failure into 1, and a 0 says nothing about the final save.
  A status file that this run did not write (same inode and mtime as before the launch) is an earlier run's.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from sfm_dpo.credentials import dotenv_file_values, permission_warning  # .env as train_dpo.py reads it
from sfm_dpo.run_status import STATUS_FILE as RUN_STATUS_FILE  # {"state", "stage", "message", "job_id", ...}

ABSENT = "absent"


def dotenv_exports(
    path: str | os.PathLike, environ: dict[str, str], shell_variables: Iterable[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(export lines, names set, names kept from the environment). Runs `load_dotenv(override=False)` itself, against
    `environ`, rather than re-implementing its rules. `shell_variables`, the names the launcher's shell has set (its
    own, and bash's: IFS, UID, BASHOPTS...), are not overridden either: they would change how the launcher runs."""
    from dotenv import load_dotenv

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        load_dotenv(path, override=False)
        loaded = dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    kept = [k for k, v in dotenv_file_values(path).items() if v is not None and k in environ]
    lines, names = [], []
    shell_variables = set(shell_variables)
    for key in (k for k in loaded if k not in environ):
        if not (key.isidentifier() and key.isascii()):
            print(f"[launch] WARNING: .env variable {key!r} is not a shell name; not exported", file=sys.stderr)
            continue
        if key in shell_variables:
            print(f"[launch] WARNING: .env variable {key} is a variable of the launcher's shell; not exported",
                  file=sys.stderr)  # fmt: skip
            continue
        lines.append(f"export {key}={shlex.quote(loaded[key])}")
        names.append(key)
    return lines, names, kept


def fingerprint(path: str | os.PathLike) -> str:
    """Identifies one version of a file: a rewrite (in place or by rename) changes it, whatever the clocks say."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ABSENT
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def outcome(output_dir: str | os.PathLike, rc: int, before: str, job_id: str | None = None) -> tuple[str, str]:
    """(verdict, line) for the launcher's summary: verdict is "done" (rc 0 and this run's status says done),
    "preempted" (this run's status says so) or "failed"; the line names the stage and message of the status file, or
    why there is none. `job_id`: this Slurm job's; a status written by another job (one that holds the folder while
    this launch was refused) is not this run's."""
    path = Path(output_dir) / RUN_STATUS_FILE
    now = fingerprint(path)
    if now == ABSENT:
        return "failed", f"FAILED: no {path}: training ended (exit code {rc}) before it could say how it ended"
    if now == before:
        return "failed", f"FAILED: {path} is from an earlier run; this one ended (exit code {rc}) without writing it"
    try:
        status = json.loads(path.read_text())
        state, stage, message = status["state"], status.get("stage", "?"), status.get("message", "")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return "failed", f"FAILED: unreadable {path} ({type(error).__name__}: {error}), exit code {rc}"
    message = " ".join(str(message).split())  # one summary line
    writer = status.get("job_id")
    if job_id and writer and str(writer) != job_id:
        return "failed", f"FAILED: {path} was written by job {writer}, not this one (exit code {rc}): {message}"
    if state == "running":
        return "failed", f"FAILED during {stage}: training ended (exit code {rc}) in the middle of it ({message})"
    if state == "done" and rc == 0:
        return "done", f"DONE: model saved to {output_dir}"
    if state == "done":
        return "failed", f"FAILED: exit code {rc} after {path} said done (stage {stage}: {message})"
    if state == "preempted":
        return "preempted", f"PREEMPTED during {stage}: {message}"
    return "failed", f"FAILED at {stage}: {message} (state {state!r}, exit code {rc})"


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "dotenv":
        path, *shell_variables = args
        lines, names, kept = dotenv_exports(path, dict(os.environ), shell_variables)
        if warning := permission_warning(path):
            print(f"[launch] WARNING: {warning}", file=sys.stderr)
        print("\n".join(lines))
        print(f"DOTENV_SET={shlex.quote(' '.join(names))}")
        print(f"DOTENV_KEPT={shlex.quote(' '.join(kept))}")
    elif command == "fingerprint":
        print(fingerprint(*args))
    elif command == "outcome":
        output_dir, rc, before = args
        verdict, line = outcome(output_dir, int(rc), before, os.environ.get("SLURM_JOB_ID"))
        print(verdict)
        print(line)
    else:
        print(
            f"unknown command {command!r}: dotenv PATH [SHELL_VARIABLE...] | fingerprint PATH | outcome DIR RC BEFORE"
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
