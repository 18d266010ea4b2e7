"""Secrets from `.env`, W&B mode, and the Hub check that runs BEFORE training, so a 20-hour job never fails only at
its push. No secret value is ever logged: `redact` scrubs them from anything we print or save."""

import logging
import os
import re
import stat
import sys
from pathlib import Path

from dotenv import dotenv_values, load_dotenv

from .run_status import MODEL_FILES

logger = logging.getLogger(__name__)

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


def load_secrets(env_file: str | os.PathLike = ".env") -> None:
    """Loads `.env` (if present) without overriding variables already set by the cluster or the user; warns when it
    holds a token that group or others can read."""
    path = Path(env_file)
    if path.exists():
        load_dotenv(path, override=False)
        logger.info("Loaded environment from %s (values not shown).", path)
        if warning := permission_warning(path):
            logger.warning(warning)
    else:
        logger.info("No %s file; using the process environment only.", path)


def dotenv_file_values(path: str | os.PathLike) -> dict[str, str | None]:
    """The file's own values, not interpolated; quiet (load_dotenv has already warned about unparsable lines)."""
    dotenv_logger = logging.getLogger("dotenv.main")
    level = dotenv_logger.level
    dotenv_logger.setLevel(logging.ERROR)
    try:
        return dotenv_values(path, interpolate=False)
    finally:
        dotenv_logger.setLevel(level)


def permission_warning(path: str | os.PathLike) -> str | None:
    """A warning when `path` holds a non-empty token and is readable by group or others, else None. The one check
    of `.env`'s mode, for train_dpo.py (`load_secrets`) and scripts/launch.sh (`sfm_dpo.launcher dotenv`)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    tokens = [k for k, v in dotenv_file_values(path).items() if k in SECRET_VARIABLES and v]
    if not tokens:
        return None
    return (
        f"{path} holds {', '.join(tokens)} and is readable by group/others (mode {mode:03o}): "
        f"run `chmod 600 {path}` (anyone who can read a write token can overwrite your Hub models)"
    )


def secret_values() -> list[str]:
    return [v for name in SECRET_VARIABLES if len(v := os.environ.get(name, "")) >= 4]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "<redacted>")
    return text


def configure_wandb(report_to: list[str]) -> str | None:
    """W&B online with a key, offline (a local run folder, syncable later) without one, off unless requested.
    Returns the mode chosen, or None when W&B is not used."""
    if "wandb" not in report_to:
        return None
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
        logger.info("W&B mode %r from the environment.", mode)
    elif os.environ.get("WANDB_API_KEY"):
        mode = "online"
        logger.info("W&B online (WANDB_API_KEY set).")
    else:
        mode = "offline"
        os.environ["WANDB_MODE"] = mode
        logger.warning("No WANDB_API_KEY: logging W&B runs offline to ./wandb (sync later with `wandb sync`).")
    return mode


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def check_hub_access(hub_model_id: str) -> None:
    """Fails fast when a push at the end could not work: no token, an invalid repo id, or (where the Hub is
    reachable) a token without write access to the repo's owner. An unreachable Hub only warns: the compute node may
    be offline while the login node pushes later."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as e:
        raise ValueError(f"--hub_model_id {hub_model_id!r} is not a valid Hub repo id: {e}") from None
    if "/" not in hub_model_id:
        raise ValueError(f"--hub_model_id {hub_model_id!r} needs an owner: ORG/NAME.")
    token = hub_token()
    if not token:
        raise ValueError("--push_to_hub is set but HF_TOKEN is not: add it to .env (see .env.example).")
    owner = hub_model_id.split("/")[0]
    try:
        whoami = HfApi().whoami(token=token)
    except OfflineModeIsEnabled:
        logger.warning(
            "HF_HUB_OFFLINE is set: cannot check write access to %s now; the push will be tried at the end.",
            hub_model_id,
        )
        return
    except Exception as e:  # noqa: BLE001 - any network failure means "unreachable", checked again at push time
        if getattr(getattr(e, "response", None), "status_code", None) == 401:
            raise ValueError("HF_TOKEN was rejected by the Hub (401): create a new token with write access.") from None
        logger.warning(
            "The Hub is unreachable (%s): write access to %s is checked at push time.", type(e).__name__, hub_model_id
        )
        return
    names = {whoami.get("name")} | {org.get("name") for org in whoami.get("orgs", [])}
    role = (whoami.get("auth", {}).get("accessToken", {}) or {}).get("role")
    if owner not in names:
        raise ValueError(
            f"The HF_TOKEN user {whoami.get('name')!r} cannot write to {owner!r} (member of: {sorted(n for n in names if n)})."
        )
    if role == "read":
        raise ValueError("HF_TOKEN is a read-only token: the push at the end of training would fail.")
    logger.info("Hub write access to %s checked.", hub_model_id)


# What the push uploads, and nothing else: the model and tokenizer (sfm_dpo.run_status.MODEL_FILES), the model card,
# the summaries, the held-out split's record and the run report with its plots (sfm_dpo.run_report.REPORT_FILES), as
# pathlib glob patterns in the output folder ('*' stays within one folder). An allow-list: the folder also holds
# training_args.bin, run_config.yaml, the reference log-prob cache (host names, absolute paths), checkpoints and
# logs, and whatever a later change writes there.
PUSHED_FILES = (*MODEL_FILES, "README.md", "run_summary.json", "data_report.json", "eval_split.json")


def pushed_files(output_dir: str | os.PathLike) -> list[str]:
    """The files of `output_dir` that the push uploads (PUSHED_FILES and the run report), as sorted relative paths."""
    from .run_report import REPORT_FILES

    folder = Path(output_dir)
    found = {p for pattern in (*PUSHED_FILES, *REPORT_FILES) for p in folder.glob(pattern) if p.is_file()}
    return sorted(p.relative_to(folder).as_posix() for p in found)


def push_final_model(output_dir: str, hub_model_id: str, private: bool | None) -> str:
    """Uploads the final model folder's `pushed_files` in one commit once training is done. We push ourselves rather
    than through `Trainer(push_to_hub=True)`, which creates the repo in `Trainer.__init__` (crashing runs on compute
    nodes that cannot reach the Hub) and uploads every checkpoint (tens of GB each for a 7B model). `create_commit`
    with the files named, not `upload_folder`, whose fnmatch patterns cannot take plots/ and leave checkpoint-N/ out
    ('*' crosses '/' there)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(output_dir)
    files = pushed_files(folder)
    api = HfApi(token=hub_token())
    api.create_repo(hub_model_id, private=private, exist_ok=True)
    commit = api.create_commit(
        repo_id=hub_model_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files],
        commit_message="DPO training finished",
    )
    logger.info("Pushed %d files: %s", len(files), ", ".join(files))
    return str(commit)


TOKEN_ARGUMENTS = ("--hub_token",)
_TOKEN_LOOKALIKE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # a Hub token: hf_ + 34 characters


def refuse_token_arguments(argv: list[str]) -> None:
    """Exits (code 2) when the command line holds a token: `--hub_token`, or any argument shaped like a Hub token.
    Called before parsing, so that not even a parse error echoes it; the value is never printed. A token there is
    in every process listing of the node and in Slurm's job record, and the Trainer would pickle it into
    training_args.bin in every checkpoint and in the pushed folder."""
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in TOKEN_ARGUMENTS or _TOKEN_LOOKALIKE.search(arg):
            what = name if name.startswith("--") and name in TOKEN_ARGUMENTS else f"argument {i + 1}"
            sys.stderr.write(
                f"ERROR: {what} on the command line looks like a secret token; refused (it would show in process "
                "listings, logs and saved files). Put HF_TOKEN=... in .env (see .env.example) and launch without it; "
                "revoke the token if this command was logged somewhere.\n"
            )
            raise SystemExit(2)
