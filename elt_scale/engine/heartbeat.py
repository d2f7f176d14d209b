"""Heartbeats: every rank says once a second that it is alive and what it is doing, through a connection of
its own to the rendezvous store (short timeouts), never through the training collectives.

    rank r beats   key "r" = "<seq>|<host>|<activity>|<step>"      (a thread; the main thread may be busy)
    rank 0 watches every rank's seq: one unchanged for train.heartbeat_timeout_s is declared silent, rank 0
                   writes the verdict under "abort", and every rank's beat thread, which reads "abort" each
                   second, prints it and exits HEARTBEAT_EXIT_CODE
    rank 0 silent  its store is rank 0's own process: the others' beats fail, and after the same timeout
                   each of them exits, naming rank 0 and its host; a store that refuses the connection
                   (rank 0's process is gone) ends them at once

A process that is stopped (SIGSTOP, a frozen node) or dead stops beating; a process that is only busy - a
long compilation, save, conversion, evaluation or a storage outage within data.io_retry_s - keeps beating
from its thread and is never mistaken for a hang. A main thread that hangs while its process lives is the
step watchdog's to catch (watchdog.py), the second line. The exit code is the watchdog's (124): the
launcher (slurm/train_large.sh) restarts the job from its last checkpoint.

os._exit, not an exception: the main thread is stuck in a collective that will never complete."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch

from .watchdog import WATCHDOG_EXIT_CODE

HEARTBEAT_EXIT_CODE = WATCHDOG_EXIT_CODE
BEAT_S = 1.0


def store_client(timeout_s: float):
    """A client of the rendezvous store (MASTER_ADDR:MASTER_PORT) of its own, short timeouts; keys under a
    prefix per torchrun attempt, so that a restarted job does not read the failed attempt's beats."""
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"elt_heartbeat_{attempt}_{os.environ['MASTER_PORT']}", store)


class Heartbeat:
    """Beats for this rank (and, on rank 0, watches the others) until `stop()`. `activity` is a callable that
    says what the rank is doing (the goodput ledger's phase); `step()` the last finished step."""

    def __init__(self, rank: int, world: int, timeout_s: float, activity=lambda: "", step=lambda: 0):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.activity, self.step = activity, step
        self.host = socket.gethostname()
        self._stop, self._thread = threading.Event(), None
        if world == 1 or timeout_s <= 0:
            return
        self.store = store_client(min(5.0, timeout_s / 3))
        self._seq, self._last_ok = 0, time.monotonic()
        self._beat()                                   # present before anyone watches
        self._thread = threading.Thread(target=self._run, name="elt-heartbeat", daemon=True)
        self._thread.start()
        if rank != 0:                                  # rank 0 holds the store: its reads cannot hang on it
            threading.Thread(target=self._supervise, name="elt-heartbeat-supervisor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * BEAT_S + 5)      # a beat blocked on a vanished store is a daemon

    def _beat(self) -> None:
        self._seq += 1
        self.store.set(str(self.rank), f"{self._seq}|{self.host}|{self.activity()}|{self.step()}")

    def _run(self) -> None:
        seen, began = {}, time.monotonic()
        while not self._stop.wait(BEAT_S):
            try:
                self._beat()
                if self.store.check(["abort"]):
                    self._exit(self.store.get("abort").decode())
                if self.rank == 0:
                    self._watch(seen, began)
                self._last_ok = time.monotonic()
            except Exception as e:            # noqa: BLE001 -- the store is rank 0's process
                if self._stop.wait(3 * BEAT_S):                # rank 0 finished first and took its store along
                    return
                self._exit(f"rank 0 on {os.environ.get('MASTER_ADDR', '?')} (the rendezvous store) is gone: "
                           f"{(str(e).strip().splitlines() or [''])[0]}")

    def _supervise(self) -> None:
        """A store that stops answering (rank 0 stopped) blocks the beat thread in its read, whatever the
        client's timeout says (measured: a check() on a SIGSTOPped server never returns): watch it from here."""
        while not self._stop.wait(BEAT_S):
            silent = time.monotonic() - self._last_ok
            if silent > self.timeout_s:
                self._exit(f"rank 0 on {os.environ.get('MASTER_ADDR', '?')} (the rendezvous store) has not answered "
                           f"for {silent:.0f} s (train.heartbeat_timeout_s={self.timeout_s:g}): ending this rank, exit "
                           f"{HEARTBEAT_EXIT_CODE}, so that the job restarts from its last checkpoint")

    def _watch(self, seen: dict, began: float) -> None:
        """Rank 0: every rank's latest beat; one unchanged for timeout_s is silent -> abort for all."""
        now = time.monotonic()
        ranks = range(self.world)
        if len(seen) < self.world:                     # until every rank has beaten once: key by key
            ranks = [r for r in ranks if r in seen or self.store.check([str(r)])]
            if len(ranks) < self.world and now - began > self.timeout_s:
                missing = sorted(set(range(self.world)) - set(ranks))
                self._abort(f"rank {missing[0]} has not beaten once in {now - began:.0f} s")
        beats = self.store.multi_get([str(r) for r in ranks])     # one round trip for all ranks
        for r, raw in zip(ranks, beats):
            beat = raw.decode()
            if seen.get(r, (None,))[0] != beat:
                seen[r] = (beat, now)
            elif now - seen[r][1] > self.timeout_s:
                _, host, activity, step = beat.split("|", 3)
                self._abort(f"rank {r} on {host} has been silent for {now - seen[r][1]:.0f} s (last beat: "
                            f"{activity or 'starting'}, after step {step})")

    def _abort(self, why: str) -> None:
        verdict = (f"{why}; train.heartbeat_timeout_s={self.timeout_s:g}: ending the job on every rank, exit "
                   f"{HEARTBEAT_EXIT_CODE}, so that it restarts from its last checkpoint")
        self.store.set("abort", verdict)
        time.sleep(2 * BEAT_S)                         # the others read it before rank 0's store goes away
        self._exit(verdict)

    def _exit(self, verdict: str) -> None:
        print(f"elt-train: rank {self.rank}: {verdict}", file=sys.stderr, flush=True)
        os._exit(HEARTBEAT_EXIT_CODE)
