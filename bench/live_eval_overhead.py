"""Benchmark: what in-training any-time evaluation (eval.every) costs a run.

Protocol
--------
1. Digits shards are written once to --shards (data_prep/tokenize.py --source digits) unless given.
2. The recipe (default recipes/digits_masked.yaml: eval at L = 1..4, 20 samples, 12 MaskGIT steps) is trained
   for --steps steps (default 300, its full length) with eval.every=--every (default 100), one process,
   everything else the recipe's (saves included).
3. Overhead = mean `eval_s` (rank 0's wall time of one evaluation, weight gathering to written grids and
   metrics rows, as the trainer logs it) / (--every × training step time), the step time being
   global batch / the median `samples_per_s` of the run's own log rows (start-up excluded; the median
   ignores the one window an evaluation falls into). Target: <= 10%.
   With --ab the run is repeated with eval.every=0 first, and wall with eval / wall without − 1 is
   reported too (start-up included; on a shared machine this also carries the machine's noise).
Report the machine, its load and the date with the numbers.

    python bench/live_eval_overhead.py [--steps 300] [--every 100] [--ab] [--keep EMPTY_DIR] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, device_facts


def train(recipe: str, shards: Path, out_dir: Path, name: str, steps: int, every: int) -> tuple[float, list[dict], int]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.setdefault("WANDB_MODE", "disabled")
    cmd = [sys.executable, "-m", "elt_scale.train", recipe, f"data.shards={shards}", f"run.out_dir={out_dir}",
           f"run.name={name}", f"train.steps={steps}", f"eval.every={every}"]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"elt-train failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines() if line]
    return wall, rows, json.loads((out_dir / name / "run_info.json").read_text())["global_batch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_masked.yaml"))
    p.add_argument("--shards", default=None, help="digits shards (default: written to a temporary folder)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--ab", action="store_true", help="also time a run without evaluation")
    p.add_argument("--keep", default=None, help="run the two trainings in this folder and keep them (grids)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        shards = Path(args.shards) if args.shards else tmp / "shards"
        if not args.shards:
            subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits",
                            "--out", str(shards)], check=True, capture_output=True)
        load_before = os.getloadavg()
        wall_off = train(args.recipe, shards, tmp, "no_eval", args.steps, 0)[0] if args.ab else None
        wall_on, rows, batch = train(args.recipe, shards, tmp, "with_eval", args.steps, args.every)
    evals = {r["step"]: r["eval_s"] for r in rows if "eval_L" in r}
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    step_s = batch / statistics.median(speeds)
    mean_eval = statistics.mean(evals.values())
    result = {**device_facts(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "steps": args.steps, "every": args.every, "eval_s": evals, "train_step_s": round(step_s, 4),
              "overhead": round(mean_eval / (args.every * step_s), 4), "wall_s_with_eval": round(wall_on, 2)}
    if wall_off:
        result.update(wall_s_without_eval=round(wall_off, 2), ab_overhead=round(wall_on / wall_off - 1, 4))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
