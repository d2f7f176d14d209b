"""Hard faults on the real two-node Slurm cluster (tests/slurm_cluster.py): a rank killed with -9, a rank
stopped with SIGSTOP, a deterministic failure, a crash loop, the shard server gone for longer than the
ranks' retry budget. slurm/train_large.sh restarts a failed attempt in its allocation (bounded by
ELT_MAX_RESTARTS per submission, kept across requeues), exit 69 (storage unavailable) included, and never
retries exit 2/3."""
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import read_metrics
from tests.slurm_cluster import explain, node_logs, submit_train
from tests.storage_servers import ShardServer

pytestmark = pytest.mark.slurm
HEARTBEAT_S = 30      # train.heartbeat_timeout_s, the default: a stopped rank is declared silent after it


def rank_pid(out_dir: Path, rank: int) -> int | None:
    """The training process of `rank` whose command line names `out_dir` (ours, not another test's)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if ("elt_scale.train" in cmd and str(out_dir) in cmd and p.environ().get("RANK") == str(rank)
                    and "elt_scale.train" not in " ".join(p.parent().cmdline())):   # not a data worker
                return p.pid
        except psutil.Error:
            continue
    return None


def wait_until(cond, what, cluster, job, timeout=240, alive=("PENDING", "RUNNING", "CONFIGURING")):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert cluster.job(job).get("JobState") in alive, f"job ended before {what}"
        time.sleep(0.2)
    return value


def last_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run)), default=0)
    except (FileNotFoundError, ValueError, KeyError):   # rewritten or half-written line: look again
        return 0


def rank0_log(job_env, name, job) -> str:
    return node_logs(job_env, name, job).get(f"node0-{socket.gethostname().split('.')[0]}", "")


def starts(log: str, steps: int) -> list[int]:
    """The first step of every attempt, from rank 0's start line ("steps 40→150")."""
    return [int(s) for s in re.findall(rf"steps (\d+)→{steps}", log)]


def test_killed_then_stalled_rank_restart_in_the_allocation_and_finish(cluster, tmp_path, job_env, digits_shards):
    """kill -9 of rank 1 after a checkpoint, then SIGSTOP of rank 1 in the restarted attempt, with the default
    timeouts: each costs one restart (a new srun step); the stall is seen by the heartbeats (30 s) and ends
    every rank; the run reaches its last step with every step in metrics.jsonl exactly once. Printed: seconds
    from each fault to the next training step logged by the restarted attempt (issue 34: <= 60 s dead,
    <= 120 s stalled)."""
    steps, name, run = 150, "elt-faults", tmp_path / "digits_masked"
    job, batch_log = submit_train(cluster, tmp_path, dict(job_env, ELT_MAX_RESTARTS="2"), f"train.steps={steps}",
                                  f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "train.save_every=10",
                                  name=name)
    log = lambda: rank0_log(job_env, name, job)      # noqa: E731
    try:
        wait_until(lambda: (run / "ckpt" / "latest").exists() and last_step(run) >= 12, "a checkpoint", cluster, job)
        victim = wait_until(lambda: rank_pid(tmp_path, 1), "rank 1", cluster, job)
        killed_at = time.time()
        psutil.Process(victim).send_signal(signal.SIGKILL)
        second = wait_until(lambda: starts(log(), steps)[1:], "attempt 2", cluster, job)[0]
        wait_until(lambda: last_step(run) > second, "attempt 2's first step", cluster, job)
        dead_cost = time.time() - killed_at
        wait_until(lambda: last_step(run) >= second + 12, "attempt 2 to save a checkpoint", cluster, job)
        stalled, other = rank_pid(tmp_path, 1), rank_pid(tmp_path, 0)
        stopped_at = time.time()
        psutil.Process(stalled).send_signal(signal.SIGSTOP)
        wait_until(lambda: not psutil.pid_exists(stalled) and not psutil.pid_exists(other), "both ranks to exit",
                   cluster, job, timeout=HEARTBEAT_S + 60)
        gone_after = time.time() - stopped_at
        third = wait_until(lambda: starts(log(), steps)[2:], "attempt 3", cluster, job)[0]
        wait_until(lambda: last_step(run) > third, "attempt 3's first step", cluster, job)
        stall_cost = time.time() - stopped_at
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, batch_log, job_env, name, job)}") from None
    info = cluster.wait(job, timeout=300)
    why = explain(cluster, batch_log, job_env, name, job)
    print(f"kill -9 of rank 1 -> next training step {dead_cost:.1f} s later; SIGSTOP of rank 1 -> both ranks gone "
          f"after {gone_after:.1f} s, next training step {stall_cost:.1f} s later (default timeouts)")
    assert dead_cost <= 60 and stall_cost <= 120, why
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "0", why                                # restarted in the allocation, not requeued
    batch = batch_log.read_text()
    s = starts(log(), steps)
    assert len(s) == 3 and s[0] == 0 and 0 < s[1] < s[2] < steps, why
    kill = re.search(r"srun exited \d+ \((.*)\); restart 1 of 2 .*resuming from step (\d+)", batch)
    assert kill and "task 1: Killed" in kill[1] and int(kill[2]) == s[1], why
    stall = re.search(r"srun exited \d+ \((.*)\); restart 2 of 2 .*resuming from step (\d+)", batch)
    assert stall and "task 0: Exited with exit code 124" in stall[1] and int(stall[2]) == s[2], why
    assert "rank 1 on " in log() and "has been silent" in log(), why  # rank 0's heartbeat named the stalled rank
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1)), why   # each step exactly once


def test_deterministic_failure_is_not_retried_and_a_crash_loop_stops(cluster, tmp_path, job_env, digits_shards):
    """Two jobs side by side (one core per node each). NaN on every step with train.max_bad_steps=2: exit 3
    after one attempt, with the guard's message. A rank that always dies before the first checkpoint (the
    test-only ELT_FAULT hook, see elt_scale/engine/faults.py): ELT_MAX_RESTARTS=1 restart, then it stops."""
    common = (f"data.shards={digits_shards}", "train.steps=8")
    nan_dir, loop_dir = tmp_path / "nan", tmp_path / "loop"
    nan_dir.mkdir(), loop_dir.mkdir()
    nan_job, nan_log = submit_train(cluster, nan_dir, dict(job_env, ELT_FAULT="nan_steps:" + ",".join(map(str, range(1, 9)))),
                                    *common, f"run.out_dir={nan_dir}", "train.max_bad_steps=2", name="elt-nan")
    loop_job, loop_log = submit_train(cluster, loop_dir, dict(job_env, ELT_FAULT="die_at:1:3", ELT_MAX_RESTARTS="1"),
                                      *common, f"run.out_dir={loop_dir}", name="elt-loop")

    info = cluster.wait(nan_job, timeout=300)
    why = explain(cluster, nan_log, job_env, "elt-nan", nan_job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", why
    batch = nan_log.read_text()
    assert "training exited 3" in batch and "not restarted" in batch and "restart 1" not in batch, why
    rank0 = rank0_log(job_env, "elt-nan", nan_job)
    assert len(starts(rank0, 8)) == 1 and "2 consecutive bad steps" in rank0, why

    info = cluster.wait(loop_job, timeout=300)
    why = explain(cluster, loop_log, job_env, "elt-loop", loop_job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", why
    batch = loop_log.read_text()
    assert len(re.findall(r"task 1: Killed[^)]*\); restart 1 of 1 .* resuming from the start", batch)) == 1, why
    assert re.search(r"task 1: Killed[^)]*\); giving up after 1 restart\(s\) \(ELT_MAX_RESTARTS=1\)", batch), why
    assert starts(rank0_log(job_env, "elt-loop", loop_job), 8) == [0, 0], why      # two attempts, no more
    assert (Path(job_env["ELT_LOG_DIR"]) / f"elt-loop-{loop_job}" / "restarts").read_text().strip() == "1"


def test_storage_gone_past_the_budget_restarts_the_job_which_finishes_once_it_is_back(cluster, tmp_path, job_env,
                                                                                       digits32_shards):
    """The shard server dies after a checkpoint and stays away past data.io_retry_s=10: the ranks exit 69 with
    one line naming the URL, train_large.sh restarts the attempt (whose start-up manifest read waits for the
    server too), the server comes back, and the job resumes from the checkpoint and finishes."""
    steps, name, run = 40, "elt-storage", tmp_path / "digits_masked"
    with ShardServer(digits32_shards) as server:
        job, batch_log = submit_train(cluster, tmp_path, dict(job_env, ELT_MAX_RESTARTS="3"), f"train.steps={steps}",
                                      f"data.shards={server.url}", f"run.out_dir={tmp_path}", "train.save_every=10",
                                      "data.shuffle_buffer=32", "data.io_retry_s=10", name=name)
        try:
            wait_until(lambda: (run / "ckpt" / "latest").exists() and last_step(run) >= 12, "a checkpoint", cluster, job)
            server.kill()
            down = time.time()
            wait_until(lambda: "restart 1 of 3" in batch_log.read_text(), "the first restart", cluster, job)
            gone = time.time() - down
            server.start()
        except AssertionError as e:
            raise AssertionError(f"{e}\n{explain(cluster, batch_log, job_env, name, job)}") from None
        info = cluster.wait(job, timeout=300)
    why = explain(cluster, batch_log, job_env, name, job)
    print(f"server killed -> attempt over and restarted after {gone:.1f} s (data.io_retry_s=10)")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    restart = re.search(r"srun exited \d+ \((.*)\); restart 1 of 3 .*resuming from step (\d+)", batch_log.read_text())
    assert restart and "Exited with exit code 69" in restart[1] and int(restart[2]) >= 10, why
    said = [line for log in node_logs(job_env, name, job).values() for line in log.splitlines()
            if "storage unavailable" in line]
    assert said and all(f"{server.url}/" in line and "exiting 69" in line for line in said), why
    assert starts(rank0_log(job_env, name, job), steps)[-1] == int(restart[2]), why
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1)), why     # each step exactly once


def next_job_id(cluster, tmp_path) -> int:
    """The id the next sbatch gets: a held probe job's id + 1 (this module submits one job at a time)."""
    probe = tmp_path / "probe.sh"
    probe.write_text("#!/bin/bash\ntrue\n")
    job = cluster.sbatch(str(probe), sbatch_args=["--hold", f"--output={tmp_path}/probe.out"])
    subprocess.run(["scancel", str(job)], env=cluster.env, check=True, timeout=30)
    return job + 1


def budget_file(job_env, name, job) -> Path:
    return Path(job_env["ELT_LOG_DIR"]) / f"{name}-{job}" / "restarts"


def test_a_reused_job_id_does_not_inherit_an_earlier_jobs_restart_budget(cluster, tmp_path, job_env, digits_shards):
    """Job ids start again at 1 on a re-created cluster (issue 34): the log dir of the id the next job gets
    already holds an earlier job's restart count, at ELT_MAX_RESTARTS=1. A kill -9 of rank 1 mid-run
    still costs this job its first restart (not "giving up after 1 restart(s)"), and the run finishes
    with every step once; the budget is counted in a file of its own submission, the old one untouched."""
    steps, name, run, stale = 60, "elt-reused", tmp_path / "digits_masked", "20240101T000000"
    first = next_job_id(cluster, tmp_path)
    for job_id in range(first, first + 3):                  # what an earlier job with this id left behind
        counter = budget_file(job_env, name, job_id)
        counter.parent.mkdir(parents=True)
        (counter.parent / f"restarts.{stale}").write_text("1\n")
        counter.symlink_to(f"restarts.{stale}")
    job, batch_log = submit_train(cluster, tmp_path, dict(job_env, ELT_MAX_RESTARTS="1"), f"train.steps={steps}",
                                  f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "train.save_every=10",
                                  name=name)
    assert first <= job < first + 3, f"job {job} did not get a prepared id ({first}..{first + 2})"
    try:
        wait_until(lambda: (run / "ckpt" / "latest").exists() and last_step(run) >= 12, "a checkpoint", cluster, job)
        psutil.Process(wait_until(lambda: rank_pid(tmp_path, 1), "rank 1", cluster, job)).send_signal(signal.SIGKILL)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, batch_log, job_env, name, job)}") from None
    info = cluster.wait(job, timeout=300)
    why = explain(cluster, batch_log, job_env, name, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", why
    batch, submitted = batch_log.read_text(), info["SubmitTime"]          # not requeued: the submission's own
    assert f"restart budget of job {job} submitted {submitted}: 0 of 1 used" in batch, why
    kill = re.search(rf"\((.*)\); restart 1 of 1 \(ELT_MAX_RESTARTS\) of job {job} submitted {submitted} in this "
                     r"allocation, resuming from step (\d+)", batch)
    assert kill and "task 1: Killed" in kill[1] and "giving up" not in batch, why
    assert starts(rank0_log(job_env, name, job), steps) == [0, int(kill[2])], why
    assert [r["step"] for r in read_metrics(run)] == list(range(1, steps + 1)), why     # each step exactly once
    counter = budget_file(job_env, name, job)
    assert counter.readlink().name == "restarts." + re.sub(r"[-:]", "", submitted) and counter.read_text() == "1\n"
    assert (counter.parent / f"restarts.{stale}").read_text() == "1\n"     # the earlier job's count, as it was


def test_a_requeued_job_keeps_its_restart_count(cluster, tmp_path, job_env, digits_shards):
    """ELT_MAX_RESTARTS=1: kill -9 of rank 1 (restart 1 of 1), then preemption (USR1, exit 75, requeue), then
    kill -9 of rank 1 in the requeued run: the job gives up, because the requeue is the same submission.
    Slurm resets SubmitTime at the requeue; the budget still names the submission's first SubmitTime."""
    steps, name, run = 400, "elt-requeued", tmp_path / "digits_masked"
    job, batch_log = submit_train(cluster, tmp_path, dict(job_env, ELT_MAX_RESTARTS="1"), f"train.steps={steps}",
                                  f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "train.save_every=10",
                                  name=name)
    submitted = cluster.job(job)["SubmitTime"]
    through_requeue = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
    try:
        wait_until(lambda: (run / "ckpt" / "latest").exists() and last_step(run) >= 12, "a checkpoint", cluster, job)
        psutil.Process(wait_until(lambda: rank_pid(tmp_path, 1), "rank 1", cluster, job)).send_signal(signal.SIGKILL)
        second = wait_until(lambda: starts(rank0_log(job_env, name, job), steps)[1:], "attempt 2", cluster, job)[0]
        wait_until(lambda: last_step(run) >= second + 2, "attempt 2 to train", cluster, job)   # USR1 handler set
        subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True, timeout=30)
        wait_until(lambda: len(starts(rank0_log(job_env, name, job), steps)) == 3, "the requeued run", cluster, job,
                   alive=through_requeue)
        psutil.Process(wait_until(lambda: rank_pid(tmp_path, 1), "rank 1", cluster, job)).send_signal(signal.SIGKILL)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, batch_log, job_env, name, job)}") from None
    info = cluster.wait(job, timeout=300)
    why = explain(cluster, batch_log, job_env, name, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", why
    assert info["SubmitTime"] != submitted, why                       # Slurm 22.05 resets it at a requeue
    batch = batch_log.read_text()
    budget = [m.group(1) for m in re.finditer(rf"restart budget of job {job} submitted {submitted}: (\d) of 1 used",
                                              batch)]
    assert budget == ["0", "1"], why                                  # first run, then the requeued one
    requeued = batch.index("requeueing job")
    assert re.search(r"task 1: Killed[^)]*\); restart 1 of 1 ", batch[:requeued]), why
    assert re.search(rf"task 1: Killed[^)]*\); giving up after 1 restart\(s\) \(ELT_MAX_RESTARTS=1\) of job {job} "
                     rf"submitted {submitted}:", batch[requeued:]), why
    counter = budget_file(job_env, name, job)
    assert counter.read_text() == "1\n" and [p.name for p in counter.parent.glob("restarts.*")] == \
        [counter.readlink().name], why                               # one submission, one count
