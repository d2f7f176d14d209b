"""Preemption: a signal on any rank becomes a checkpoint on every rank and a requeue exit code.

Slurm (and most schedulers) warn a job before killing it: `#SBATCH --signal=USR1@300` sends SIGUSR1 to
every task of the job steps, i.e. to every rank (not `B:USR1`, which signals only the batch shell: it
dies, no rank saves, nothing is requeued); `scancel` and the end of a time limit send SIGTERM. The handler only sets a flag; the training loop
all-reduces the flag at the next step boundary (so every rank agrees even if only one was signalled),
saves a checkpoint, and every rank exits with

    PREEMPT_EXIT_CODE = 75   (EX_TEMPFAIL: "try again later")

slurm/ scripts requeue the job (`scontrol requeue $SLURM_JOB_ID`) when the trainer exits with 75; the
requeued job finds the checkpoint in its run directory and resumes at the next step.
"""
from __future__ import annotations

import signal

PREEMPT_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 on this process; read (and agreed on) by the training loop."""

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.requested = False
        self.signal_name: str | None = None
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:   # async-signal context: only set flags
        self.requested = True
        self.signal_name = signal.Signals(signum).name
