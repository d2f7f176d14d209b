"""No rank waits in a collective for another rank's solo work (issue 30): real 2-rank runs with a collective
timeout of a few seconds, against work that takes far longer than that.

- In-training evaluation against a shard-directory reference: its statistics (all 1,617 digits through the
  Inception network, ~25 s of work on one rank here) are computed before step 1, split across the ranks,
  and cached; the run finishes with its evaluations logged and no restart.
- A cross-layout resume (ZeRO-2 -> ZeRO-3) whose ds_to_universal conversion on rank 0 is stopped (SIGSTOP)
  for longer than the timeout: the other rank waits through the store, the run finishes."""
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from elt_scale.inference.reference import default_cache_dir, reference_key
from elt_scale.metrics import file_sha256
from tests.conftest import ROOT, copy_checkpoint, ok, read_metrics, run_train, train_cmd

pytestmark = pytest.mark.multiproc

TIMEOUT_S = 4
TINY = ("model.width=32", "train.micro_batch=8", "train.log_every=1", "train.warmup_steps=1",
        f"train.collective_timeout_s={TIMEOUT_S}", "data.io_retry_s=1", "data.io_timeout_s=1")   # the deadline: 4 s


def test_reference_statistics_longer_than_the_collective_timeout(tmp_path, digits_shards):
    from tests.tiny_models import TinyInception, scripted
    weights = scripted(TinyInception(), tmp_path / "inception-tiny.pt")
    cached = default_cache_dir() / f"{reference_key(digits_shards, file_sha256(weights), 50_000)}.npz"
    cached.unlink(missing_ok=True)
    try:
        start = time.monotonic()
        r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=ev",
                      *TINY, "train.steps=4", "eval.every=2", "eval.loops=2", "eval.num=16", "eval.batch_size=8",
                      "model.num_classes=11", f"eval.reference={digits_shards}", f"eval.inception_weights={weights}",
                      nprocs=2)
        took = time.monotonic() - start
        ok(r)
        assert cached.is_file()
    finally:
        cached.unlink(missing_ok=True)
    rows = read_metrics(tmp_path / "ev")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    evals = [row for row in rows if "eval_L" in row]
    assert [row["step"] for row in evals] == [2, 4] and all(row["fid"] > 0 for row in evals)
    assert "resumed" not in r.stdout + r.stderr            # one attempt (the launcher never restarts: rc 0 says it)
    print(f"2 ranks, collective timeout {TIMEOUT_S} s: reference statistics + 4 steps + 2 evaluations in {took:.0f} s")


def stop_conversion_for(seconds: float, found: dict, deadline_s: float = 300) -> None:
    """SIGSTOP the ds_to_universal process as soon as it appears, SIGCONT it `seconds` later."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for p in psutil.process_iter(["cmdline"]):
            if "deepspeed.checkpoint.ds_to_universal" in " ".join(p.info["cmdline"] or []):
                p.send_signal(signal.SIGSTOP)
                found["stopped_at"] = time.monotonic()
                time.sleep(seconds)
                p.send_signal(signal.SIGCONT)
                return
        time.sleep(0.05)


def test_conversion_longer_than_the_collective_timeout(tmp_path, digits_shards):
    common = (f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", *TINY, "train.save_every=1",
              "train.keep_last=5")
    ok(run_train("digits_masked.yaml", *common, "run.name=z2", "train.steps=2", "deepspeed.zero_stage=2", nprocs=2))
    copy_checkpoint(tmp_path / "z2", tmp_path / "z3", 2)
    found = {}
    stopper = threading.Thread(target=stop_conversion_for, args=(3 * TIMEOUT_S, found))
    stopper.start()
    cmd = train_cmd("digits_masked.yaml", *common, "run.name=z3", "train.steps=4", "deepspeed.zero_stage=3", nprocs=2)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    stopper.join()
    ok(r)
    assert "stopped_at" in found, "the conversion process was never seen"
    assert "loaded by own per-parameter load" in r.stderr
    assert [row["step"] for row in read_metrics(tmp_path / "z3")] == [1, 2, 3, 4]
    assert (tmp_path / "z3" / "ckpt" / "step_00000002" / "universal" / "zero").is_dir()


def test_a_restart_waits_for_the_conversion_an_earlier_attempt_started(tmp_path, digits_shards):
    """Attempt 1 of a ZeRO-2 -> ZeRO-3 resume starts the conversion, which is stopped (SIGSTOP) and the whole
    attempt killed (-9); attempt 2 finds the converter alive through its lock file and waits for it instead of
    starting over; once it runs again, the run finishes from the same conversion."""
    common = (f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", *TINY, "train.save_every=1",
              "train.keep_last=5")
    ok(run_train("digits_masked.yaml", *common, "run.name=z2", "train.steps=2", "deepspeed.zero_stage=2", nprocs=2))
    copy_checkpoint(tmp_path / "z2", tmp_path / "z3", 2)
    cmd = train_cmd("digits_masked.yaml", *common, "run.name=z3", "train.steps=4", "deepspeed.zero_stage=3", nprocs=2)
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    converter = None
    deadline = time.monotonic() + 300
    while converter is None and time.monotonic() < deadline:
        converter = next((p for p in psutil.process_iter(["cmdline"]) if "deepspeed.checkpoint.ds_to_universal"
                          in " ".join(p.info["cmdline"] or [])), None)
        time.sleep(0.05)
    assert converter is not None, "the conversion never started"
    converter.suspend()
    os.killpg(first.pid, signal.SIGKILL)             # attempt 1 dies whole; the converter has its own session
    first.wait(timeout=60)
    log = tmp_path / "second.txt"
    try:
        with open(log, "w") as f:
            second = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "started by an earlier attempt" not in log.read_text(errors="replace"):
            assert second.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert converter.is_running() and converter.status() == psutil.STATUS_STOPPED
    finally:
        converter.resume()
    assert second.wait(timeout=300) == 0, log.read_text(errors="replace")[-3000:]
    assert [row["step"] for row in read_metrics(tmp_path / "z3")] == [1, 2, 3, 4]
    assert (tmp_path / "z3" / "ckpt" / "step_00000002" / "universal" / "zero").is_dir()
