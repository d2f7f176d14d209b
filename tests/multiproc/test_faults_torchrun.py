"""A single-node `torchrun --max-restarts` run that survives a kill -9 of one rank. The step watchdog and the
test-only fault hooks: tests/unit/test_faults.py."""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, read_metrics

pytestmark = pytest.mark.multiproc      # torchrun starts two ranks


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
    """docs/cluster.md's single-node recipe: torchrun restarts both ranks after rank 1 is killed with -9, the run
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
