"""Rewrite a class-sorted shard set in tokenize.py's shuffled write order, without encoding anything again.

    python data_prep/reshuffle.py --input /data/shards/in256-sdvae --out /data/shards/in256-sdvae-mixed

Shards written class by class (tokenize.py before issue 26, --keep-source-order, or another tool) give
batches of few classes. Re-tokenizing fixes that but runs the tokenizer over the whole dataset again; this
copies every sample's tar records byte for byte into new shards instead: the split's samples, taken in the
input's shard order (for a class-sorted set, its source order), are laid out in `write_order(n, --seed)`,
the permutation tokenize.py would have drawn, and cut into shards of the input's largest shard size. Input
shards must be local files; the output goes to a new directory, the input is only read. Like tokenize.py it
writes each shard under a temporary name with a sidecar, skips complete shards on a rerun and writes
manifest.json last: the input's manifest with each split's shard list, sizes, per-shard class counts and
`item_order` ({"shuffled": true, "seed": S, "reshuffled_from": INPUT}) replaced. Every split is
rewritten unless --split names one. Memory: ~20 bytes per sample (an index, not the data).
"""
from __future__ import annotations

import collections
import os
import sys
import tarfile
import time
from pathlib import Path

# Run as a script (`python data_prep/reshuffle.py`), this file's folder heads sys.path, and data_prep/tokenize.py
# would shadow the stdlib `tokenize` module (numpy and torch import inspect, which imports it): put the project
# root there instead, before other imports. Python resolves symlinks in that entry: compare real paths.
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.realpath(p or ".") != os.path.join(_ROOT, "data_prep")]

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_prep.shard_plan import finished, plan_shards, split_entry  # noqa: E402
from elt_scale.cli import ArgumentParser  # noqa: E402
from elt_scale.data.shards import (LABEL_MEMBER, MANIFEST, ShardFile, read_manifest, write_json,  # noqa: E402
                                   write_order)


def index_shard(path: Path) -> tuple[list[str], np.ndarray]:
    """(keys, (samples, 3) int64 of [byte offset, byte length, label]) of one shard. A sample is its members'
    consecutive tar records (webdataset's grouping: the name up to the first dot), so it is copied as one
    byte range; only the label member is read."""
    keys, rows = [], []
    with tarfile.open(path) as tf:                       # headers only; nothing is extracted to disk
        for m in tf:
            if not m.isfile() or "." not in m.name.rsplit("/", 1)[-1]:
                continue
            key, ext = m.name.split(".", 1)
            end = m.offset_data + -(-m.size // 512) * 512
            if not keys or keys[-1] != key:
                keys.append(key)
                rows.append([m.offset, 0, -1])
            rows[-1][1] = end - rows[-1][0]
            if ext == LABEL_MEMBER:
                rows[-1][2] = int(tf.extractfile(m).read())
    table = np.array(rows, np.int64).reshape(-1, 3)
    if (table[:, 2] < 0).any():
        raise ValueError(f"{path}: sample {keys[int(np.argmax(table[:, 2] < 0))]} has no {LABEL_MEMBER} member")
    return keys, table


class Records:
    """Byte ranges of the input shards, read through a few open files (consecutive samples of one input
    shard are common in a shuffled output only by chance, so keep a small LRU of handles)."""

    def __init__(self, paths: list[Path], keep: int = 64):
        self.paths, self.keep, self.open = paths, keep, collections.OrderedDict()

    def read(self, shard: int, offset: int, length: int) -> bytes:
        f = self.open.pop(shard, None) or open(self.paths[shard], "rb")
        self.open[shard] = f
        while len(self.open) > self.keep:
            self.open.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise ValueError(f"{self.paths[shard]}: ends inside a sample at byte {offset}")
        return data

    def close(self):
        for f in self.open.values():
            f.close()


def reshuffle_split(src: Path, out: Path, split: str, manifest: dict, seed: int) -> dict:
    """Rewrite one split; returns its new manifest entry."""
    names = manifest["splits"][split]["shards"]
    paths = [src / n for n in names]
    keys, tables, shard_of = [], [], []
    for i, path in enumerate(tqdm(paths, desc=f"index {split}", unit="shard")):
        k, t = index_shard(path)
        keys += k
        tables.append(t)
        shard_of.append(np.full(len(k), i, np.int32))
    table, shard_of = np.concatenate(tables), np.concatenate(shard_of)
    order = np.asarray(write_order(len(keys), seed))
    per_shard = max(manifest["splits"][split]["shard_sizes"])
    source = {"reshuffled_from": str(src), "seed": seed}
    records, sidecars = Records(paths), []
    try:
        for plan in tqdm(plan_shards(len(keys), per_shard, 0, 1), desc=f"write {split}", unit="shard"):
            expect = {**source, "items": plan.end - plan.start, "first_key": keys[order[plan.start]]}
            side = finished(out, split, plan, expect)
            if side is None:
                side = write_shard(out, split, plan, order, keys, table, shard_of, records, expect)
            sidecars.append((plan.name(split), side))
    finally:
        records.close()
    return split_entry(sidecars, manifest.get("num_classes", int(table[:, 2].max()) + 1),
                       {"shuffled": True, **source})


def write_shard(out, split, plan, order, keys, table, shard_of, records, expect) -> dict:
    shard, counts = ShardFile(out, split, plan.index), collections.Counter()
    try:
        for i in order[plan.start:plan.end]:
            offset, length, label = table[i]
            shard.write_record(records.read(int(shard_of[i]), int(offset), int(length)))
            counts[int(label)] += 1
    except BaseException:
        shard.abort()
        raise
    side = {**expect, "num_samples": shard.count, "skipped": [],
            "class_counts": {str(k): v for k, v in sorted(counts.items())},
            "first": keys[order[plan.start]], "last": keys[order[plan.end - 1]]}
    shard.commit(side)
    return side


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="shard directory with manifest.json (local)")
    p.add_argument("--out", required=True, help="new directory for the reshuffled shards")
    p.add_argument("--split", default=None, help="only this split (default: every split of the manifest)")
    p.add_argument("--seed", type=int, default=0, help="seeds the permutation (as tokenize.py --seed)")
    args = p.parse_args(argv)
    src, out = Path(args.input), Path(args.out)
    try:
        manifest = read_manifest(src)
        if out.resolve() == src.resolve():
            raise ValueError(f"--out {out} is --input: write the reshuffled shards to a new directory")
        if (out / MANIFEST).exists() and read_manifest(out).get("config_hash") != manifest.get("config_hash"):
            raise ValueError(f"{out / MANIFEST} holds shards made with other settings than {src / MANIFEST} "
                             "(config_hash); use another --out")
        splits = [args.split] if args.split else sorted(manifest["splits"])
        missing = [s for s in splits if s not in manifest["splits"]]
        if missing:
            raise ValueError(f"{src / MANIFEST}: no split {missing[0]!r} (splits: {', '.join(manifest['splits'])})")
    except (FileNotFoundError, ValueError) as e:
        print(f"elt-reshuffle: error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    new = dict(manifest)
    new["splits"] = dict(read_manifest(out)["splits"]) if (out / MANIFEST).exists() else {}
    for split in splits:
        new["splits"][split] = reshuffle_split(src, out, split, manifest, args.seed)
    write_json(out / MANIFEST, new)
    done = ", ".join(f"{s}: {new['splits'][s]['num_samples']} samples in {len(new['splits'][s]['shards'])} shards"
                     for s in splits)
    print(f"reshuffled {done} -> {out / MANIFEST} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
