"""Preemption: the signals a scheduler sends before it kills a job become "finish this step, save, stop".

Slurm and Kubernetes send SIGTERM before SIGKILL; Slurm sends a signal ahead of the time limit when asked
(`--signal`; hydra-submitit-launcher asks for SIGUSR2 `signal_delay_s` seconds before, its requeue signal); users
send SIGUSR1 by hand. While training, each of them only sets a flag: the loop finishes the step it is on, every rank
agrees to stop at the same step (experiments.engines.ranks: `agree`), the checkpoint of that step is written, run.json
says "preempted", and the process exits with PREEMPTED_EXIT. A handler that was installed before ours (submitit's,
which requeues the job) is handed the signal once the checkpoint is safe, so a requeued sweep continues from it.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

# EX_TEMPFAIL (sysexits.h): "try again later"; distinct from success (0), a failure (1) and a kill (128 + signal)
PREEMPTED_EXIT = 75


def preemption_signals() -> list[signal.Signals]:
    """SIGTERM, SIGUSR1 and submitit's requeue signal (SUBMITIT_PREEMPT_SIGNAL, SIGUSR2 by default)."""
    sigs = [signal.SIGTERM, signal.SIGUSR1]
    usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG"), None)
    if usr is not None and usr not in sigs:
        sigs.append(usr)
    return sigs


class Preempted(Exception):
    """Training stopped at a step boundary because a preemption signal arrived; the checkpoint is written."""

    def __init__(self, signum: Optional[int], step: int, checkpoint: str):
        # signum None: this rank stopped because another rank was signalled
        what = signal.Signals(signum).name if signum else "another rank's preemption signal"
        super().__init__(f"{what} received: stopped after step {step} and saved {checkpoint}; continue with "
                         f"resume=auto")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class PreemptionFlag:
    """While entered, the preemption signals set `received` instead of ending the process. Outside the main
    thread (where Python cannot install handlers) it does nothing, and `received` stays None."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving and stopping", flush=True)
        self.received = signum

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in preemption_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def exit_preempted(e: Preempted) -> None:
    """What the application does after a preempted run: the handler that was there before ours (submitit's
    requeue) takes the signal now that the checkpoint is safe; then exit with PREEMPTED_EXIT."""
    if e.signum is not None and callable(signal.getsignal(e.signum)):
        signal.raise_signal(e.signum)
    raise SystemExit(PREEMPTED_EXIT)
