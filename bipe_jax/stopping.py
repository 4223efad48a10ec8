"""SIGTERM and Ctrl-C as a request to checkpoint at the current step and stop.

Every process of a multi-process run must stop at the same step, or one
enters the collective save while the others train on and the job hangs. One
process: Python handlers set a flag that the loop reads after each step.
Several processes: jax.distributed installs a SIGTERM notifier whose
preemption sync point (`reached_preemption_sync_point`) returns True at the
same step on every process once any of them was signalled; SIGTERM is left to
it (a Python handler would replace it), and Ctrl-C is forwarded to it as
SIGTERM. A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import os
import signal

import jax
from jax._src import distributed
from jax.experimental import multihost_utils

_ABORT = (b"\nsecond Ctrl-C: aborting at once; the checkpoint being written is "
          b"discarded, the previous one is kept\n")


class StopRequest:
  """Context manager; `reached(step)` names the signal once every process should stop."""

  def __init__(self):
    self.received = None
    self._old = {}
    self._synced = False

  def __enter__(self):
    self._synced = (jax.process_count() > 1
                    and distributed.global_state.preemption_sync_manager is not None)
    handlers = {signal.SIGINT: self._interrupt}
    if not self._synced:
      handlers[signal.SIGTERM] = self._terminate
    for sig, handler in handlers.items():
      self._old[sig] = signal.signal(sig, handler)
    return self

  def _terminate(self, signum, frame):  # pylint: disable=unused-argument
    self.received = self.received or "SIGTERM"

  def _interrupt(self, signum, frame):  # pylint: disable=unused-argument
    if self.received == "SIGINT":
      # No print() here: the handler may run inside a print of the main thread.
      os.write(2, _ABORT)
      os._exit(130)  # pylint: disable=protected-access
    self.received = self.received or "SIGINT"
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> str | None:
    """The signal's name when training should checkpoint `step` and stop, else None.

    Call it once per step on every process: the sync point is a protocol
    between the processes.
    """
    if self._synced:
      return (self.received or "SIGTERM") if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
