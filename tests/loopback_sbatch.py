"""`sbatch` for tests/e2e/test_docs_commands.py: what a documented sbatch line runs, on this machine, without
Slurm. It is on PATH as `sbatch` while the docs' commands run; the real thing on a two-node loopback cluster is
tests/cluster/.

  slurm/train_large.sh    the script's own dry run (ELT_DRY_RUN=1) for the job's layout (--nodes N, else the
                          script's #SBATCH defaults) prints every rank's command; then rank 0's command runs with a
                          world of one (RANK=0 WORLD_SIZE=1 on 127.0.0.1, one thread). Prints
                          `loopback sbatch: N ranks` first, N the ranks the job would start.
  slurm/tokenize.sh       each task of --array=A-B runs the script in turn with Slurm's array variables; a job it
                          submits with --dependency (the merge job) is queued in $ELT_LOOPBACK_SBATCH_QUEUE and
                          runs once every task succeeded, with its --export variables.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

VALUE_OPTIONS = {"--nodes", "-N", "--array", "-a", "--dependency", "-d", "--export", "--job-name", "-J", "--partition",
                 "-p", "--ntasks", "-n", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "-c", "--time",
                 "-t", "--output", "-o", "--kill-on-invalid-dep", "--signal"}


def parse(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if "=" in a and a.startswith("--"):
            k, v = a.split("=", 1)
            opts[k] = v
        elif a in VALUE_OPTIONS:
            opts[a] = argv[i + 1]
            i += 1
        elif re.fullmatch(r"-N\d+", a):
            opts["--nodes"] = a[2:]
        else:
            opts[a] = ""
        i += 1
    if i >= len(argv):
        sys.exit("loopback sbatch: no script")
    return opts, argv[i], argv[i + 1:]


def queue_file() -> Path:
    return Path(os.environ["ELT_LOOPBACK_SBATCH_QUEUE"])


def next_job_id() -> int:
    q = queue_file()
    state = json.loads(q.read_text()) if q.exists() else {"next": 100, "queued": []}
    state["next"] += 1
    q.write_text(json.dumps(state))
    return state["next"]


def train(opts: dict[str, str], script: str, args: list[str]) -> int:
    env = dict(os.environ, ELT_DRY_RUN="1")
    if "--nodes" in opts or "-N" in opts:
        env["SLURM_JOB_NUM_NODES"] = opts.get("--nodes", opts.get("-N"))
    if "--ntasks-per-node" in opts:
        env["SLURM_NTASKS_PER_NODE"] = opts["--ntasks-per-node"]
    dry = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True)
    ranks = [line for line in dry.stdout.splitlines() if line.startswith("dry-run ")]
    print(f"loopback sbatch: {len(ranks)} ranks")
    print(dry.stdout, end="")
    if dry.returncode or not ranks:
        print(dry.stderr, end="", file=sys.stderr)
        return dry.returncode or 1
    argv = shlex.split(ranks[0].split(": ", 1)[1])
    assert argv[0] == "env", ranks[0]
    n = 1
    while re.fullmatch(r"[A-Z_]+=.*", argv[n]):
        n += 1
    values, command = dict(a.split("=", 1) for a in argv[1:n]), argv[n:]
    from elt_scale.dist import free_port
    values.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    print(f"loopback sbatch: rank 0 of {len(ranks)} at world 1: {shlex.join(command)}", flush=True)
    return subprocess.run(command, env=dict(os.environ, **values)).returncode


def tokenize(opts: dict[str, str], script: str, args: list[str]) -> int:
    job = next_job_id()
    base = dict(os.environ, SLURM_SUBMIT_DIR=os.getcwd(), SLURM_JOB_NAME=opts.get("--job-name", "elt-tokenize"),
                SLURM_JOB_PARTITION="loopback")
    if "--dependency" in opts:                       # the merge job: run after the array, by the array's sbatch
        q = queue_file()
        state = json.loads(q.read_text())
        extra = dict(kv.split("=", 1) for kv in opts.get("--export", "").split(",") if "=" in kv)
        state["queued"].append({"job": job, "script": script, "args": args, "env": extra})
        q.write_text(json.dumps(state))
        print(job if "--parsable" in opts else f"Submitted batch job {job}")
        return 0
    if "--array" in opts:
        lo, hi = map(int, opts["--array"].split("%")[0].split("-"))
        tasks = list(range(lo, hi + 1))
    else:
        tasks = [None]
    for t in tasks:
        env = dict(base, SLURM_JOB_ID=str(job if t is None else job * 100 + t))
        if t is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_MIN=str(lo),
                       SLURM_ARRAY_TASK_MAX=str(hi), SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
        print(f"loopback sbatch: job {job} task {t}", flush=True)
        rc = subprocess.run(["bash", script, *args], env=env).returncode
        if rc:
            return rc                                  # Slurm would cancel the afterok job
    state = json.loads(queue_file().read_text())
    queued, state["queued"] = state["queued"], []
    queue_file().write_text(json.dumps(state))
    for q in queued:
        print(f"loopback sbatch: job {q['job']} (after {job})", flush=True)
        env = dict(base, SLURM_JOB_ID=str(q["job"]), **q["env"])
        rc = subprocess.run(["bash", q["script"], *q["args"]], env=env).returncode
        if rc:
            return rc
    return 0


def main(argv: list[str]) -> int:
    opts, script, args = parse(argv)
    if script.endswith("slurm/train_large.sh"):
        return train(opts, script, args)
    if script.endswith("slurm/tokenize.sh"):
        return tokenize(opts, script, args)
    print(f"loopback sbatch: no stand-in for {script}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
