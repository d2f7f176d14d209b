"""A soak run (issue 41): one training on the real two-node Slurm cluster takes six faults on schedule and
reaches its last step with every step logged once and the same loss at every step as a fault-free run of the
same recipe. Three faults must cost a restart in the allocation (the ranks die or freeze); three must cost
none (a reset of one rank's connections to the store, an evaluation that raises, a storage outage shorter than
data.io_retry_s). Printed: per fault, the seconds from the fault to the next logged step, and whether it cost
a restart (docs/cluster.md's soak table comes from this print).

    kill -9 of rank 1                         after step 20           restart
    SIGSTOP of rank 0 (it hosts the store)    after step 60           restart (heartbeats, train.heartbeat_timeout_s)
    `ss -K` of rank 1's store connections     after step 100          none
    shard server killed for 8 s               after step 140          none (data.io_retry_s=60)
    evaluation raises on rank 1 at step 200   ELT_FAULT eval_fails    none
    kill -9 inside the save of step 260       ELT_FAULT kill_in_save  restart (from the checkpoint of step 250)
"""
import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.cluster.test_slurm_faults import last_step, rank0_log, rank_pid, starts, wait_until
from tests.conftest import read_metrics
from tests.slurm_cluster import explain, submit_train
from tests.storage_servers import ShardServer

pytestmark = pytest.mark.slurm

STEPS, HEARTBEAT_S = 300, 15
RECIPE = (f"train.steps={STEPS}", "train.save_every=10", "train.keep_last=3", "data.shuffle_buffer=32",
          "data.io_retry_s=60", f"train.heartbeat_timeout_s={HEARTBEAT_S}", "eval.every=100", "eval.loops=1,4",
          "eval.num=8", "eval.steps=2", "eval.batch_size=4")
FAULTS = "eval_fails:1:200;kill_in_save:260"
LONG = ("--time=40",)     # train_large.sh's USR1 comes 5 min before the limit: not a fault of this schedule


def store_connections(pid: int, port: int) -> list[str]:
    """The local addresses of `pid`'s TCP connections to the store (127.0.0.1:port), as `ss -tnp` lists them."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[2] for line in out.splitlines() if f"pid={pid}," in line]


def rows(run) -> list[dict]:
    """metrics.jsonl while it is written: a torn last line is read again on the next poll."""
    try:
        return read_metrics(run)
    except (FileNotFoundError, ValueError):
        return []


def losses(run) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["loss_teacher"], r["loss_student"], r["loss_distill"])
            for r in read_metrics(run) if "loss" in r}


class Clock:
    """Per fault: the seconds from it to the next step the run logs, and whether a new attempt started between."""

    def __init__(self, run, attempts):
        self.run, self.attempts, self.rows = run, attempts, []

    def fault(self, what: str, at: float | None = None, step: int | None = None) -> None:
        step = last_step(self.run) if step is None else step
        self.rows.append({"fault": what, "at": time.time() if at is None else at, "step": step,
                          "attempts": len(self.attempts())})

    def recovered(self, cluster, job, timeout=300) -> None:
        """Until the run logs a step it had not logged since the fault: past the fault's step, or, when a new
        attempt started, past the step it resumed from (its start line is said after metrics.jsonl was cut
        back to that step)."""
        row = self.rows[-1]

        def back():
            first_steps = self.attempts()
            since = first_steps[-1] if len(first_steps) > row["attempts"] else row["step"]
            return last_step(self.run) > since
        wait_until(back, f"training after '{row['fault']}'", cluster, job, timeout)
        row["seconds"] = time.time() - row["at"]
        row["restart"] = len(self.attempts()) > row["attempts"]

    def table(self) -> str:
        lines = ["| fault | at step | seconds to training again | cost a restart |", "|---|---|---|---|"]
        lines += [f"| {r['fault']} | {r['step']} | {r['seconds']:.1f} | {'yes' if r['restart'] else 'no'} |"
                  for r in self.rows]
        return "\n".join(lines)


def test_one_run_survives_six_faults_with_the_losses_of_a_run_without_them(cluster, tmp_path, job_env,
                                                                            digits32_shards):
    faulty, clean = tmp_path / "faulty", tmp_path / "clean"
    faulty.mkdir(), clean.mkdir()
    run = faulty / "digits_masked"
    with ShardServer(digits32_shards) as server:
        ref_job, ref_log = submit_train(cluster, clean, job_env, *RECIPE, f"data.shards={digits32_shards}",
                                        f"run.out_dir={clean}", name="elt-clean", sbatch_args=LONG)
        job, batch_log = submit_train(cluster, faulty, dict(job_env, ELT_MAX_RESTARTS="3", ELT_FAULT=FAULTS), *RECIPE,
                                      f"data.shards={server.url}", f"run.out_dir={faulty}", name="elt-soak",
                                      sbatch_args=LONG)
        log = lambda: rank0_log(job_env, "elt-soak", job)          # noqa: E731
        clock = Clock(run, lambda: starts(log(), STEPS))
        try:
            inject(clock, cluster, job, run, faulty, server, log)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{explain(cluster, batch_log, job_env, 'elt-soak', job)}") from None
        info = cluster.wait(job, timeout=600)
    ref = cluster.wait(ref_job, timeout=600)
    why = explain(cluster, batch_log, job_env, "elt-soak", job)
    assert ref["JobState"] == "COMPLETED", explain(cluster, ref_log, job_env, "elt-clean", ref_job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", why

    print("\n" + clock.table())
    assert [r["restart"] for r in clock.rows] == [True, True, False, False, False, True], clock.table()

    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1)), why
    assert losses(run) == losses(clean / "digits_masked"), why              # bitwise, every step
    batch = batch_log.read_text()
    assert len(re.findall(r"; restart \d of 3 ", batch)) == 3, why          # exactly the three that kill a rank
    assert len(starts(log(), STEPS)) == 4, why
    errors = [r for r in read_metrics(run) if "eval_error" in r]
    assert [r["step"] for r in errors] == [200] and "rank 1: InjectedFault" in errors[0]["eval_error"], why
    goodput = json.loads((run / "goodput.json").read_text())      # the ledger accounts for each fault
    total = goodput["total"]
    assert len(goodput["attempts"]) == total["attempts"] == 4 and total["redone_steps"] >= 10, total   # 250 to 260
    assert total["lost_to_faults_s"] > 0 and total["storage_outage_s"] >= 5 and total["eval_s"] > 0, total


def inject(clock, cluster, job, run, out_dir, server, log):
    """The four faults from outside, each once the run has trained past its step and recovered from the last."""
    wait_until(lambda: last_step(run) >= 20, "step 20", cluster, job)
    clock.fault("kill -9 of rank 1")
    psutil.Process(wait_until(lambda: rank_pid(out_dir, 1), "rank 1", cluster, job)).send_signal(signal.SIGKILL)
    wait_until(lambda: len(starts(log(), STEPS)) >= 2, "attempt 2", cluster, job)
    clock.recovered(cluster, job)

    wait_until(lambda: last_step(run) >= 60, "step 60", cluster, job)
    clock.fault("SIGSTOP of rank 0 (the store's host)")
    stopped = wait_until(lambda: rank_pid(out_dir, 0), "rank 0", cluster, job)
    psutil.Process(stopped).send_signal(signal.SIGSTOP)
    wait_until(lambda: len(starts(log(), STEPS)) >= 3, "attempt 3", cluster, job, timeout=HEARTBEAT_S + 240)
    clock.recovered(cluster, job)

    wait_until(lambda: last_step(run) >= 100, "step 100", cluster, job)
    victim = wait_until(lambda: rank_pid(out_dir, 1), "rank 1", cluster, job)
    port = int(psutil.Process(victim).environ()["MASTER_PORT"])
    local = wait_until(lambda: store_connections(victim, port), "rank 1's store connections", cluster, job)
    clock.fault(f"ss -K of rank 1's {len(local)} store connection(s)")
    for addr in local:
        subprocess.run(["ss", "-K", "src", addr, "dst", f"127.0.0.1:{port}"], check=True, capture_output=True)
    clock.recovered(cluster, job)
    wait_until(lambda: last_step(run) >= 130, "step 130", cluster, job)    # ... and stays trained on

    wait_until(lambda: last_step(run) >= 140, "step 140", cluster, job)
    clock.fault("shard server killed for 8 s")
    server.kill()
    time.sleep(8)
    server.start()
    clock.recovered(cluster, job)

    wait_until(lambda: any("eval_error" in r for r in rows(run)), "the failed evaluation (ELT_FAULT)", cluster, job)
    clock.fault("evaluation raises on rank 1", step=200)
    clock.recovered(cluster, job)
    failed = next(r for r in rows(run) if "eval_error" in r)
    clock.rows[-1]["seconds"] = failed["eval_s"]     # seen after the fact: the failed evaluation's own time

    marker = run / ".fault_kill_in_save_260_rank0"          # the rank writes it as it kills itself (faults.py)
    wait_until(marker.exists, "the kill inside the save of step 260", cluster, job)
    clock.fault("kill -9 inside the save of step 260 (ELT_FAULT)", at=marker.stat().st_mtime, step=260)
    clock.recovered(cluster, job)
