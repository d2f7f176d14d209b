"""The models of a study and their training: every (family, model, seed) through elt_scale.train, a few
processes at a time on one thread each (small matrices: a process per core beats threads in one)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    family: str
    model: str
    seed: int
    recipe: Path
    shards: Path
    dir: Path
    overrides: tuple[str, ...]      # what makes this model this model (layers, loops, the ILSD switch)

    @property
    def name(self) -> str:
        return f"{self.family}_{self.model}_s{self.seed}"


def tokenize(shards: Path, args: tuple[str, ...] = (), source: str = "digits") -> None:
    """A built-in source's train and val splits into one shard set (skipped when already there)."""
    from elt_scale.data.shards import read_manifest
    have = set(read_manifest(shards)["splits"]) if (shards / "manifest.json").exists() else set()
    for split in ("train", "val"):
        if split not in have:
            subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", source,
                            "--split", split, "--out", str(shards), *args], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)


def train_all(runs: list[Run], steps: int, extra: list[str], jobs: int, logs: Path) -> None:
    """Train every run afresh, `jobs` at once; one progress bar over all of them; a failure names its log."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    logs.mkdir(parents=True, exist_ok=True)
    waiting, active = list(runs), []
    bar = tqdm(total=steps * len(runs), desc=f"train {len(runs)} models", unit="step")
    while waiting or active:
        while waiting and len(active) < jobs:
            active.append(start_training(waiting.pop(0), steps, extra, env, logs))
        for job in [j for j in active if j[1].poll() is not None]:
            active.remove(job)
            check_finished(*job)
        bar.update(sum(last_step(r.dir) for r in runs) - bar.n)
        time.sleep(0.5)
    bar.close()


def start_training(run: Run, steps: int, extra: list[str], env: dict, logs: Path):
    shutil.rmtree(run.dir, ignore_errors=True)          # the study's own output: each run trains afresh
    cmd = [sys.executable, "-m", "elt_scale.train", str(run.recipe), f"data.shards={run.shards}",
           f"run.out_dir={run.dir.parent}", f"run.name={run.dir.name}", f"run.seed={run.seed}",
           f"train.steps={steps}", "train.resume=never", "train.save_every=0",
           f"train.log_every={max(1, min(10, steps // 10))}", *run.overrides, *extra]
    log = open(logs / f"train_{run.name}.log", "w")
    return run.name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def check_finished(name: str, proc, log) -> None:
    log.close()
    if proc.returncode != 0:
        tail = Path(log.name).read_text()[-3000:]
        raise RuntimeError(f"training {name} failed (exit {proc.returncode}); log {log.name}:\n{tail}")


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, total training loss) from the run's metrics.jsonl; [] while it has none."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    except (OSError, ValueError, KeyError):
        return []


def last_step(run_dir: Path) -> int:
    losses = train_losses(run_dir)
    return losses[-1][0] if losses else 0
