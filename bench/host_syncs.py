"""Host syncs per training step: the device->host reads of one step of elt-train, counted by the line that
makes them (bench/sync_probe.py), with start-up, logging and the final save taken out by difference:

    per step = (reads in a run of LONG steps - reads in a run of SHORT steps) / (LONG - SHORT)

with logging, saving and evaluation off between (log_every and save_every beyond the run). On CPU the count
is of reads of a tensor's value into Python (`item`, `tolist`, `float()`, ...): each is a sync where the
tensor lives on a GPU, and none blocks here, so this counts, it does not time. Compare two versions of the
library in one call:

    python bench/host_syncs.py                          # this checkout
    python bench/host_syncs.py --source /tmp/old        # another checkout's elt_scale (git worktree add)
    python bench/host_syncs.py --zero 0 2 --json out.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_masked.yaml"


def probe(source: Path, shards: Path, steps: int, zero: int, out: Path) -> collections.Counter:
    report = out / f"sync_z{zero}_{steps}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(SYNC_REPORT=str(report), PYTHONPATH=str(source), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / "sync_probe.py"), str(RECIPE), f"data.shards={shards}",
           f"run.out_dir={out}", f"run.name=z{zero}_{steps}", f"train.steps={steps}", f"deepspeed.zero_stage={zero}",
           "model.width=32", "train.micro_batch=8", "train.log_every=1000", "train.save_every=0", "eval.every=0"]
    r = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return collections.Counter(json.loads(report.read_text()))


def where(location: str) -> str:
    """/…/site-packages/deepspeed/runtime/engine.py:2071 -> deepspeed/runtime/engine.py:2071"""
    for marker in ("site-packages/", "elt_scale/", "bench/"):
        if marker in location:
            head, _, tail = location.partition(marker)
            return (marker if marker != "site-packages/" else "") + tail
    return location


def per_step(source: Path, shards: Path, zero: int, short: int, long: int, out: Path) -> dict[str, float]:
    a, b = probe(source, shards, short, zero, out), probe(source, shards, long, zero, out)
    diff = {where(k): (b[k] - a.get(k, 0)) / (long - short) for k in b}
    return {k: v for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v > 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT, help="checkout whose elt_scale is measured (default: this)")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], help="ZeRO stages to measure (one rank)")
    p.add_argument("--steps", type=int, nargs=2, default=[5, 25], metavar=("SHORT", "LONG"))
    p.add_argument("--json", type=Path, help="also write the per-location counts here")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits", "--out",
                        str(shards)], check=True, capture_output=True)
        for zero in args.zero:
            rows = per_step(args.source.resolve(), shards, zero, *args.steps, Path(tmp))
            results[f"zero{zero}"] = rows
            ours = sum(v for k, v in rows.items() if k.startswith("elt_scale/"))
            print(f"ZeRO-{zero}: {sum(rows.values()):.2f} host reads per step, {ours:.2f} of them in elt_scale/")
            for k, v in rows.items():
                print(f"    {v:5.2f}  {k}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
