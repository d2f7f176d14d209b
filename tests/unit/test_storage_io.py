"""Issue 22, the loader and the small files (fast): a read that fails for a transport reason (refused, 503, a
stall, a failing `pipe:` command) is retried and continues at the sample where it broke, so the batches are those
of an undisturbed read; past data.io_retry_s it raises one line naming the URL. A content fault (404) keeps the
skip path. metrics.jsonl and the run's small files are never left torn on a full disk. All faults are real:
servers killed and restarted, handlers that answer 503 or go silent, a small tmpfs filled up. The same faults
under the trainer: tests/e2e/test_storage_faults.py."""
import errno
import json
import logging
import threading
import time

import pytest

from elt_scale.config import load_recipe
from elt_scale.data import make_loader
from elt_scale.data.transport import StorageUnavailable, TransientError, transient_or_same
from elt_scale.engine.logger import MetricsLog, read_rows
from elt_scale.files import atomic_write_text
from tests.conftest import read_metrics
from tests.datasets import write_shards
from tests.storage_servers import FaultyServer, ShardServer, mounted_tmpfs

N, PER_SHARD, MICRO = 320, 20, 16      # 16 shards; windows of 32 samples cross shard boundaries


def recipe(shards, *overrides):
    return load_recipe(None, [f"data.shards={shards}", f"train.micro_batch={MICRO}", "data.shuffle_buffer=32",
                              "data.io_timeout_s=2", "data.io_retry_s=60", *overrides])


def sample_ids(loader, count: int) -> list[list[int]]:
    return [next(loader)[0][:, 0, 0].tolist() for _ in range(count)]


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)


# ---------------------------------------------------------------------------------------------------------
# the loader alone: fast

@pytest.mark.parametrize("workers", [0, 1])
def test_503_and_a_stall_mid_body_are_retried_and_change_no_batch(shards, workers, caplog):
    """One shard answers 503 for 3 s, another sends half its body and goes silent (data.io_timeout_s=2): the
    loader waits, reopens, reads past the samples it already delivered and hands out the undisturbed batches,
    also from a DataLoader worker."""
    reference = sample_ids(make_loader(recipe(shards)), 30)               # 1.5 epochs
    with FaultyServer(shards) as server, caplog.at_level(logging.WARNING):
        server.unavailable_for("train-000003.tar", 503, 3)
        server.stall("train-000007.tar", (shards / "train-000007.tar").stat().st_size // 2)
        loader = make_loader(recipe(server.url, f"data.num_workers={workers}"))
        t0 = time.monotonic()
        got = sample_ids(loader, 30)
        took = time.monotonic() - t0
    assert got == reference
    assert loader.bad_shards == loader.bad_samples == 0 and not loader.in_outage
    assert server.hits["train-000003.tar"] >= 2 and server.hits["train-000007.tar"] >= 2
    assert loader.counters()["io_retries"] >= 2 and 3 <= took < 30, (loader.counters(), took)
    if workers == 0:                  # a worker's log records go to its own stderr, not to caplog
        assert "HTTP 503" in caplog.text and "no bytes for 2 s (data.io_timeout_s)" in caplog.text
        assert "skipping" not in caplog.text


def test_a_404_is_a_missing_shard_skipped_at_once_not_retried(shards, caplog):
    (shards / "train-000004.tar").unlink()
    with FaultyServer(shards) as server, caplog.at_level(logging.WARNING):
        loader = make_loader(recipe(server.url))
        sample_ids(loader, 20)                                           # one epoch
    assert loader.bad_shards == 1 and server.hits["train-000004.tar"] == 1
    assert "HTTP 404" in caplog.text and "retry" not in caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_storage_away_past_the_budget_raises_one_line_naming_the_url(shards, workers):
    """Also from a DataLoader worker, whose exception reaches the trainer with the worker's traceback in
    front of the message: the line is still the message alone."""
    with ShardServer(shards) as server:
        loader = make_loader(recipe(server.url, "data.io_retry_s=4", f"data.num_workers={workers}"))
        next(loader)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as e:
            sample_ids(loader, 20)
    took = time.monotonic() - t0
    line = e.value.line()
    assert 3.9 <= took < 4 + 5, took
    assert "\n" not in line and f"{server.url}/train-" in line and "connect" in line.lower()
    assert "data.io_retry_s=4" in line and not loader.in_outage, line


def test_a_failing_pipe_command_is_retried_until_it_works(shards, tmp_path):
    """A `pipe:` command that exits 1 until a marker appears 3 s later (an object-store CLI during an outage)."""
    marker = tmp_path / "up"
    spec = f"pipe:test -e {marker} && cat {shards}/train-{{000000..000015}}.tar"
    reference = sample_ids(make_loader(recipe(shards)), 12)
    marker.touch()                                      # the manifest is read at start-up, before the outage
    loader = make_loader(recipe(spec, "data.allow_pipe=true"))
    marker.unlink()
    threading.Timer(3, marker.touch).start()
    assert sample_ids(loader, 12) == reference
    assert loader.counters()["io_retries"] >= 1 and loader.bad_shards == 0


def test_the_manifest_read_at_start_up_is_retried(shards):
    server = ShardServer(shards)
    timer = threading.Timer(3, server.start)
    timer.start()
    try:
        t0 = time.monotonic()
        loader = make_loader(recipe(server.url))       # the server is not up yet: refused, retried
        assert time.monotonic() - t0 >= 2.5
        assert len(sample_ids(loader, 2)) == 2
    finally:
        timer.join()
        server.kill()


def test_local_errors_storage_failed_or_file_gone():
    assert isinstance(transient_or_same(OSError(errno.EIO, "Input/output error"), "/x"), TransientError)
    assert isinstance(transient_or_same(OSError(errno.ESTALE, "Stale file handle"), "/x"), TransientError)
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert transient_or_same(gone, "/x") is gone


# ---------------------------------------------------------------------------------------------------------
# small files on a full disk: fast

def test_metrics_log_on_a_full_disk_ends_with_a_whole_row_and_resumes(tmp_path):
    with mounted_tmpfs(tmp_path / "full", "16k") as full:
        log = MetricsLog(full, resume_step=0)
        rows = 0
        with pytest.raises(OSError) as e:
            while True:
                log.write({"step": rows + 1, "loss": 1.0, "pad": "x" * 300})
                rows += 1
        log.close()
        assert e.value.errno == errno.ENOSPC and rows > 10
        text = (full / "metrics.jsonl").read_text()
        assert text.endswith("\n") and [r["step"] for r in read_rows(full / "metrics.jsonl")] == list(range(1, rows + 1))
    # a torn last line (a crash mid-write) is dropped on resume
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLog(tmp_path, resume_step=5).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_small_files_are_replaced_whole_or_not_at_all_on_a_full_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "full", "8k") as full:
        atomic_write_text(full / "run_info.json", json.dumps({"ok": True}))
        with pytest.raises(OSError):
            atomic_write_text(full / "run_info.json", "x" * 20_000)
        assert json.loads((full / "run_info.json").read_text()) == {"ok": True}
        assert sorted(p.name for p in full.iterdir()) == ["run_info.json"]       # no temporary left
