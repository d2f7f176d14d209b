"""No rank waits in a collective for another rank's solo work (issue 30): real 2-rank runs with a collective
timeout of a few seconds, against work that takes far longer than that.

- In-training evaluation against a shard-directory reference: its statistics (all 1,617 digits through the
  Inception network, ~25 s of work on one rank here) are computed before step 1, split across the ranks,
  and cached; the run finishes with its evaluations logged and no restart.
- A cross-layout resume (ZeRO-2 -> ZeRO-3) whose ds_to_universal conversion on rank 0 is stopped (SIGSTOP)
  for longer than the timeout: the other rank waits through the store, the run finishes; with
  train.solo_timeout_s shorter than the stop, the other rank gives up after it, naming it (issue 41).
- Solo work that fails (issue 41, tests/solo_probe.py: solo() alone, 3 ranks): every waiting rank raises the
  worker's message and exits with the worker's code, although the worker, rank 0, leaves at once with its
  store; the deadline bounds the wait."""
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from elt_scale.dist import free_port
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


def test_the_solo_timeout_bounds_the_wait_for_a_conversion(tmp_path, digits_shards):
    """The conversion stopped for 12 s, train.solo_timeout_s=3: rank 1 gives up after ~3 s naming the knob (the
    first step's allowance, train.watchdog_first_s, is no longer what bounds it)."""
    common = (f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", *TINY, "train.save_every=1",
              "train.keep_last=5")
    ok(run_train("digits_masked.yaml", *common, "run.name=z2", "train.steps=2", "deepspeed.zero_stage=2", nprocs=2))
    copy_checkpoint(tmp_path / "z2", tmp_path / "z3", 2)
    found = {}
    stopper = threading.Thread(target=stop_conversion_for, args=(12, found))
    stopper.start()
    cmd = train_cmd("digits_masked.yaml", *common, "run.name=z3", "train.steps=4", "deepspeed.zero_stage=3",
                    "train.solo_timeout_s=3", "train.watchdog_first_s=600", nprocs=2)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        stopper.join()
    assert r.returncode != 0 and "stopped_at" in found, (r.stdout[-2000:], r.stderr[-3000:])
    assert "rank 0 has been converting" in r.stderr and "longer than 3 s (train.solo_timeout_s)" in r.stderr, \
        r.stderr[-3000:]


def probe_ranks(world: int, deadline_s: float, spec: str, wait_for: int | None = None) -> list[tuple]:
    """tests/solo_probe.py on `world` ranks -> (exit code, stderr) per rank; with `wait_for`, only until that
    many ranks (the first ones after rank 0) have left, the rest killed (None for them)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "solo_probe.py"), str(rank), str(world),
                               str(deadline_s), spec], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    try:
        watched = procs if wait_for is None else procs[1:1 + wait_for]
        done = {p.pid: (p.wait(timeout=180), p.stderr.read()) for p in watched}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [done.get(p.pid) for p in procs]


@pytest.mark.parametrize("kind, code", [("elt_scale.engine.resume:ResumeRefused", 2),
                                        ("elt_scale.data.transport:StorageUnavailable", 69)])
def test_failed_solo_work_reaches_every_waiting_rank(kind, code):
    """Rank 0's work raises and rank 0 leaves at once, taking its store along: ranks 1 and 2 raise the same
    class with its message and exit with the code train.py gives it (2 for a refused resume, 69 for storage)."""
    name = kind.rpartition(":")[2]
    results = probe_ranks(3, 60, f"raise:{kind}")
    assert [rc for rc, _ in results] == [code] * 3, results
    assert f"raised {name}: the probe's own failure" in results[0][1], results[0][1][-2000:]
    for _, err in results[1:]:
        assert (f"raised {name}: rank 0 failed while doing the probe's work: {name}: the probe's own failure"
                in err), err[-2000:]


def test_the_solo_deadline_bounds_the_wait():
    """Rank 0 works for 60 s, the deadline is 2 s: rank 1 gives up after ~2 s, naming the knob, while rank 0
    still works."""
    start = time.monotonic()
    results = probe_ranks(2, 2, "sleep:60", wait_for=1)
    took = time.monotonic() - start
    code, err = results[1]
    assert code == 1 and "raised SoloTimeout: rank 0 has been doing the probe's work for 2 s, longer than 2 s " \
                         "(train.solo_timeout_s)" in err, err[-2000:]
    assert results[0] is None and took < 45, took           # rank 0 was still at work when rank 1 left


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
