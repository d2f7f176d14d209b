"""Benchmark: what in-training any-time evaluation (eval.every) costs a run.

Protocol
--------
1. Digits shards are written once to --shards (data_prep/tokenize.py --source digits) unless given.
2. The recipe (default recipes/digits_masked.yaml: eval at L = 1..4, 20 samples, 12 MaskGIT steps) is trained
   for --steps steps (default 300, its full length) twice, in this order: eval.every=0 and eval.every=--every
   (default 100). Everything else is the recipe's, saves included, one process.
3. Reported: the wall time of each elt-train process (start-up included, the same in both), the sum of
   the `eval_s` the trainer logs per evaluation (rank 0's wall time from weight gathering to the written
   grids and metrics), and two overheads: eval share = sum(eval_s) / (wall with eval − sum(eval_s)), the
   figure the target applies to, and the A/B difference (wall with eval / wall without − 1), which on a
   shared machine also carries the machine's noise. Target: eval share <= 10%.
Report the machine, its load and the date with the numbers.

    python bench/live_eval_overhead.py [--steps 300] [--every 100] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, device_facts


def train(recipe: str, shards: Path, out_dir: Path, name: str, steps: int, every: int) -> tuple[float, list[dict]]:
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
    return wall, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "digits_masked.yaml"))
    p.add_argument("--shards", default=None, help="digits shards (default: written to a temporary folder)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--keep", default=None, help="run the two trainings in this folder and keep them (grids)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        shards = Path(args.shards) if args.shards else tmp / "shards"
        if not args.shards:
            subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits",
                            "--out", str(shards)], check=True, capture_output=True)
        load_before = os.getloadavg()
        wall_off, _ = train(args.recipe, shards, tmp, "no_eval", args.steps, 0)
        wall_on, rows = train(args.recipe, shards, tmp, "with_eval", args.steps, args.every)
    evals = {r["step"]: r["eval_s"] for r in rows if "eval_L" in r}
    eval_total = sum(evals.values())
    result = {**device_facts(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "steps": args.steps, "every": args.every, "wall_s_without_eval": round(wall_off, 2),
              "wall_s_with_eval": round(wall_on, 2), "eval_s": evals, "eval_s_total": round(eval_total, 2),
              "eval_share": round(eval_total / (wall_on - eval_total), 4),
              "ab_overhead": round(wall_on / wall_off - 1, 4)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
