"""Goodput: where a run's wall time went, per attempt (one process lifetime) and in total.

The trainer tells the ledger what it is doing (`ledger.enter("training")`, `with ledger.during("save")`);
the ledger adds the seconds to that activity. Rank 0 keeps the attempts in runs/NAME/goodput.json (replaced
whole at each logged step and at the end, so a killed attempt leaves its last state behind):

    startup          process start -> the first step done (imports, rendezvous, resume, conversion,
                     reference statistics, compilation and warm-up in the first step)
    training         the steps' own time (forward, backward, optimizer, the step's bookkeeping)
    data_wait        waiting for the next batch; storage_outage: the part of it riding out a storage outage
    save / eval      checkpoints, in-training evaluation
    lost_to_faults   between attempts (from the last sign of the failed one to the next one's start) plus
                     the training time of steps done again after a restart (done after the checkpoint the
                     next attempt resumed from)

`total` sums the attempts; effective training = training - redone; the ratio effective / wall time is the
run's goodput, printed at the end and written into run_info.json."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from ..files import atomic_write_text

FILE = "goodput.json"
PHASES = ("startup", "training", "data_wait", "storage_outage", "save", "eval")


def process_start() -> float:
    """Wall-clock start of this process (imports included): the kernel's start tick (/proc/self/stat, field
    22, in clock ticks since boot) against the boot-time clock, to ~10 ms (psutil's create_time rounds the
    boot time to whole seconds)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):    # not Linux: the ledger starts now
        return time.time()


class Ledger:
    def __init__(self, run_dir: Path, rank: int, start_step: int = 0, started: float | None = None):
        self.path, self.on = Path(run_dir) / FILE, rank == 0
        self.started = process_start() if started is None else started
        self.spent, self.saves = dict.fromkeys(PHASES, 0.0), 0
        self.phase, self._since = "startup", time.monotonic() - (time.time() - self.started)
        self.first_step = self.last_step = start_step
        self.attempts: list[dict] = []

    def enter(self, phase: str) -> str:
        """Switch to `phase` (the time so far goes to the current one); returns the phase left."""
        now = time.monotonic()
        self.spent[self.phase] += now - self._since
        left, self.phase, self._since = self.phase, phase, now
        return left

    @contextlib.contextmanager
    def during(self, phase: str):
        self.saves += phase == "save"
        left = self.enter(phase)
        try:
            yield
        finally:
            self.enter(left)

    def outage(self, seconds: float) -> None:
        """Move `seconds` of data waiting to storage_outage (the loader's io_wait_s of this attempt)."""
        moved = min(seconds - self.spent["storage_outage"], self.spent["data_wait"])
        if moved > 0:
            self.spent["data_wait"] -= moved
            self.spent["storage_outage"] += moved

    def step_done(self, step: int) -> None:
        self.last_step = step

    # --- rank 0: the file -------------------------------------------------------------------------------
    def open(self) -> None:
        """Rank 0, once the run directory exists: read the earlier attempts of this run."""
        if self.on and self.path.exists():
            try:
                self.attempts = json.loads(self.path.read_text()).get("attempts", [])
            except (OSError, ValueError):
                self.attempts = []

    def record(self) -> dict:
        self.enter(self.phase)                       # book the running phase up to now
        wall = time.time() - self.started
        return {"attempt": len(self.attempts) + 1, "host": socket.gethostname(), "started": self.started,
                "updated": time.time(), "first_step": self.first_step, "last_step": self.last_step,
                "wall_s": round(wall, 3), "saves": self.saves,
                **{f"{k}_s": round(v, 3) for k, v in self.spent.items()}}

    def flush(self) -> dict | None:
        """Rank 0: goodput.json with this attempt's record; returns the totals. Never raises on a full disk
        (the metrics and checkpoints report that)."""
        if not self.on:
            return None
        attempts = [*self.attempts, self.record()]
        summary = {"attempts": attempts, "total": totals(attempts)}
        try:
            atomic_write_text(self.path, json.dumps(summary, indent=1))
        except OSError:
            pass
        return summary["total"]


def totals(attempts: list[dict]) -> dict:
    """The run as a whole: wall time from the first start to the last record, split into PHASES plus
    lost_to_faults (gaps between attempts, redone steps) and effective training."""
    out = {f"{k}_s": sum(a[f"{k}_s"] for a in attempts) for k in PHASES}
    out["saves"] = sum(a.get("saves", 0) for a in attempts)
    out["steps_trained"] = sum(a["last_step"] - a["first_step"] for a in attempts)
    gaps = redone = redone_s = 0.0
    for before, after in zip(attempts, attempts[1:]):
        gaps += max(0.0, after["started"] - before["updated"])
        steps = max(0, before["last_step"] - after["first_step"])
        done = max(1, before["last_step"] - before["first_step"])
        redone += steps
        redone_s += before["training_s"] * min(1.0, steps / done)
    wall = attempts[-1]["updated"] - attempts[0]["started"]
    effective = out["training_s"] - redone_s
    out.update(wall_s=round(wall, 3), attempts=len(attempts), redone_steps=int(redone),
               lost_to_faults_s=round(gaps + redone_s, 3), effective_training_s=round(effective, 3),
               effective_training_ratio=round(effective / wall, 4) if wall > 0 else None)
    accounted = sum(out[f"{k}_s"] for k in PHASES if k != "training") + effective + gaps + redone_s
    out["unaccounted_s"] = round(wall - accounted, 3)
    return out


def summary_line(total: dict) -> str:
    t = total
    return (f"goodput {t['effective_training_ratio']:.1%} of {t['wall_s']:.0f} s wall in {t['attempts']} attempt(s): "
            f"training {t['effective_training_s']:.0f} s, start-up {t['startup_s']:.0f} s, data {t['data_wait_s']:.0f} s"
            f" (+{t['storage_outage_s']:.0f} s outages), saves {t['save_s']:.0f} s, eval {t['eval_s']:.0f} s, "
            f"lost to faults {t['lost_to_faults_s']:.0f} s ({t['redone_steps']} steps redone)")
