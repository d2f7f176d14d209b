"""Hard faults without Slurm: the step watchdog in a real process and the test-only fault hooks. A
single-node `torchrun --max-restarts` run that survives a kill -9 of one rank: tests/multiproc/test_faults_torchrun.py."""
import subprocess
import sys
import textwrap
import time

import pytest

from elt_scale.engine import faults
from elt_scale.engine.watchdog import WATCHDOG_EXIT_CODE
from tests.conftest import ROOT


def run_watchdog(body: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    code = "import time\nfrom elt_scale.engine.watchdog import StepWatchdog\n" + textwrap.dedent(body)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_watchdog_exits_a_stalled_rank_after_k_times_the_median_step():
    r, took = run_watchdog("""
        w = StepWatchdog(factor=5, min_s=0.5, first_s=30, rank=3, poll_s=0.05)
        for step in range(1, 11):
            time.sleep(0.02)
            w.beat(step)
        time.sleep(0.3)        # slower than 5 x 0.02 s, but under min_s: no exit yet
        w.beat(11)
        time.sleep(60)         # step 12 hangs
        print("not reached")
    """)
    assert r.returncode == WATCHDOG_EXIT_CODE, r.stderr
    assert "rank 3: step 12 has not finished" in r.stderr, r.stderr     # step 11 (0.3 s) was under min_s
    assert "not reached" not in r.stdout and took < 20, (took, r.stderr)


def test_watchdog_allows_a_slow_first_step_and_pauses_and_stops_cleanly():
    r, _ = run_watchdog("""
        w = StepWatchdog(factor=2, min_s=0.3, first_s=2.0, poll_s=0.05)
        time.sleep(1.0)        # compiling: under first_s
        w.beat(1)
        for step in range(2, 6):
            time.sleep(0.02)
            w.beat(step)
        with w.paused():       # a checkpoint save, far longer than a step
            time.sleep(1.5)
        time.sleep(0.02)
        w.beat(6)
        w.stop()
        off = StepWatchdog(factor=0, min_s=0, first_s=0)    # train.watchdog_factor=0: no thread at all
        time.sleep(0.3)
        off.stop()
        print("done")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr


def test_watchdog_excuses_a_storage_outage_then_watches_again():
    """While the loader rides out a storage outage (bounded by data.io_retry_s, exit 69) the step clock does
    not run; once the outage is over a hang is caught as before."""
    r, took = run_watchdog("""
        outage = [True]
        w = StepWatchdog(factor=2, min_s=0.3, first_s=0.3, poll_s=0.05, excused=lambda: outage[0])
        time.sleep(1.5)        # the first step waits for storage: 5 x first_s, excused
        outage[0] = False
        w.beat(1)
        print("survived the outage", flush=True)
        time.sleep(60)         # step 2 hangs
    """)
    assert r.returncode == WATCHDOG_EXIT_CODE and "survived the outage" in r.stdout, r.stderr
    assert "step 2 has not finished" in r.stderr and took < 20, (took, r.stderr)


def test_fault_spec_parses_and_rejects_typos():
    assert faults.plan("nan_steps:2,4;kill_in_save:3;die_at:1:7") == \
        {"nan_steps": {2, 4}, "kill_in_save": 3, "die_at": (1, 7)}
    assert faults.plan("") == {}
    for bad in ("nan_step:2", "die_at:1", "kill_in_save:x"):
        with pytest.raises(ValueError, match="ELT_FAULT="):
            faults.plan(bad)
