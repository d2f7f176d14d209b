"""Splitting tokenization work over ranks, resuming it, and merging what the ranks wrote.

Items are written in a seeded random permutation of the full sorted item list (elt_scale/data/shards.py
`write_order`; source order with --keep-source-order): sorted ImageNet/UCF-101 lists run class by class,
and the loader mixes only a few consecutive shards per shuffle window, so class-sorted shards give batches
of few classes (issue 26). The permutation is a pure function of (seed, number of items), so every rank of
an array job computes the same list. Rank r of W takes the contiguous slice [r*n//W, (r+1)*n//W) of that
list and cuts it into shards of `samples_per_shard` *input items* (an unreadable item leaves its shard one
sample short, so shard boundaries never move). Shard indices are global: rank r starts after every shard
of the ranks before it, so ranks never touch each other's files. Each finished shard has a sidecar
`{shard}.json` with its counts; a rerun skips every shard whose file exists (it was renamed into place
only when whole). A finished rank writes `manifest.{split}.rank{r:05d}.json`; `--merge` (or a world size
of 1) folds those into manifest.json, split by split. A split's manifest entry records the write order
(`item_order`) and every shard's class counts (`shard_class_counts`, aligned with `shards`), from which
elt_scale/data/mix.py tells how mixed the training batches are without reading any data."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from elt_scale.data.shards import MANIFEST, encode_class_counts, read_manifest, shard_name, sidecar_path, write_json


@dataclass
class ShardPlan:
    index: int
    start: int          # item range [start, end) in the full item list, in write order
    end: int

    def name(self, split: str) -> str:
        return shard_name(split, self.index)


def rank_from_env() -> tuple[int, int]:
    """(rank, world) from a Slurm array job (task id minus the array's first id, task count), else (0, 1)."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
                int(env["SLURM_ARRAY_TASK_COUNT"]))
    return 0, 1


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def plan_shards(n: int, samples_per_shard: int, rank: int, world: int) -> list[ShardPlan]:
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"--rank {rank} --world-size {world}: need 0 <= rank < world-size")
    first = sum(-(-(b - a) // samples_per_shard) for a, b in (rank_slice(n, r, world) for r in range(rank)))
    a, b = rank_slice(n, rank, world)
    return [ShardPlan(first + j, s, min(s + samples_per_shard, b))
            for j, s in enumerate(range(a, b, samples_per_shard))]


def finished(out: Path, split: str, shard: ShardPlan, expect: dict) -> dict | None:
    """The sidecar of a complete shard, or None when it still has to be written. A complete shard
    from different inputs or settings is an error: overwriting it would lose work silently."""
    path = out / shard.name(split)
    if not path.exists():
        return None
    try:
        side = json.loads(sidecar_path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{path} exists but its sidecar {sidecar_path(path).name} is unreadable ({e}); "
                           "delete the shard to rewrite it") from e
    for k, v in expect.items():
        if side.get(k) != v:
            raise RuntimeError(f"{path} was written with {k}={side.get(k)!r}, this run has {v!r}: a different "
                               "input list or settings (--world-size, --samples-per-shard, --seed, "
                               "--keep-source-order, tokenizer ...). Use a fresh --out, or delete the old shards.")
    if side.get("bytes") not in (None, path.stat().st_size):    # cut short after it was complete (disk, copy)
        print(f"elt-tokenize: {path} has {path.stat().st_size} bytes, its sidecar says {side['bytes']}: "
              "writing it again", file=sys.stderr)
        return None
    return side


def rank_manifest_path(out: Path, split: str, rank: int) -> Path:
    return out / f"manifest.{split}.rank{rank:05d}.json"


def split_entry(sidecars: list[tuple[str, dict]], num_classes: int, item_order: dict) -> dict:
    """The manifest's `splits[split]` from (shard name, sidecar) pairs in shard order."""
    counts: Counter = Counter()
    for _, side in sidecars:
        counts.update({int(k): v for k, v in side["class_counts"].items()})
    full = [(name, side) for name, side in sidecars if side["num_samples"] > 0]
    return {"num_samples": sum(s["num_samples"] for _, s in sidecars),
            "shards": [name for name, _ in full],
            "shard_sizes": [s["num_samples"] for _, s in full],
            "shard_class_counts": [encode_class_counts(s["class_counts"], num_classes) for _, s in full],
            "class_counts": {str(k): v for k, v in sorted(counts.items())},
            "item_order": item_order}


def merge_entries(entries: list[dict]) -> dict:
    counts: Counter = Counter()
    for e in entries:
        counts.update({int(k): v for k, v in e["class_counts"].items()})
    merged = {"num_samples": sum(e["num_samples"] for e in entries),
              "shards": [s for e in entries for s in e["shards"]],
              "shard_sizes": [n for e in entries for n in e["shard_sizes"]],
              "class_counts": {str(k): v for k, v in sorted(counts.items())}}
    if all("shard_class_counts" in e for e in entries):     # rank manifests of an older version lack them
        merged["shard_class_counts"] = [c for e in entries for c in e["shard_class_counts"]]
    if "item_order" in entries[0]:                           # ranks agree: their split_hash covers it
        merged["item_order"] = entries[0]["item_order"]
    return merged


def fold_into_manifest(out: Path, split: str, rank_manifests: list[dict]) -> dict:
    """Join rank manifests of one split and write that split into manifest.json (other splits stay)."""
    base = rank_manifests[0]
    for m in rank_manifests[1:]:
        if m["split_hash"] != base["split_hash"]:
            raise ValueError(f"{out}: rank {m['rank']} was run with other settings than rank {base['rank']} "
                             f"(split_hash {m['split_hash']} != {base['split_hash']})")
    merged = {k: v for k, v in base.items() if k not in ("rank", "world_size", "split_hash", "splits", "skipped")}
    merged["splits"] = {split: merge_entries([m["splits"][split] for m in rank_manifests])}
    merged["skipped"] = [s for m in rank_manifests for s in m["skipped"]]
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        if old.get("config_hash") != merged["config_hash"]:
            raise ValueError(f"{out / MANIFEST} holds shards made with other settings (config_hash "
                             f"{old.get('config_hash')} != {merged['config_hash']}); use another --out")
        merged["splits"] = {**old["splits"], **merged["splits"]}
        merged["skipped"] = [s for s in old.get("skipped", []) if s.get("split") != split] + merged["skipped"]
    write_json(out / MANIFEST, merged)
    return merged


def merge_ranks(out: Path, split: str | None = None) -> list[str]:
    """`--merge`: fold every split whose ranks have all finished into manifest.json."""
    found: dict[str, list[dict]] = {}
    for path in sorted(out.glob("manifest.*.rank*.json")):
        m = json.loads(path.read_text())
        found.setdefault(next(iter(m["splits"])), []).append(m)
    if split is not None:
        found = {split: found.get(split, [])}
    if not any(found.values()):
        raise FileNotFoundError(f"{out}: no manifest.*.rank*.json to merge"
                                f"{f' for split {split!r}' if split else ''}")
    for name, ms in found.items():
        world = ms[0]["world_size"]
        missing = sorted(set(range(world)) - {m["rank"] for m in ms})
        if missing or any(m["world_size"] != world for m in ms):
            raise RuntimeError(f"{out}: split {name!r} has rank manifests for {len(ms)} of {world} ranks; "
                               f"missing ranks {missing}: run (or rerun) them, then --merge again")
        fold_into_manifest(out, name, sorted(ms, key=lambda m: m["rank"]))
    return sorted(found)
