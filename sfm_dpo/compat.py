"""Where our start-up meets renamed settings and known third-party noise, so that what a user sees is ours or real.

- Renamed arguments: transformers 5.23 renamed `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]`
  (the old names warn, FutureWarning, and go in v6). The recipes use the new names; an old name on the command line is
  read as the new one, logged. Left as it is, it would be silently ignored: transformers takes the old value only when
  the new one is unset, and the recipe sets it.
- Known noise, filtered and noted once per run (rank 0): each entry says where it comes from and why it is harmless.
"""

import logging
import os
import re
import warnings

logger = logging.getLogger(__name__)

RENAMED_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def renamed_args(argv: list[str], log=logger) -> list[str]:
    """`argv` with transformers' deprecated argument names replaced by the new ones (`--old v` and `--old=v`)."""
    out = []
    for arg in argv:
        match = re.match(r"--([A-Za-z0-9_]+)(=.*)?$", arg)
        if match and match.group(1) in RENAMED_ARGS:
            new = RENAMED_ARGS[match.group(1)]
            if os.environ.get("RANK", "0") == "0":  # before logging is set up: say it once, not once per process
                log.warning(
                    "--%s is the deprecated name of --%s (transformers 5.23); read as --%s.", match[1], new, new
                )
            arg = f"--{new}{match.group(2) or ''}"
        out.append(arg)
    return out


# (kind, where, pattern, why it is noise). kind "warning": a Python warning of that category; "log": a record of that
# logger. Patterns are searched in the message.
KNOWN_NOISE = (
    (
        "warning",
        FutureWarning,
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        "DeepSpeed's ZeRO-2 calls torch.distributed.all_gather_into_tensor (deprecated in torch 2.12+); ours does not",
    ),
    (
        "log",
        "accelerate.accelerator",
        r"Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,",
        "transformers' Trainer passes accelerate 1 on purpose (it accumulates itself) and DeepSpeed the real count",
    ),
)


class _NoiseFilter(logging.Filter):
    def __init__(self, pattern: str, why: str, noted: set):
        super().__init__()
        self.pattern, self.why, self.noted = re.compile(pattern), why, noted

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern.search(record.getMessage()):
            _note(self.why, self.noted)
            return False
        return True


def _note(why: str, noted: set) -> None:
    if why not in noted:
        noted.add(why)
        logger.info("Filtered a known third-party notice (shown once): %s.", why)


def quiet_known_noise() -> None:
    """Installs the KNOWN_NOISE filters for this process. Only those exact messages are dropped; every other warning
    shows as before. Each is noted once on sfm_dpo's logger (rank 0 at info level) the first time it fires."""
    noted: set = set()
    show = warnings.showwarning
    warning_noise = [(cat, re.compile(pattern), why) for kind, cat, pattern, why in KNOWN_NOISE if kind == "warning"]

    def showwarning(message, category, filename, lineno, file=None, line=None):
        for noise_category, pattern, why in warning_noise:
            if issubclass(category, noise_category) and pattern.search(str(message)):
                _note(why, noted)
                return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning  # the documented hook: every shown warning passes here
    for kind, name, pattern, why in KNOWN_NOISE:
        if kind == "log":
            logging.getLogger(name).addFilter(_NoiseFilter(pattern, why, noted))
