"""Reward calls with a time limit: one worker process runs them, is reused from batch to batch,
and is killed and restarted when a call overruns (`RewardScorer(..., timeout=SECONDS)`, the
`--reward-timeout` flag of `dsv32 grpo`).

A Python function cannot be interrupted safely from inside its own process (a signal cannot
stop C code, a thread cannot be killed), so the limit is enforced from outside: the scorer sends
a batch of calls to the worker, which answers one call at a time; each answer must come within
`timeout` seconds of the previous one (of the batch being sent, for the first). A call that
overruns is a failure, the worker is killed (SIGKILL) and a fresh one continues with the calls
after it. A worker that dies inside a call (os._exit, a crash in C code) is handled alike.

Workers are started with multiprocessing's "forkserver" method where there is one (Linux;
"spawn" elsewhere): never a fork of the trainer, which holds torch's threads, but a fork of a
small server process that imported torch and this package once, so a replacement worker starts
in milliseconds. Either way the reward functions must be picklable: module-level functions, or
instances of module-level classes (`rewards.task_reward` returns one). Starting time is not
counted against any call (the clock starts once the worker says it is ready). The worker exits
when the scorer's process does, even if that was killed. As with any multiprocessing program, a
script that uses a time limit runs its work under `if __name__ == "__main__":` (the worker
imports the main module).

Left out: a pool of several workers (reward calls here are cheap next to sampling; one worker
keeps the scores in order and the code small) and memory limits.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from typing import Any, Callable, Sequence

# One call's outcome, as sent back by the worker: ("ok", value) with value a float, or
# ("fail", kind, message) with kind a short label ("ZeroDivisionError", "NaN", "timeout", ...).
Outcome = tuple


def _exit_with_scorer(alive: Any) -> None:
    """Exit when the scorer's end of the `alive` pipe closes: the scorer stopped us, or its
    process is gone (a SIGKILLed trainer leaves no one else to). Not a check of the parent: under
    forkserver the worker's parent is the server, and a dead scorer may linger as a zombie."""
    try:
        alive.recv()
    except EOFError:
        pass
    os._exit(0)


def _serve(conn: Any, alive: Any, fns: Sequence[Callable], call: Callable) -> None:
    """The worker's loop: for each (function index, calls) received, send one outcome per call."""
    threading.Thread(target=_exit_with_scorer, args=(alive,), daemon=True).start()
    conn.send(("ready",))
    while True:
        try:
            index, calls = conn.recv()
        except EOFError:                                   # the scorer closed the pipe
            return
        for prompt, completion, example in calls:
            conn.send(call(fns[index], prompt, completion, example))


class RewardWorker:
    """Runs `call(fns[i], prompt, completion, example) -> Outcome` in a worker process with a
    per-call time limit (module docstring). `call` must be a module-level function."""

    def __init__(self, fns: Sequence[Callable], names: Sequence[str], call: Callable, timeout: float) -> None:
        for fn, name in zip(fns, names):
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(f"a reward time limit runs reward functions in a worker process, so each must be "
                                 f"picklable (a module-level function); {name!r} is not ({type(e).__name__}: {e})"
                                 ) from None
        self.fns, self.call, self.timeout = list(fns), call, float(timeout)
        if "forkserver" in multiprocessing.get_all_start_methods():
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(["dsv32.rl.rewards"])   # takes effect when the server starts
        else:
            self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._alive: Any = None
        self.restarts = 0                                  # workers replaced after a timeout or a crash

    def _start(self) -> None:
        ours, theirs = self._ctx.Pipe()
        alive_r, alive_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_serve, args=(theirs, alive_r, self.fns, self.call), daemon=True,
                                 name="dsv32-reward-worker")
        proc.start()
        theirs.close()
        alive_r.close()
        try:
            ours.recv()              # "ready": no time limit here, starting is not a reward call
        except EOFError:
            proc.join()
            raise RuntimeError(f"the reward worker process exited while starting (code {proc.exitcode}); "
                               f"run without a reward time limit to see the reward module's error") from None
        self._proc, self._conn, self._alive = proc, ours, alive_w

    def _stop(self) -> None:
        if self._proc is not None:
            self._conn.close()
            self._alive.close()
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = self._alive = None

    def run(self, index: int, calls: Sequence[tuple[str, str, Any]]) -> list[Outcome]:
        """The outcomes of `fns[index]` on each (prompt, completion, example), in order."""
        outcomes: list[Outcome] = []
        pending = list(calls)
        while pending:
            if self._proc is None:
                self._start()
            self._conn.send((index, pending))
            for k in range(len(pending)):
                failure = None
                if not self._conn.poll(self.timeout):
                    failure = ("fail", "timeout", f"took longer than the {self.timeout:g} s limit")
                else:
                    try:
                        outcomes.append(self._conn.recv())
                        continue
                    except EOFError:
                        failure = ("fail", "worker crash", "ended the worker process")
                outcomes.append(failure)
                self._stop()
                self.restarts += 1
                pending = pending[k + 1:]
                break
            else:
                pending = []
        return outcomes

    def close(self) -> None:
        self._stop()
