"""Threads per process on a shared CPU (issue 33): quick digits diffusion trainings alone, as two ranks of one
launch, and as two separate trainings side by side (unpinned, and given a core each with taskset).

    python bench/threads.py [--steps 120] [--out /tmp/elt-threads]

Each case prints the trainer's own steps/s (median of metrics.jsonl's samples_per_s after its first two
logged intervals, / the global batch). Run it on an idle machine: the cases run one after another, the
processes within a case at once. The digits pixel shards are made in --out on first use."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elt_scale.dist import free_port  # noqa: E402
from elt_scale.engine.logger import read_rows  # noqa: E402


def command(out: Path, name: str, steps: int, micro: int, nprocs: int = 1, pin: str | None = None) -> list[str]:
    launch = [sys.executable, "-m", "elt_scale.train"] if nprocs == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
        str(free_port()), "--module", "elt_scale.train"]
    cmd = [*launch, str(ROOT / "recipes" / "digits_diffusion.yaml"), f"data.shards={out / 'shards'}",
           f"run.out_dir={out / 'runs'}", f"run.name={name}", f"train.steps={steps}", "train.log_every=10",
           "train.save_every=100000", f"train.micro_batch={micro}"]
    return ["taskset", "-c", pin, *cmd] if pin is not None else cmd


def steps_per_s(run: Path, global_batch: int) -> float:
    rows = [r for r in read_rows(run / "metrics.jsonl") if "samples_per_s" in r]
    return statistics.median(r["samples_per_s"] for r in rows[2:]) / global_batch


def case(out: Path, index: int, label: str, steps: int, procs: list[dict], env_extra: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE")}
    env.update(WANDB_MODE="disabled", **env_extra)
    running = []
    for i, p in enumerate(procs):
        name = f"case{index}_{i}"
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        running.append((name, p, subprocess.Popen(command(out, name, steps, **p), cwd=ROOT, env=env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    rates = []
    for name, p, proc in running:
        err = proc.communicate()[1]
        if proc.returncode != 0:
            raise SystemExit(f"{label}: {name} exited {proc.returncode}:\n{err[-2000:]}")
        rates.append(steps_per_s(out / "runs" / name, p["micro"] * p.get("nprocs", 1)))
    print(f"| {label} | {', '.join(f'{r:.1f}' for r in rates)} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", type=Path, default=Path("/tmp/elt-threads"))
    args = p.parse_args()
    if not (args.out / "shards" / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits",
                        "--pixel-mode", "identity", "--out", str(args.out / "shards")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cores = sorted(os.sched_getaffinity(0))
    print(f"{len(cores)} cores; steps/s per process (2 ranks: steps/s of the launch, micro-batch 16 each)\n")
    print("| case | steps/s |\n|---|---|")
    one, ranks, every = {"micro": 32}, {"micro": 16, "nprocs": 2}, {"OMP_NUM_THREADS": str(len(cores))}
    cases = [("alone, 1 thread (OMP_NUM_THREADS=1)", [one], {"OMP_NUM_THREADS": "1"}),
             (f"alone, elt-train's choice ({len(cores)} threads)", [one], {}),
             ("2 ranks of one launch, elt-train's choice (cores / 2 each)", [ranks], {}),
             (f"2 ranks of one launch, every core each (torch's default before; OMP_NUM_THREADS={len(cores)})",
              [ranks], every),
             ("2 trainings side by side, unpinned: every core each", [one, one], {}),
             ("2 trainings side by side, a core each (taskset)",
              [{"micro": 32, "pin": str(cores[0])}, {"micro": 32, "pin": str(cores[1 % len(cores)])}], {})]
    for i, (label, procs, env) in enumerate(cases):
        case(args.out, i, label, args.steps, procs, env)


if __name__ == "__main__":
    main()
