"""Step watchdog: a rank whose step stalls exits, so a hang becomes a failure the job can restart.

A collective timeout catches a rank that waits for a peer; it cannot catch the peer itself, stuck
outside any collective (a hung GPU kernel, a dead file system, a deadlock in a data worker), and NCCL
only notices a stuck peer after its own timeout. This thread watches the step clock instead: when the
current step has run longer than `factor` × the median recent step time (at least `min_s`; the first
step, which compiles and warms up, gets `first_s`), it prints what happened and exits the process with
WATCHDOG_EXIT_CODE. The other ranks then fail in their next collective, and slurm/train_large.sh
restarts the job step from the last checkpoint.

    watchdog = StepWatchdog(factor=20, min_s=180, first_s=1800, rank=rank)
    for step in ...:
        ...                              # the step
        watchdog.beat(step + 1)
        with watchdog.paused():          # long and legitimate: a checkpoint save
            save()
    watchdog.stop()

`excused` (optional, polled by the thread): while it returns True the step is waiting for something that is
bounded and logged elsewhere (the loader riding out a storage outage, data.io_retry_s): the clock restarts
instead of running, as in `paused()`.

os._exit, not sys.exit: the main thread is stuck, so an exception raised in this thread would reach
nobody, and atexit handlers or a process-group teardown could block on the very thing that hangs.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from collections import deque

WATCHDOG_EXIT_CODE = 124      # what timeout(1) returns


class StepWatchdog:
    def __init__(self, factor: float, min_s: float, first_s: float, rank: int = 0, poll_s: float = 1.0,
                 history: int = 100, excused=None):
        self.factor, self.min_s, self.first_s, self.rank, self.excused = factor, min_s, first_s, rank, excused
        self.durations: deque[float] = deque(maxlen=history)
        self.step = 0                     # the last finished step
        self.started = time.monotonic()   # when the current step (or pause) began
        self._pauses = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if factor > 0:                    # train.watchdog_factor=0: off
            self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="elt-step-watchdog",
                                            daemon=True)
            self._thread.start()

    def limit(self) -> float:
        """Seconds the current step may take."""
        if not self.durations:
            return self.first_s
        return max(self.min_s, self.factor * statistics.median(self.durations))

    def beat(self, step: int) -> None:
        """Step `step` finished: record its duration, start the clock for the next one."""
        now = time.monotonic()
        with self._lock:
            self.durations.append(now - self.started)
            self.step, self.started = step, now

    @contextlib.contextmanager
    def paused(self):
        """Not a step: the clock stops inside, and the next step's clock starts when it ends."""
        with self._lock:
            self._pauses += 1
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                self.started = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            with self._lock:
                if self.excused is not None and self.excused():
                    self.started = time.monotonic()
                    continue
                elapsed, limit = time.monotonic() - self.started, self.limit()
                if self._pauses or elapsed <= limit:
                    continue
            print(f"elt-train: rank {self.rank}: step {self.step + 1} has not finished after {elapsed:.0f} s "
                  f"(limit {limit:.0f} s: train.watchdog_factor={self.factor:g} x the median step, at least "
                  f"train.watchdog_min_s={self.min_s:g}, train.watchdog_first_s={self.first_s:g} for the first); "
                  f"exiting {WATCHDOG_EXIT_CODE} so that the job restarts from its last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(WATCHDOG_EXIT_CODE)
