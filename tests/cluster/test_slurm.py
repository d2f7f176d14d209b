"""The real sbatch scripts on a real two-node Slurm cluster (tests/slurm_cluster.py), CPU and gloo."""
import json
import os
import re
import shlex
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_metrics
from tests.slurm_cluster import explain, node_logs, submit_train

pytestmark = pytest.mark.slurm

# A tiny masked model: 2 ranks on 2 nodes must finish quickly on 2 shared cores.
def test_cluster_runs_a_job_on_both_nodes(cluster, tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text('#!/bin/bash\nscontrol show hostnames "$SLURM_JOB_NODELIST"\n'
                      'srun --label printenv SLURMD_NODENAME\n')
    job = cluster.sbatch(str(script), sbatch_args=["-N2", "--ntasks-per-node=1", f"--output={tmp_path}/out.txt"])
    info = cluster.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", cluster.logs()
    assert info["Requeue"] == "0"                                # the cluster default; train_large.sh asks
    lines = (tmp_path / "out.txt").read_text().split()
    assert lines[:2] == ["n1", "n2"]                             # scontrol show hostnames
    assert sorted(zip(lines[2::2], lines[3::2])) == [("0:", "n1"), ("1:", "n2")]   # one task on each node


def test_dry_run_prints_each_rank_and_quotes_arguments(tmp_path):
    """No cluster needed: the command each rank would run, with hostile arguments kept inert."""
    marker = tmp_path / "pwned"
    evil = [f"$(touch {marker})", f"; touch {marker}", "`id`", "run.name=a b"]
    r = subprocess.run(["bash", "slurm/train_large.sh", "recipes/digits_masked.yaml", *evil], cwd=ROOT,
                       env=dict(os.environ, ELT_DRY_RUN="1", SLURM_NTASKS_PER_NODE="2"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ranks = [line for line in r.stdout.splitlines() if line.startswith("dry-run ")]
    assert len(ranks) == 4                                       # 2 nodes x 2 tasks
    for rank, line in enumerate(ranks):
        assert f"RANK={rank} WORLD_SIZE=4 LOCAL_RANK={rank % 2} NODE_RANK={rank // 2} OMP_NUM_THREADS=" in line
        assert "MASTER_ADDR=node0 MASTER_PORT=20000" in line
        argv = shlex.split(line.split(": ", 1)[1])
        assert argv[-len(evil) - 4:] == ["python", "-m", "elt_scale.train", "recipes/digits_masked.yaml", *evil]
    assert not marker.exists()


@pytest.mark.parametrize("script, marker", [("train_large.sh", "slurm/task_env.sh"),
                                            ("tokenize.sh", "data_prep/tokenize.py")])
def test_scripts_refuse_a_wrong_submit_dir_or_a_missing_env_file(tmp_path, script, marker):
    """No cluster needed: the shared setup (slurm/job_setup.sh) fails with exit 2 and the script's own name."""
    def run(submit_dir, **extra):
        env = {k: v for k, v in os.environ.items() if k != "ELT_ENV_FILE"}
        env.update(SLURM_SUBMIT_DIR=str(submit_dir), **extra)
        return subprocess.run(["bash", str(ROOT / "slurm" / script), "x"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    no_setup = tmp_path / "elsewhere"                           # the spool copy cannot find the checkout here
    no_setup.mkdir()
    r = run(no_setup)
    assert r.returncode == 2 and r.stderr == \
        f"{script}: submit from the elt-scale checkout (no slurm/job_setup.sh in {no_setup})\n", r.stderr
    partial = tmp_path / "partial"                              # job_setup.sh, but not what the script needs
    (partial / "slurm").mkdir(parents=True)
    (partial / "slurm" / "job_setup.sh").write_text((ROOT / "slurm" / "job_setup.sh").read_text())
    r = run(partial)
    assert r.returncode == 2 and r.stderr == \
        f"{script}: submit from the elt-scale checkout (no {marker} in {partial})\n", r.stderr
    missing = tmp_path / "missing-env.sh"
    r = run(ROOT, ELT_ENV_FILE=str(missing))
    assert r.returncode == 2 and r.stderr == f"{script}: ELT_ENV_FILE={missing} does not exist\n", r.stderr


def test_dry_run_in_an_allocation_prints_what_each_node_runs(cluster, tmp_path, job_env):
    job, batch_log = submit_train(cluster, tmp_path, job_env, "run.name=x y", f"run.out_dir={tmp_path}",
                                  name="elt-dry", dry_run=True)
    info = cluster.wait(job, timeout=60)
    text = batch_log.read_text()
    assert info["JobState"] == "COMPLETED", text + cluster.logs()
    lines = [line for line in text.splitlines() if line.startswith("dry-run ")]
    port = 20000 + job % 20000
    assert [line.split(": ")[0] for line in lines] == ["dry-run n1 rank 0", "dry-run n2 rank 1"], text
    for rank, line in enumerate(lines):
        argv = shlex.split(line.split(": ", 1)[1])
        threads = os.environ.get("OMP_NUM_THREADS", 1)            # --cpus-per-task=1 unless already set
        assert argv[:8] == ["env", f"RANK={rank}", "WORLD_SIZE=2", "LOCAL_RANK=0", f"NODE_RANK={rank}",
                            f"OMP_NUM_THREADS={threads}", "MASTER_ADDR=n1", f"MASTER_PORT={port}"]
        assert argv[8:12] == ["python", "-m", "elt_scale.train", str(ROOT / "recipes" / "digits_masked.yaml")]
        assert "run.name=x y" in argv
    assert not (tmp_path / "x y").exists()                       # nothing trained


def test_two_nodes_train_to_completion(cluster, tmp_path, job_env, digits_shards):
    steps = 12
    job, batch_log = submit_train(cluster, tmp_path, job_env, f"train.steps={steps}", f"data.shards={digits_shards}",
                                  f"run.out_dir={tmp_path}")
    info = cluster.wait(job, timeout=240)
    why = explain(cluster, batch_log, job_env, "elt-train", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    rows = read_metrics(tmp_path / "digits_masked")
    assert [row["step"] for row in rows] == list(range(1, steps + 1)), why
    assert all(row["world_size"] == 2 for row in rows)
    logs = node_logs(job_env, "elt-train", job)
    host = socket.gethostname().split(".")[0]                   # both nodes are this host
    assert set(logs) == {f"node0-{host}", f"node1-{host}"}, why   # one log per node, one rank on each
    # srun opened node1's log for the task it placed there; rank 1 itself is silent unless it fails
    # (only rank 0 reports), so its log may be empty.
    first, second = logs[f"node0-{host}"], logs[f"node1-{host}"]
    assert "world 2" in first and re.search(r"^0: ", first, re.M), why
    assert not re.search(r"^0: ", second, re.M), why
    assert "rendezvous n1:" in batch_log.read_text()


def test_preempted_run_requeues_and_resumes_without_repeating_steps(cluster, tmp_path, job_env, digits_shards):
    """scancel --signal=USR1 reaches every rank (as --signal=USR1@T would): checkpoint, exit 75, requeue."""
    steps = 100
    run = tmp_path / "digits_masked"
    job, batch_log = submit_train(cluster, tmp_path, job_env, f"train.steps={steps}", f"data.shards={digits_shards}",
                                  f"run.out_dir={tmp_path}", name="elt-preempt")
    # Signal only once training is under way: before the trainer installs its handler USR1 would kill it.
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() or "\n" not in (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            explain(cluster, batch_log, job_env, "elt-preempt", job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True, timeout=30)
    info = cluster.wait(job, timeout=240)
    why = explain(cluster, batch_log, job_env, "elt-preempt", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["Restarts"] == "1" and info["Requeue"] == "1", why   # JobRequeue=0: --requeue came from the script
    batch = batch_log.read_text()
    assert "requeueing job" in batch and "restart 1 on 2 nodes" in batch, why
    rank0 = node_logs(job_env, "elt-preempt", job)[f"node0-{socket.gethostname().split('.')[0]}"]
    starts = [int(s) for s in re.findall(rf"steps (\d+)→{steps}", rank0)]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < steps, why   # the second run resumed
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, steps + 1)), why     # every step once, none twice
    assert all(row["world_size"] == 2 for row in rows)


STAND_IN = """#!/bin/bash
# Stand-in for `python -m elt_scale.train` that waits for Slurm's warning signal: like the trainer
# (elt_scale/engine/preemption.py) it exits 75 on USR1; the requeued run finishes at once.
[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && { echo "rank $RANK: requeued run, done"; exit 0; }
trap 'echo "rank $RANK on $SLURMD_NODENAME: got USR1"; exit 75' USR1
for _ in $(seq 1200); do sleep 0.1; done
echo "rank $RANK: no USR1 within 120 s"; exit 1
"""


def test_sbatch_signal_header_reaches_every_rank_and_requeues(cluster, tmp_path, job_env):
    """The script's own `#SBATCH --signal=USR1@300` (no B:), fired by Slurm's time-limit warning: every rank
    gets USR1, the batch shell does not (bash would die of it), and the job requeues itself. The ranks are
    a stand-in so that this waits for Slurm's clock, not for training; the trainer's side of the same
    signal is test_preempted_run_requeues_and_resumes_without_repeating_steps."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STAND_IN)
    (bin_dir / "python").chmod(0o755)
    Path(job_env["ELT_ENV_FILE"]).write_text(f"export PATH={bin_dir}:$PATH\n")
    job, batch_log = submit_train(cluster, tmp_path, job_env, name="elt-signal")
    deadline = time.time() + 60
    while cluster.job(job).get("JobState") != "RUNNING":
        assert time.time() < deadline, cluster.logs()
        time.sleep(0.2)
    # 5 minutes left = inside the 300 s warning window: slurmctld signals at its next time-limit check (<= 30 s).
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"], env=cluster.env, check=True, timeout=30)
    info = cluster.wait(job, timeout=120)
    why = explain(cluster, batch_log, job_env, "elt-signal", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", why
    logs = "\n".join(node_logs(job_env, "elt-signal", job).values())
    assert re.search(r"rank 0 on n1: got USR1", logs) and re.search(r"rank 1 on n2: got USR1", logs), why
    assert "requeueing job" in batch_log.read_text() and "requeued run, done" in logs, why


def shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                assert m.name not in members, f"{m.name} in two shards"
                members[m.name] = t.extractfile(m).read()
    return members


def test_tokenize_array_equals_one_task_run(cluster, tmp_path, job_env):
    args = ("--source", "digits", "--workers", "0", "--samples-per-shard", "300")
    one, two = tmp_path / "one", tmp_path / "two"
    sb = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    single = cluster.sbatch("slurm/tokenize.sh", *args, "--out", str(one), env=job_env, cwd=ROOT,
                            sbatch_args=[*sb, f"--output={tmp_path}/single.out"])
    array = cluster.sbatch("slurm/tokenize.sh", *args, "--out", str(two), env=job_env, cwd=ROOT,
                           sbatch_args=[*sb, "--array=3-4", f"--output={tmp_path}/array-%a.out"])  # ranks 0, 1

    def logs():
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.rglob("*.out")))

    assert cluster.wait(single, timeout=120)["JobState"] == "COMPLETED", logs()
    cluster.wait_all(timeout=120)                                  # both array tasks, then the merge job
    merge_log = Path(job_env["ELT_LOG_DIR"]) / f"elt-tokenize-{array}_merge.out"
    assert merge_log.exists() and "merged rank manifests" in merge_log.read_text(), logs()
    assert len(list(two.glob("manifest.train.rank*.json"))) == 2 and (two / "manifest.json").exists(), logs()
    a, b = shard_members(one), shard_members(two)
    assert len(a) == 3 * json.loads((one / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)      # same samples, byte for byte
    m1, m2 = (json.loads((d / "manifest.json").read_text())["splits"]["train"] for d in (one, two))
    assert m1["num_samples"] == m2["num_samples"] and m1["class_counts"] == m2["class_counts"]
