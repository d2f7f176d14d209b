"""A real two-node Slurm cluster on loopback, for tests: munged, slurmctld and two slurmd.

    with LocalSlurm(tmp_dir) as cluster:
        job = cluster.sbatch("slurm/train_large.sh", "recipe.yaml", sbatch_args=["-N2"])
        cluster.wait(job)

Everything lives under one temporary directory (munge key and socket, slurm.conf, state, spool, logs);
the daemons run in the foreground as children of this process, so stopping them is killing our own
pids. The two compute nodes are `slurmd -N n1` and `slurmd -N n2` on 127.0.0.1 with distinct ports;
n1/n2 must resolve, so an alias line is added to /etc/hosts once (CI runs as root on a throwaway
machine). Plugins are the ones that work without systemd or cgroups: proctrack/linuxproc, task/none.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from elt_scale.dist import free_ports

ROOT = Path(__file__).resolve().parent.parent

NODES = ("n1", "n2")
HOSTS_LINE = "127.0.0.1 n1 n2  # elt-scale local Slurm test cluster"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing_slurm() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"slurm-wlm/munge not installed (missing {', '.join(absent)}); .ci/run installs them via apt"
    return None


def ensure_host_aliases(hosts: Path = Path("/etc/hosts")) -> None:
    """n1/n2 -> 127.0.0.1, idempotently; fail loudly when that is impossible."""
    if all(_resolves_to_loopback(n) for n in NODES):
        return
    try:
        with open(hosts, "a") as f:
            f.write("\n" + HOSTS_LINE + "\n")
    except OSError as e:
        raise RuntimeError(f"cannot add '{HOSTS_LINE}' to {hosts} ({e}); add it by hand (needs root)") from e
    bad = [n for n in NODES if not _resolves_to_loopback(n)]
    if bad:
        raise RuntimeError(f"{', '.join(bad)} still do not resolve to 127.0.0.1 after editing {hosts}")


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def slurm_conf(root: Path, ctld_port: int, node_ports: list[int], cpus: int) -> str:
    """The smallest slurm.conf for two nodes on one host (see `man slurm.conf`, 22.05)."""
    host = socket.gethostname().split(".")[0]   # slurmctld refuses to start unless this is its host
    nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={cpus} State=UNKNOWN"
                      for n, p in zip(NODES, node_ports))
    return f"""\
ClusterName=eltlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munged socket; a short credential lifetime, because a requeued job waits for it to expire
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# look at pending jobs every second: a requeued job becomes eligible after cred_expire, with no event
SchedulerParameters=sched_interval=1
# the nodes share this host's cores, and may claim fewer than it has
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
# jobs are not requeueable unless they ask (#SBATCH --requeue): the tests check that the script asks
JobRequeue=0
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start/stop the cluster; submit and follow jobs. Use as a context manager."""

    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.procs: dict[str, subprocess.Popen] = {}   # name -> daemon, in start order
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the local Slurm cluster runs as root (slurmd starts jobs as their user, and n1/n2 "
                               "go into /etc/hosts); CI does, run these tests as root or in a container")
        ensure_host_aliases()
        for d in ("munge", "state", "spool/n1", "spool/n2", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, ctld_port, node_ports, self.cpus))
        self._start_munged()
        self._spawn("slurmctld", ["slurmctld", "-D"])          # -D: foreground, our child
        self._wait_for(lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                       "slurmctld answering scontrol ping")
        for n in NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n])
        self._wait_for(self._nodes_idle, "both nodes idle in sinfo")

    def _start_munged(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        # --force: munged wants every folder above its socket searchable by all; pytest's temp folders are
        # private (0700). Every client here is root, so that check protects nothing in this cluster.
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
                               f"--pid-file={m}/munged.pid", f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: (m / "munge.socket").exists(), "munged socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once (rc {proc.returncode}); logs in {self.root}/log\n" + self.logs())

    def stop(self) -> None:
        """Cancel our jobs, wait for them to leave the nodes, then stop the daemons we started."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:           # let our jobs end cleanly first
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            try:
                self.wait_all(timeout=30)
            except (TimeoutError, RuntimeError):
                pass
        for p in reversed(list(self.procs.values())):            # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self.procs.clear()

    # -- jobs -----------------------------------------------------------------------------------

    def sbatch(self, script: str, *args: str, sbatch_args=(), env=None, cwd=None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *sbatch_args, script, *args], env=dict(self.env, **(env or {})),
                           cwd=cwd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol's view of a job as a flat dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        text = self._out(["scontrol", "-o", "show", "job", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, timeout: float = 180) -> dict:
        """Until the job has finished for good (a requeued job goes back to PENDING first)."""
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")
        self._wait_for(lambda: self.job(job_id).get("JobState") in done, f"job {job_id} to finish", timeout)
        return self.job(job_id)

    def wait_all(self, timeout: float = 180) -> None:
        """Until no job is left in the queue (array tasks and jobs that others submitted included)."""
        self._wait_for(lambda: not self._out(["squeue", "-h"]).strip(), "the queue to empty", timeout)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    # -- helpers --------------------------------------------------------------------------------

    def _nodes_idle(self) -> bool:
        states = self._out(["sinfo", "-h", "-N", "-o", "%N %t"]).split()
        return sorted(zip(states[::2], states[1::2])) == [(n, "idle") for n in NODES]

    def _out(self, argv: list[str]) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30).stdout

    def _ok(self, argv: list[str]) -> bool:
        return subprocess.run(argv, env=self.env, capture_output=True, timeout=30).returncode == 0

    def _wait_for(self, cond, what: str, timeout: float = 30, every: float = 0.25) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} died while waiting for {what}\n{self.logs()}")
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")


TINY = ("model.width=32", "train.micro_batch=8", "train.log_every=1", "train.save_every=0", "train.warmup_steps=2")


CPU_JOB = ("--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")


def submit_train(cluster, tmp_path, job_env, *overrides, name="elt-train", dry_run=False, sbatch_args=()):
    out = tmp_path / "batch-%j.out"
    job_env = dict(job_env, ELT_DRY_RUN="1" if dry_run else "0")
    job = cluster.sbatch("slurm/train_large.sh", str(ROOT / "recipes" / "digits_masked.yaml"), *TINY, *overrides,
                         sbatch_args=["-N2", *CPU_JOB, f"--job-name={name}", f"--output={out}", *sbatch_args],
                         env=job_env, cwd=ROOT)
    return job, Path(str(out).replace("%j", str(job)))


def node_logs(job_env, name, job) -> dict[str, str]:
    d = Path(job_env["ELT_LOG_DIR"]) / f"{name}-{job}"
    return {p.stem: p.read_text(errors="replace") for p in sorted(d.glob("*.log"))}


def explain(cluster, batch_log: Path, job_env, name, job) -> str:
    logs = node_logs(job_env, name, job)
    text = batch_log.read_text() if batch_log.exists() else "(no batch log)"
    return "\n".join([f"== batch\n{text[-3000:]}", *(f"== {n}\n{t[-3000:]}" for n, t in logs.items()),
                      cluster.logs()])
