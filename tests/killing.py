"""Killing child processes at chosen moments, synchronised on events the child produces (a file
it writes, a checkpoint that appears), never on how long the machine takes. The only clock is a
hang guard: a child that neither produces the event nor ends within HANG_GUARD_S is killed and
the test fails as hung, which says nothing about speed."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable

HANG_GUARD_S = 600.0


def wait_for(event: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Block until `event()` is true; fail if `proc` ends first (or hangs past the guard)."""
    start = time.monotonic()
    while not event():
        if proc.poll() is not None:
            raise AssertionError(f"the child process ended (code {proc.returncode}) before {what}")
        if time.monotonic() - start > HANG_GUARD_S:
            proc.kill()
            raise AssertionError(f"hang guard: no {what} and no exit in {HANG_GUARD_S:.0f} s")
        time.sleep(0.01)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (if it still runs) and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
