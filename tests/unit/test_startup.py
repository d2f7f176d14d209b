"""Start-up waits (elt_scale/engine/startup.py): bounded, said aloud, and a stale torch extension lock (left by a
process killed while it held it) taken over instead of waited on forever."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elt_scale.engine.startup import STARTUP_EXIT_CODE, extensions_root, take_over_stale_locks
from tests.conftest import ROOT, ok, run_train


def age(path: Path, seconds: float) -> None:
    """Set path (and, for a directory, everything in it) `seconds` into the past, as a lock left long ago."""
    t = time.time() - seconds
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def op_dir(root: Path, name: str) -> Path:
    d = root / "py311_cpu" / name
    d.mkdir(parents=True)
    (d / f"{name}.so").write_bytes(b"")
    return d


def test_only_an_old_lock_whose_directory_has_been_quiet_is_taken_over(tmp_path):
    stale, live, mine = (op_dir(tmp_path, name) for name in ("deepspeed_shm_comm", "fused_adam", "cpu_adam"))
    for d in (stale, live, mine):
        (d / "lock").touch()
        age(d, 600)
    (live / "shm.o").write_bytes(b"x")              # a compiler still writing there: its holder is alive
    age(mine, 300)                                  # quiet, but taken after this process began to wait
    said = []
    assert take_over_stale_locks(tmp_path, 120, time.time() - 1000, said.append) == []   # all taken since then
    assert take_over_stale_locks(tmp_path, 120, time.time() - 400, said.append) == [stale / "lock"]
    assert not (stale / "lock").exists() and (live / "lock").exists() and (mine / "lock").exists()
    assert len(said) == 1 and re.fullmatch(re.escape(f"removed a stale lock {stale / 'lock'} (nothing in its directory "
                                                     f"changed for ") + r"60\d s; the process that took it is gone\) so "
                                           r"that the DeepSpeed op it guards can load", said[0]), said


def test_extensions_root_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path


WAIT = """
import time
from elt_scale.engine.startup import waiting
with waiting("the thing a test waits for", bound_s={bound}, stale_after_s=300, say_every_s=1, poll_s=0.2):
    time.sleep({sleep})
print("after the wait")
"""


def run_wait(tmp_path, bound, sleep):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), RANK="3")
    return subprocess.run([sys.executable, "-c", WAIT.format(bound=bound, sleep=sleep)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_wait_past_its_bound_exits_124_naming_what_it_waited_for_and_the_lock_in_the_way(tmp_path):
    (op_dir(tmp_path, "deepspeed_shm_comm") / "lock").touch()       # fresh: a live holder, as far as anyone knows
    start = time.monotonic()
    r = run_wait(tmp_path, bound=3, sleep=60)
    assert r.returncode == STARTUP_EXIT_CODE and time.monotonic() - start < 15
    lines = r.stderr.splitlines()
    assert lines[0].startswith("elt-train: rank 3: still waiting for the thing a test waits for (1 s of 3); extension "
                               "lock(s) in the way: ")
    assert lines[-1].startswith("elt-train: rank 3: gave up waiting for the thing a test waits for after 3 s "
                                "(train.startup_timeout_s=3); extension lock(s) in the way: ")
    assert lines[-1].endswith(f"deepspeed_shm_comm/lock; exiting {STARTUP_EXIT_CODE}")
    assert "after the wait" not in r.stdout


def test_a_wait_within_its_bound_says_nothing(tmp_path):
    r = run_wait(tmp_path, bound=30, sleep=0.5)
    assert r.returncode == 0 and r.stdout == "after the wait\n" and r.stderr == ""


def test_a_training_start_with_a_stale_extension_lock_takes_it_over_and_trains(tmp_path, digits_shards):
    """The measured hang: a start killed while DeepSpeed loaded its op left `lock` behind, and every later start
    slept on it without a word. Here: the built op in an extensions directory of the test's own, its lock left
    there long ago."""
    built = Path.home() / ".cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    if not (built / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists():
        pytest.fail(f"no built deepspeed_shm_comm under {built}: `make setup` builds it")
    ext = tmp_path / "ext"
    shutil.copytree(built / "deepspeed_shm_comm", ext / "deepspeed_shm_comm", symlinks=True)   # keeps mtimes: no rebuild
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()
    age(lock, 3600)       # only the lock: older object files than the sources would make ninja rebuild the op
    time.sleep(1.5)
    r = ok(run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "train.steps=1",
                     "train.startup_timeout_s=240", "train.stale_lock_s=1", env={"TORCH_EXTENSIONS_DIR": str(ext)},
                     timeout=300))
    assert f"removed a stale lock {lock} (nothing in its directory changed for " in r.stderr
    assert not lock.exists() and (tmp_path / "digits_masked" / "metrics.jsonl").exists()
