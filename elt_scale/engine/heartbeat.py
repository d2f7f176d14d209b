"""Heartbeats: every rank says once a second that it is alive and what it is doing, through a connection of
its own to the rendezvous store (short timeouts), never through the training collectives. Only silence ends a
rank: a rank (or the store) that has said nothing for train.heartbeat_timeout_s.

    rank r beats    key "r" = "<seq>|<host>|<step>|<state>|<activity>"   (a thread; the main thread may be busy)
    rank 0 watches  every rank's seq, the other ranks watch rank 0's: one unchanged for the timeout is declared
                    silent; the watcher writes the verdict under "abort", and every rank's beat thread, which
                    reads "abort" each second, prints it and exits HEARTBEAT_EXIT_CODE. The others watch rank 0
                    themselves because rank 0 need not host the store (torchrun's agent does): a stopped rank 0
                    then leaves the store answering and only its own beats stop.
    a failed beat   a reset connection or an answer slower than the client's timeout: the next beat, a second
                    later, goes through a new connection. Silence is counted only over time in which this
                    watcher's own reads went through, so a store blip never makes a healthy rank look silent.
    the store       one that has answered nothing for the timeout is silence too: rank 0's (it hosts the store
                    under srun and the deepspeed launcher) or the agent's. A store hosted by rank 0 that refuses
                    connections has lost its listening socket with rank 0's process: the others end at once.
                    The agent's refusing says only that the agent is gone, no rank: it waits out the timeout.
    the end         stop() writes a last beat in state "off", and an off rank is never silent. Rank 0 going off
                    stands the others' watchers down (rank 0 is finished; its store may leave with it), and
                    rank 0 waits, bounded by the timeout, until each has written its own "off": no rank exits
                    124 because another finished first.

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

from .distributed import StoreGone, agent_hosts_store, store_client
from .watchdog import WATCHDOG_EXIT_CODE

HEARTBEAT_EXIT_CODE = WATCHDOG_EXIT_CODE
BEAT_S = 1.0
ON, OFF = "on", "off"


class Heartbeat:
    """Beats for this rank and watches (rank 0: every rank; the others: rank 0) until `stop()`. `activity` is a
    callable that says what the rank is doing (the goodput ledger's phase); `step()` the last finished step."""

    def __init__(self, rank: int, world: int, timeout_s: float, activity=lambda: "", step=lambda: 0):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.activity, self.step = activity, step
        self.host = socket.gethostname()
        self._stop, self._off, self._thread = threading.Event(), threading.Event(), None
        if world == 1 or timeout_s <= 0:
            return
        self.client_s = min(5.0, timeout_s / 3)
        self.store, self._seq, self._seen = None, 0, {}
        self._began = self._last_ok = time.monotonic()
        self._round(watch=False)                       # present before anyone watches
        self._thread = threading.Thread(target=self._run, name="elt-heartbeat", daemon=True)
        self._thread.start()
        threading.Thread(target=self._supervise, name="elt-heartbeat-supervisor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:                   # rank 0 waits for the others' "off" (bounded)
            self._thread.join(timeout=self.timeout_s + 2 * self.client_s + 5)   # a blocked beat is a daemon

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            if not self._round():                      # rank 0 is off: nothing left to watch for
                self._off.set()
                self._quietly(lambda: self._beat(OFF))
                return
        self._off.set()
        self._quietly(self._leave)

    def _round(self, watch: bool = True) -> bool:
        """One beat, the verdict, the watch. A connection that fails (reset, or half-open after a timeout) is
        replaced at once and the round tried again; a new one that fails too, next second. Only a refusal from
        a store rank 0 hosts ends this rank here. Returns False once rank 0 is off."""
        for _ in range(2):
            reused = self.store is not None
            try:
                if not reused:
                    self.store = store_client("elt_heartbeat", self.client_s)
                self._beat(ON)
                if self.store.check(["abort"]):
                    self._exit(self.store.get("abort").decode())
                going_on = self._watch() if watch else True
                self._last_ok = time.monotonic()
                return going_on
            except StoreGone as e:
                if self.rank != 0 and not agent_hosts_store():
                    self._exit(f"rank 0 on {os.environ.get('MASTER_ADDR', '?')} (the rendezvous store) is gone: {e}")
            except Exception:                           # noqa: BLE001 -- any store error: a new connection
                pass
            self.store = None
            if not reused:
                break
        return True

    def _beat(self, state: str) -> None:
        self._seq += 1
        self.store.set(str(self.rank), f"{self._seq}|{self.host}|{self.step()}|{state}|{self.activity()}")

    def _watch(self) -> bool:
        """Rank 0: every rank's latest beat; the others: rank 0's. One unchanged for timeout_s is silent ->
        abort for all. Returns False when rank 0 has gone off."""
        now = time.monotonic()
        blind = now - self._last_ok - BEAT_S            # rounds that failed: silence nobody could have seen
        if blind > BEAT_S:
            self._began += blind
            self._seen = {r: (beat, t + blind) for r, (beat, t) in self._seen.items()}
        ranks = [r for r in (range(self.world) if self.rank == 0 else [0]) if r != self.rank]
        present = [r for r in ranks if r in self._seen or self.store.check([str(r)])]   # until each beat once
        if len(present) < len(ranks) and now - self._began > self.timeout_s:
            missing = sorted(set(ranks) - set(present))
            self._abort(f"rank {missing[0]} has not beaten once in {now - self._began:.0f} s")
        beats = self.store.multi_get([str(r) for r in present]) if present else []   # one round trip
        for r, raw in zip(present, beats):
            beat = raw.decode()
            _, host, step, state, activity = beat.split("|", 4)
            if state == OFF:
                if r == 0:
                    return False
                self._seen[r] = (beat, float("inf"))    # finished: never silent
            elif self._seen.get(r, (None,))[0] != beat:
                self._seen[r] = (beat, now)
            elif now - self._seen[r][1] > self.timeout_s:
                self._abort(f"rank {r} on {host} has been silent for {now - self._seen[r][1]:.0f} s (last beat: "
                            f"{activity or 'starting'}, after step {step})")
        return True

    def _leave(self) -> None:
        """The last beat, "off". Rank 0 then waits until every rank it has seen is off too (each stands down
        within a second of reading rank 0's), at most timeout_s: its store may leave with its process, and a
        rank that had not yet read "off" would take the vanished store for a dead rank 0."""
        if self.store is None:
            self.store = store_client("elt_heartbeat", self.client_s)
        self._beat(OFF)
        if self.rank != 0:
            return
        others, deadline = [str(r) for r in sorted(self._seen)], time.monotonic() + self.timeout_s
        while others and time.monotonic() < deadline:
            if all(raw.decode().split("|", 4)[3] == OFF for raw in self.store.multi_get(others)):
                return
            time.sleep(BEAT_S / 4)

    def _supervise(self) -> None:
        """A store that stops answering (rank 0 or the agent stopped) blocks the beat thread in its read,
        whatever the client's timeout says (measured: a check() on a SIGSTOPped server never returns), and a
        failing one keeps it retrying: watch the last round that went through from here."""
        while not self._stop.wait(BEAT_S) and not self._off.is_set():
            silent = time.monotonic() - self._last_ok
            if silent > self.timeout_s:
                self._exit(f"{self._store_name()} has not answered for {silent:.0f} s (train.heartbeat_timeout_s="
                           f"{self.timeout_s:g}): ending this rank, exit {HEARTBEAT_EXIT_CODE}, so that the job "
                           f"restarts from its last checkpoint")

    def _store_name(self) -> str:
        addr = os.environ.get("MASTER_ADDR", "?")
        if self.rank == 0 and not agent_hosts_store():     # in this process: only a stop of its own silences it
            return "this rank's own rendezvous store (rank 0 itself was stopped)"
        if agent_hosts_store():
            return f"the rendezvous store at {addr}:{os.environ.get('MASTER_PORT', '?')} (torchrun's agent)"
        return f"rank 0 on {addr} (the rendezvous store)"

    def _abort(self, why: str) -> None:
        verdict = (f"{why}; train.heartbeat_timeout_s={self.timeout_s:g}: ending the job on every rank, exit "
                   f"{HEARTBEAT_EXIT_CODE}, so that it restarts from its last checkpoint")
        self._quietly(lambda: self.store.set("abort", verdict))
        time.sleep(2 * BEAT_S)                         # the others read it before rank 0's store goes away
        self._exit(verdict)

    @staticmethod
    def _quietly(store_work) -> None:
        """Store work whose failure changes nothing: the process is leaving either way."""
        try:
            store_work()
        except Exception:                               # noqa: BLE001
            pass

    def _exit(self, verdict: str) -> None:
        print(f"elt-train: rank {self.rank}: {verdict}", file=sys.stderr, flush=True)
        os._exit(HEARTBEAT_EXIT_CODE)
