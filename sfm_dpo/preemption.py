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
"""

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


class PreemptionCallback(TrainerCallback):
    """Installs handlers for `signals` at construction (call it in the main thread, before `train()`).

    Not SIGTERM by default: the torch elastic agent SIGTERMs the surviving workers when one rank dies, and a worker
    that then waits for a step end (blocked in a collective with the dead rank) only delays the failure by the
    agent's 30 s kill timeout; Slurm's own SIGTERM leaves KillWait (30 s) anyway, too short to save a 7B checkpoint.

    After `train()` returns, `.preempted` tells whether it stopped early for a requeue: then skip the final save and
    push (the checkpoint holds everything) and exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1,)):
        self.requested_by: str | None = None  # this rank's signal, set by the handler
        self.preempted = False  # agreed by all ranks at a step end
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the handler runs between two bytecodes, possibly inside a collective.
        self.requested_by = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.requested_by is not None) and not self.preempted:
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            logger.warning(
                "Preemption requested (%s on this rank): saving a checkpoint at step %d and stopping for a requeue",
                self.requested_by or "signal on another rank",
                state.global_step,
            )
        return control

    def on_save(self, args, state, control, **kwargs):
        marker = os.environ.get(REQUEUE_MARKER_ENV)
        if self.preempted and marker and state.is_world_process_zero:
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(f"{state.global_step}\n")
            logger.warning(
                "Checkpoint at step %d saved; asked the launcher to requeue (%s)", state.global_step, marker
            )
