"""Heartbeats and the goodput ledger (issue 34), on real processes: a rank stopped with SIGSTOP ends the job on
every rank within seconds, naming the silent rank and its host; a rank busy compiling for longer than the
heartbeat timeout is not declared hung; the ledger of a run killed once (kill -9) and rerun adds up to its
wall time and counts the steps done twice."""
import json
import signal
import socket
import subprocess
import time

import psutil
import pytest

from elt_scale.engine.heartbeat import HEARTBEAT_EXIT_CODE
from tests.conftest import ROOT, ok, read_metrics, run_train, train_cmd

pytestmark = pytest.mark.multiproc

TINY = ("model.width=32", "train.micro_batch=8", "train.log_every=1", "train.warmup_steps=1")
HEARTBEAT_S = 5


def ranks_of(launcher: subprocess.Popen, n: int, timeout: float = 120) -> list[psutil.Process]:
    """The launcher's elt_scale.train processes, by rank (the deepspeed launcher passes --local_rank=R)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "elt_scale.train" in cmd and "--local_rank=" in cmd:
                found[int(cmd.split("--local_rank=")[1].split()[0])] = p
        if len(found) == n:
            return [found[r] for r in range(n)]
        time.sleep(0.2)
    raise AssertionError("the ranks never appeared")


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.1)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_the_job_within_the_heartbeat_timeout(tmp_path, digits_shards, stopped):
    """SIGSTOP rank `stopped` at step 3: both ranks exit 124 within ~heartbeat timeout, naming that rank. With
    rank 0 stopped, its rendezvous store goes quiet and rank 1 names it."""
    cmd = train_cmd("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=hb",
                    *TINY, "train.steps=2000", f"train.heartbeat_timeout_s={HEARTBEAT_S}", nprocs=2)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        ranks = ranks_of(launcher, 2)
        wait_for_step(tmp_path / "hb", 3, launcher)
        ranks[stopped].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        other = ranks[1 - stopped]
        other.wait(timeout=HEARTBEAT_S + 30)           # the running rank leaves on its own
        took = time.monotonic() - stopped_at
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            p.kill()
        launcher.wait(timeout=60)
    text = log.read_text(errors="replace")
    said = {1: f"rank 1 on {socket.gethostname()} has been silent", 0: "rank 0 on 127.0.0.1 (the rendezvous store)"}
    assert said[stopped] in text and f"exit {HEARTBEAT_EXIT_CODE}" in text, text[-3000:]
    assert took < HEARTBEAT_S + 15, took
    print(f"rank {stopped} stopped: the other rank left {took:.1f} s later (heartbeat timeout {HEARTBEAT_S} s)")


def test_ranks_busy_longer_than_the_heartbeat_timeout_are_not_hung(tmp_path, digits_shards):
    """Compiling the looped block (torch.compile) and then an in-training evaluation of 3,000 samples keep both
    ranks' main threads busy for several heartbeat timeouts (3 s): the run finishes, no rank declared silent."""
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=c",
                  *TINY, "train.steps=2", "train.compile=true", "train.heartbeat_timeout_s=3", "eval.every=2",
                  "eval.loops=4", "eval.num=3000", nprocs=2)
    ok(r)
    evals = [row for row in read_metrics(tmp_path / "c") if "eval_L" in row]
    total = json.loads((tmp_path / "c" / "run_info.json").read_text())["goodput"]
    assert evals[0]["eval_s"] > 2 * 3 and total["eval_s"] > 2 * 3, (evals, total)
    assert "silent" not in r.stderr and "has not answered" not in r.stderr


def test_goodput_ledger_of_a_run_killed_once_adds_up(tmp_path, digits_shards):
    """kill -9 the run after step 13 (checkpoint at 10), rerun: two attempts, the steps after 10 counted as
    redone, and the ledger's parts add up to the wall time from the first start to the end (±2%)."""
    common = ("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=g",
              *TINY, "train.steps=20", "train.save_every=10")
    log = tmp_path / "first.txt"
    with open(log, "w") as f:
        first = subprocess.Popen(train_cmd(*common), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path / "g", 13, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_after = max(r["step"] for r in read_metrics(tmp_path / "g"))
    time.sleep(2)                                          # a restart is not instant
    r = ok(run_train(*common))
    ledger = json.loads((tmp_path / "g" / "goodput.json").read_text())
    a, b = ledger["attempts"]
    total = ledger["total"]
    assert (a["first_step"], b["first_step"], b["last_step"]) == (0, 10, 20)
    # the ledger is written just before each row: the kill may land between the two (one step apart)
    assert killed_after <= a["last_step"] <= killed_after + 1 and total["redone_steps"] == a["last_step"] - 10
    wall = b["updated"] - a["started"]
    parts = sum(total[k] for k in ("startup_s", "effective_training_s", "data_wait_s", "storage_outage_s", "save_s",
                                   "eval_s", "lost_to_faults_s"))
    assert parts == pytest.approx(wall, rel=0.02), (parts, wall, total)
    assert total["lost_to_faults_s"] >= 2.0                # at least the pause between the attempts
    for attempt in (a, b):                                 # each attempt's parts add up to its own wall time
        own = sum(attempt[f"{k}_s"] for k in ("startup", "training", "data_wait", "storage_outage", "save", "eval"))
        assert own == pytest.approx(attempt["wall_s"], rel=0.02), attempt
    info = json.loads((tmp_path / "g" / "run_info.json").read_text())
    assert info["goodput"]["effective_training_ratio"] == total["effective_training_ratio"]
    assert "goodput" in r.stdout and f"{total['redone_steps']} steps redone" in r.stdout
