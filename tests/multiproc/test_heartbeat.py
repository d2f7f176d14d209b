"""Heartbeats and the goodput ledger (issues 34, 41), on real processes: a rank stopped with SIGSTOP ends the job
on every rank within seconds, naming the silent rank and its host, also rank 0 where it does not host the store;
a rank busy compiling for longer than the heartbeat timeout is not declared hung; only silence ends a rank: a
reset store connection (`ss -K`) or a store that stalls for less than the timeout costs nothing, and ranks that
finish at different times all exit 0; the ledger of a run killed once (kill -9) and rerun adds up to its wall
time and counts the steps done twice. tests/heartbeat_probe.py runs one rank's heartbeat without the training."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from elt_scale.dist import free_port
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


def test_reset_store_connections_cost_a_training_run_nothing(tmp_path, digits_shards):
    """Issue 41's measurement: every connection of rank 1 to the rendezvous store reset (`ss -K`) at step 3 and
    again at step 6 cost a whole restart; now the run goes on to its last step, one attempt, exit 0."""
    cmd = train_cmd("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=rs",
                    *TINY, "train.steps=40", f"train.heartbeat_timeout_s={HEARTBEAT_S}", nprocs=2)
    port = int(cmd[cmd.index("--master_port") + 1])
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        ranks = ranks_of(launcher, 2)
        for step in (3, 6):
            wait_for_step(tmp_path / "rs", step, launcher)
            assert reset_connections(ranks[1].pid, port) >= 1
        code = launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            for p in psutil.Process(launcher.pid).children(recursive=True):
                p.kill()
            launcher.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "rs") if "loss" in r] == list(range(1, 41))
    assert "silent" not in text and "has not answered" not in text and "is gone" not in text


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


# ---------------------------------------------------------------------------------------------------------
# only silence ends a rank (issue 41): heartbeats alone, in real processes (tests/heartbeat_probe.py)

PROBE_S = 4         # the probes' heartbeat timeout


class Ranks:
    """Probe ranks on one store: rank 0's own (as under srun/deepspeed) or, with `agent`, a store process of its
    own standing in for torchrun's agent. Rank 0 starts first: the others connect to a store that is there."""

    def __init__(self, tmp_path, agent: bool = False):
        self.tmp, self.port, self.procs, self.store = tmp_path, free_port(), [], None
        self.env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port), PYTHONPATH=str(ROOT),
                        PROBE_GO=str(tmp_path / "go"))
        self.env.pop("TORCHELASTIC_RESTART_COUNT", None)
        if agent:
            self.env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
            code = (f"import time, torch, datetime; s = torch.distributed.TCPStore('127.0.0.1', {self.port}, "
                    f"is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)); "
                    f"print('up', flush=True); time.sleep(600)")
            self.store = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            assert self.store.stdout.readline().strip() == "up"
        else:
            self.env.pop("TORCHELASTIC_USE_AGENT_STORE", None)

    def start(self, run_s: list[float], timeout_s: float = PROBE_S) -> list[subprocess.Popen]:
        for rank, seconds in enumerate(run_s):
            log = open(self.tmp / f"rank{rank}.txt", "w")
            self.procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "heartbeat_probe.py"), str(rank),
                                                str(len(run_s)), str(timeout_s), str(seconds)], cwd=ROOT,
                                               env=self.env, stdout=log, stderr=subprocess.STDOUT))
            self.wait_for(rank, "ready")
        (self.tmp / "go").touch()                       # every rank ready: their heartbeats start together
        for rank in range(len(run_s)):
            self.wait_for(rank, "beating")
        return self.procs

    def wait_for(self, rank: int, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(rank):
            assert self.procs[rank].poll() is None and time.monotonic() < deadline, self.log(rank)[-2000:]
            time.sleep(0.05)

    def log(self, rank: int) -> str:
        return (self.tmp / f"rank{rank}.txt").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}\n{self.log(r)[-1500:]}" for r in range(len(self.procs)))

    def close(self) -> None:
        for p in [*self.procs, self.store]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


def store_connections(pid: int, port: int) -> list[int]:
    """The local ports of process `pid`'s established TCP connections to `port` (`ss -tnp`; psutil lists none
    for a TCPStore client's socket here)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"], check=True,
                         capture_output=True, text=True).stdout
    return [int(line.split()[2].rpartition(":")[2]) for line in out.splitlines() if f"pid={pid}," in line]


def reset_connections(pid: int, port: int) -> int:
    """`ss -K` (root, loopback) every established TCP connection of process `pid` to `port`; how many."""
    deadline = time.monotonic() + 5
    while not (mine := store_connections(pid, port)) and time.monotonic() < deadline:
        time.sleep(0.1)                                 # between a reset and the reconnect
    for lport in mine:
        subprocess.run(["ss", "-K", "-t", "state", "established", f"( sport = :{lport} and dport = :{port} )"],
                       check=True, capture_output=True)
    assert not set(mine) & set(store_connections(pid, port)), "ss -K left a connection"
    return len(mine)


def test_reset_store_connections_do_not_end_a_rank(tmp_path):
    """Rank 1's connection to the store (rank 0's) reset three times, 1.5 s apart (`ss -K`): it reconnects, no
    rank is declared, both finish and exit 0."""
    ranks = Ranks(tmp_path)
    try:
        procs = ranks.start([10, 10])
        time.sleep(1.5)
        for _ in range(3):
            assert reset_connections(procs[1].pid, ranks.port) >= 1, ranks.logs()
            time.sleep(1.5)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        ranks.close()
    assert codes == [0, 0], ranks.logs()
    assert "silent" not in ranks.logs() and "gone" not in ranks.logs()


def test_a_store_stall_shorter_than_the_timeout_costs_nothing_a_longer_one_ends_every_rank(tmp_path):
    """The store (a process of its own, as torchrun's agent's) stopped for 0.6 x the timeout: nothing; stopped
    for good: every rank exits 124 within the timeout and a few seconds, naming the store."""
    ranks = Ranks(tmp_path, agent=True)
    try:
        procs = ranks.start([60, 60])
        time.sleep(1.5)
        ranks.store.send_signal(signal.SIGSTOP)
        time.sleep(0.6 * PROBE_S)
        ranks.store.send_signal(signal.SIGCONT)
        time.sleep(2 * PROBE_S)
        assert [p.poll() for p in procs] == [None, None], ranks.logs()
        ranks.store.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        codes = [p.wait(timeout=PROBE_S + 30) for p in procs]
        took = time.monotonic() - stopped_at
    finally:
        ranks.close()
    assert codes == [HEARTBEAT_EXIT_CODE] * 2, ranks.logs()
    assert f"the rendezvous store at 127.0.0.1:{ranks.port} (torchrun's agent) has not answered" in ranks.log(1)
    assert took < PROBE_S + 6, took
    print(f"store stopped: every rank gone {took:.1f} s later (heartbeat timeout {PROBE_S} s)")


def test_a_stopped_rank_0_is_found_where_the_agent_hosts_the_store(tmp_path):
    """torchrun's agent hosts the store (a process standing in for it), so rank 0 stopped leaves the store
    answering: ranks 1 and 2 see rank 0's beats stop and exit 124 within the timeout and a few seconds."""
    ranks = Ranks(tmp_path, agent=True)
    try:
        procs = ranks.start([60, 60, 60])
        time.sleep(1.5)
        procs[0].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        codes = [p.wait(timeout=PROBE_S + 30) for p in procs[1:]]
        took = time.monotonic() - stopped_at
    finally:
        ranks.close()
    assert codes == [HEARTBEAT_EXIT_CODE] * 2, ranks.logs()
    assert all(f"rank 0 on {socket.gethostname()} has been silent" in ranks.log(r) for r in (1, 2)), ranks.logs()
    assert took < PROBE_S + 6, took
    print(f"rank 0 stopped under an agent's store: ranks 1, 2 gone {took:.1f} s later (timeout {PROBE_S} s)")


@pytest.mark.parametrize("run_s", [[1, 8], [8, 1]], ids=["rank0-first", "rank1-first"])
def test_ranks_that_finish_at_different_times_exit_0(tmp_path, run_s):
    """Rank 0 hosts the store: whichever rank finishes first, 7 s (more than the timeout) before the other,
    neither is declared silent nor takes the vanished store for a dead rank 0."""
    ranks = Ranks(tmp_path)
    try:
        procs = ranks.start(run_s)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        ranks.close()
    assert codes == [0, 0], ranks.logs()
    assert all("finished" in ranks.log(r) for r in (0, 1))


def test_rank_0_killed_where_it_hosts_the_store_ends_the_others_at_once(tmp_path):
    """Rank 0 killed (-9) takes its store's listening socket along: the refused connection says its process is
    gone, and rank 1 exits 124 within seconds, not after the timeout (kept from before issue 41)."""
    ranks = Ranks(tmp_path)
    try:
        procs = ranks.start([60, 60], timeout_s=20)
        time.sleep(1.5)
        procs[0].kill()
        killed_at = time.monotonic()
        code = procs[1].wait(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        ranks.close()
    assert code == HEARTBEAT_EXIT_CODE and "rank 0 on 127.0.0.1 (the rendezvous store) is gone" in ranks.log(1), \
        ranks.logs()
    assert took < 10, took
    print(f"rank 0 killed: rank 1 gone {took:.1f} s later (heartbeat timeout 20 s)")
