"""How mixed are the paper recipes' batches? Distinct classes per global batch and per micro-batch on
ImageNet- and UCF-101-sized synthetic manifests, class-sorted (as tokenize.py wrote before issue 26, or with
--keep-source-order) and shuffled (its default now), against an i.i.d. draw. Writes docs/batch_mix.{md,csv}.

Protocol
--------
1. Synthetic manifests (elt_scale/data/synthetic.py): the shard layout tokenize.py writes for ImageNet-1k
   train (1,281,167 samples, 1000 classes, shards of 1000) and UCF-101 split 1 train (9,537 clips, 101
   classes, shards of 256), in source order and in tokenize.py's own seeded write order (seed 0).
2. Every recipe in recipes/ on that dataset, grouped by (global batch G, micro-batch m, shuffle buffer,
   seed) as the recipe sets them (the cluster it was sized for).
3. Expected: elt_scale/data/mix.py `expected_mix` from the per-shard class counts only (what elt-plan and
   the trainer's start-up check print): mean over two epochs' shard orders, and the lowest window's mean.
4. Simulated, as a check of 3: --batches global batches spread evenly over two epochs, drawn by the
   project's `Order.micro_batch_samples` with every sample's label known; mean and lowest batch.
5. i.i.d.: sum_c 1 - (1 - p_c)^n for n = G and n = m.

    python bench/batch_mix.py [--batches 64] [--out docs]
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from elt_scale.config import load_recipe  # noqa: E402
from elt_scale.data.mix import expected_mix, simulate_mix, sorted_within, spread_batches  # noqa: E402
from elt_scale.data.order import Order  # noqa: E402
from elt_scale.data.shards import decode_class_counts  # noqa: E402
from elt_scale.data.synthetic import synthetic_manifest  # noqa: E402

COLUMNS = ["dataset", "recipes", "G", "m", "buffer", "layout", "global", "global_low", "global_sim",
           "global_sim_low", "global_iid", "micro", "micro_low", "micro_sim", "micro_sim_low", "micro_iid"]


def recipe_groups() -> dict:
    """(dataset, G, m, buffer, seed) -> recipe names, for the paper recipes."""
    groups: dict = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        dataset = path.name.split("_")[0].replace("imagenet256", "imagenet")
        if dataset not in ("imagenet", "ucf101"):
            continue
        r = load_recipe(str(path), [])
        t = r.train
        g = t.global_batch or t.micro_batch * t.grad_accum
        key = (dataset, g, t.micro_batch, r.data.shuffle_buffer, r.run.seed)
        groups.setdefault(key, []).append(path.stem)
    return groups


def rows(batches: int) -> list[dict]:
    out = []
    layouts = {}
    for (dataset, g, m, buffer, seed), names in recipe_groups().items():
        for how in ("sorted", "shuffled"):
            if (dataset, how) not in layouts:
                layouts[dataset, how] = synthetic_manifest(f"{dataset}-{how}")
            manifest, labels = layouts[dataset, how]
            entry = manifest["splits"]["train"]
            sizes = entry["shard_sizes"]
            mix = expected_mix(decode_class_counts(entry["shard_class_counts"]), sizes, seed, g, m, buffer,
                               sorted_within(manifest, "train"))
            order = Order(tuple(sizes), seed, g, m, buffer)
            shard_labels = np.split(labels, np.cumsum(sizes)[:-1])
            sim = simulate_mix(order, shard_labels, spread_batches(order, batches))
            out.append({"dataset": dataset, "recipes": " ".join(names), "G": g, "m": m, "buffer": buffer,
                        "layout": how, **{k: mix[k] for k in ("global", "global_low", "global_iid", "micro",
                                                              "micro_low", "micro_iid")},
                        "global_sim": sim["global"], "global_sim_low": sim["global_low"],
                        "micro_sim": sim["micro"], "micro_sim_low": sim["micro_low"]})
            print(f"{dataset} G={g} m={m} {how}: {mix['global']:.1f} (sim {sim['global']:.1f}) / "
                  f"{mix['micro']:.2f} (sim {sim['micro']:.2f})", flush=True)
    return out


def markdown(table: list[dict], meta: str) -> str:
    lines = [meta, "",
             "| dataset | recipes | G | m | shards | per global batch: expected (lowest window) | simulated (lowest) "
             "| i.i.d. | per micro-batch: expected (lowest) | simulated (lowest) | i.i.d. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['dataset']} | {r['recipes'].replace(' ', ', ')} | {r['G']} | {r['m']} | {r['layout']} "
                     f"| {r['global']:.1f} ({r['global_low']:.1f}) | {r['global_sim']:.1f} ({r['global_sim_low']}) "
                     f"| {r['global_iid']:.1f} | {r['micro']:.2f} ({r['micro_low']:.2f}) "
                     f"| {r['micro_sim']:.2f} ({r['micro_sim_low']}) | {r['micro_iid']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=64, help="global batches simulated per row")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for batch_mix.md and batch_mix.csv")
    args = p.parse_args(argv)
    start = time.time()
    table = rows(args.batches)
    meta = (f"Batch class mix, {time.strftime('%Y-%m-%d')}, commit {commit()}, {platform.machine()}: "
            f"`python bench/batch_mix.py --batches {args.batches}` in {time.time() - start:.0f} s. Synthetic "
            "manifests (elt_scale/data/synthetic.py), shuffle buffer and seed from the recipes; expected = "
            "elt_scale/data/mix.py from per-shard class counts (mean over two epochs' shard orders, lowest "
            f"window), simulated = {args.batches} global batches drawn by the project's Order with labels known.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_mix.md").write_text(markdown(table, meta))
    with open(out / "batch_mix.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"batch_mix: {len(table)} rows -> {out / 'batch_mix.md'} in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
