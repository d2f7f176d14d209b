"""Hard faults without Slurm: the step watchdog in a real process, the test-only fault hooks, and a
single-node `torchrun --max-restarts` run that survives a kill -9 of one rank."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from elt_scale.engine import faults
from elt_scale.engine.watchdog import WATCHDOG_EXIT_CODE
from tests.conftest import ROOT, read_metrics


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


def last_step(run) -> int:
    try:
        return max((r["step"] for r in read_metrics(run)), default=0)
    except (FileNotFoundError, ValueError):      # not there yet, or a line half-written
        return 0


def rank_pid(out_dir, rank: int) -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if ("elt_scale.train" in cmd and str(out_dir) in cmd and "torch.distributed.run" not in cmd
                    and p.environ().get("RANK") == str(rank)):
                return p.pid
        except psutil.Error:
            continue
    return None


def test_torchrun_max_restarts_resumes_after_a_killed_rank(tmp_path, digits_shards):
    """The README's single-node recipe: torchrun restarts both ranks after rank 1 is killed with -9, the run
    resumes from its last checkpoint and every step is in metrics.jsonl once."""
    steps, run = 150, tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "elt_scale.train", str(ROOT / "recipes" / "digits_masked.yaml"), f"data.shards={digits_shards}",
           f"run.out_dir={tmp_path}", "run.name=tr", "model.width=32", "train.micro_batch=8", "train.log_every=1",
           "train.warmup_steps=2", f"train.steps={steps}", "train.save_every=5", "train.collective_timeout_s=60"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    log = tmp_path / "torchrun.log"                 # a file, not a pipe nobody drains while it runs
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not ((run / "ckpt" / "latest").exists() and last_step(run) >= 7):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        while (victim := rank_pid(tmp_path, 1)) is None:
            assert proc.poll() is None and time.time() < deadline, "rank 1 not found"
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    starts = [int(s) for s in re.findall(rf"steps (\d+)→{steps}", out)]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 5, out[-4000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1)), out[-4000:]
