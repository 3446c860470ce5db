"""Stopping cleanly when the cluster asks (SLURM ``--signal=USR1@120``, ``scancel``, a time limit).

A signal handler only sets a flag. After every optimizer step the trainer asks
:meth:`Preemption.should_stop`, which all-reduces the flag (MAX) so that every rank stops after the
*same* step even if the signal reached only some of them. The trainer then writes a checkpoint of
that step and the process exits with :data:`EXIT_PREEMPTED`; rank 0 may first ask SLURM to requeue
the job (``launcher.requeue=true``). ``resume=auto`` continues from exactly that step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch

from . import distributed

log = logging.getLogger(__name__)

#: Exit status of a run that stopped on a preemption signal (or ``train.stop_after_steps``) after
#: writing its checkpoint: "temporary failure, try again" (BSD ``EX_TEMPFAIL``). Resume with
#: ``resume=auto``.
EXIT_PREEMPTED = 75


class Preemption:
    def __init__(self, signal_names: list[str], device: torch.device, requeue: bool = False, rank: int = 0):
        self.device = device
        self.requeue_enabled = requeue
        self.rank = rank
        self.received: int | None = None
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank received a signal (a collective: call it on all)."""
        return distributed.all_reduce_max(1.0 if self.received is not None else 0.0, self.device) > 0

    def requeue(self) -> bool:
        """Rank 0 under SLURM with ``launcher.requeue``: ``scontrol requeue $SLURM_JOB_ID``."""
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue_enabled and self.rank == 0 and job):
            return False
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return False
        log.info("requeued SLURM job %s", job)
        return True

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
