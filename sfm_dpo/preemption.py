"""Save and stop at the next step boundary when Slurm says the job is about to end, then requeue.

Signal path (see scripts/launch.sh): Slurm sends SIGUSR1 to the batch shell (`#SBATCH --signal=B:USR1@300`, or
`scancel --signal=USR1 --batch`); the launcher forwards it through srun to a small supervisor on each node, which
sends it to the training processes themselves. The torch elastic agent that `accelerate launch` runs ignores it (its
default action would kill it) and starts the workers in their own sessions, so nothing reaches them by process group.

Here each rank's handler only sets a flag. The signal may reach ranks at different steps, so at every optimizer step
end the ranks all-reduce the flag and stop together: `control.should_save` makes the Trainer write a checkpoint (made
atomic by `AtomicCheckpointMixin`), `control.should_training_stop` ends `train()`. Once that checkpoint is complete,
rank 0 writes the file named by $SFM_REQUEUE_MARKER; the launcher sees it and runs `scontrol requeue`. A file, not an
exit code, because `accelerate launch` turns any non-zero worker exit into its own exit 1 plus a ChildFailedError dump.

Before training (the checks, the data preparation, the model load, the reference pass, DeepSpeed's start-up and the
checkpoint load) there is no step end: `train_dpo.py` installs the handler first thing, and each stage boundary calls
`PreemptionCallback.check(stage)`, which raises `Preempted(stage)` on every rank if any rank got the signal; the
reference pass polls `PreemptionCallback.requested` and stops after its current batch (sfm_dpo/ref_cache.py).
`requeue_on_preemption` turns a `Preempted` into the requeue marker and exit 0. Next to nothing done is lost: the data
and the finished chunks of the reference pass are cached (a rank loses the chunk it was computing, ~1/256 of the
pass), and the checkpoint that training resumes from is untouched.

One signal, one save: a signal that arrives while a checkpoint is being written (a periodic save) is answered by that
checkpoint, and more signals after the first (the launcher re-sends a pending one) change nothing.
"""

import functools
import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "temporary failure, try again". What launch.sh exits with when a local run was preempted,
# and what train_dpo.py may exit with; the launcher does not rely on it getting through accelerate launch.
REQUEUE_EXIT_CODE = 75
REQUEUE_MARKER_ENV = "SFM_REQUEUE_MARKER"


class Preempted(Exception):
    """A preemption signal arrived before training could checkpoint it at a step end (data preparation, the reference
    pass, start-up): what was done is kept (the reference pass's shards), and the job should exit for a requeue."""

    def __init__(self, stage: str):
        super().__init__(f"preempted during {stage}")
        self.stage = stage


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def request_requeue(reason: str) -> None:
    """Rank 0 writes `reason` (one line) to the file named by $SFM_REQUEUE_MARKER, on which scripts/launch.sh requeues
    the job (or, without Slurm, exits 75). Without the variable (not started by the launcher) it only logs."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if not _is_rank_zero():
        return
    if not marker:
        logger.warning("Preempted (%s); $%s is not set, so nothing requeues this run: run it again to resume.",
                       reason, REQUEUE_MARKER_ENV)  # fmt: skip
        return
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # the launcher must never read half a line
    tmp.write_text(f"{reason}\n")
    os.replace(tmp, path)
    logger.warning("Asked the launcher to requeue (%s): %s", marker, reason)


def requeue_on_preemption(main):
    """Decorates `main`: a `Preempted` raised anywhere in it (every rank raises it together) writes the requeue marker
    and returns 0, so that the launcher requeues the job instead of reporting a failure."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Preempted as stop:
            logger.warning("Stopped for preemption during %s, before training had anything new to checkpoint; the "
                           "requeued job goes on from what is kept (caches, the last checkpoint).", stop.stage)  # fmt: skip
            request_requeue(f"stopped during {stop.stage}, nothing lost")
            return 0

    return wrapper


class PreemptionCallback(TrainerCallback):
    """Installs handlers for `signals` at construction (call it in the main thread, first thing in `main`).

    Not SIGTERM by default: the torch elastic agent SIGTERMs the surviving workers when one rank dies, and a worker
    that then waits for a step end (blocked in a collective with the dead rank) only delays the failure by the
    agent's 30 s kill timeout; Slurm's own SIGTERM leaves KillWait (30 s) anyway, too short to save a 7B checkpoint.

    Before training, `check(stage)` at each stage boundary; `requested` for loops whose ranks are not in lock-step.
    After `train()` returns, `.preempted` tells whether it stopped early for a requeue: then skip the final save and
    push (the checkpoint holds everything) and exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1,)):
        self.requested_by: str | None = None  # this rank's signal, set by the handler
        self.preempted = False  # agreed by all ranks at a step end or after a save
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the handler runs between two bytecodes, possibly inside a collective.
        self.requested_by = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """Whether this rank got the signal (local: no collective), the `should_stop` of the reference pass."""
        return self.requested_by is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _source(self) -> str:
        """Who asked, for the log: this rank's own signal, or the flag of another rank seen through the all-reduce."""
        return f"{self.requested_by} on this rank" if self.requested_by else "a signal on another rank"

    def check(self, stage: str) -> None:
        """A stage boundary that every rank reaches (a collective): raise `Preempted(stage)` on every rank if any rank
        got the signal."""
        if any_rank(self.requested):
            logger.warning("Preemption requested (%s) during %s: stopping for a requeue", self._source(), stage)
            raise Preempted(stage)

    def on_train_begin(self, args, state, control, **kwargs):
        # After DeepSpeed's start-up and the checkpoint load, before the first step: a signal during those has
        # nothing new to save.
        self.check("start-up (DeepSpeed initialization, checkpoint loading)")

    def on_step_end(self, args, state, control, **kwargs):
        if not self.preempted and any_rank(self.requested):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            logger.warning(
                "Preemption requested (%s): saving a checkpoint at step %d and stopping for a requeue",
                self._source(),
                state.global_step,
            )
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.preempted and any_rank(self.requested):
            # The signal came while this (periodic) checkpoint was being written: it holds everything, so stop now
            # rather than save a second one (minutes at 7B) at the next step end.
            self.preempted = True
            control.should_training_stop = True
            logger.warning(
                "Preemption requested (%s) during the checkpoint of step %d: stopping after it for a requeue",
                self._source(), state.global_step,
            )  # fmt: skip
        if self.preempted:
            request_requeue(f"{state.global_step}")  # the launcher reads the step of the checkpoint
        return control
