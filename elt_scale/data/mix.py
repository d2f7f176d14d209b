"""How mixed are the training batches? Distinct classes per global batch and per micro-batch, expected
from the manifest's per-shard class counts and a recipe's (global batch G, micro-batch m, shuffle buffer),
against an i.i.d. draw of as many samples. No sample is read (issue 26).

The loader (order.py) gives micro-batch j of global batch b m samples drawn without replacement from one
shuffle window of stream j; the streams' windows are disjoint and permuted independently. So, given the
epoch's shard order (taken from the real `Order`), a class with K of a window's S samples is missing from
a micro-batch with the hypergeometric probability H = prod_{i<m} (S-K-i)/(S-i), and from the global batch
with the product of H over the G/m streams:

    E[distinct per micro-batch] = sum_c (1 - H_c)        E[distinct per global batch] = sum_c (1 - prod_j H_jc)
    i.i.d. reference (class frequencies p_c, n draws):   sum_c (1 - (1 - p_c)^n)

The window's class counts come from the per-shard counts: whole shards exactly; a part of a shard in
proportion when the shards were written shuffled, or as the classes that overlap it when they run class
by class (`piece_counts`). Averaged over two epochs' shard orders and (for long epochs) evenly spaced
windows: about 0.1 s for 1,282 shards x 1000 classes. bench/batch_mix.py checks it against batches drawn
with the labels known (`simulate_mix`): within 2% on ImageNet- and UCF-101-sized layouts."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .order import Order
from .shards import decode_class_counts, sidecar_path

FIX = ("rewrite them with data_prep/reshuffle.py, or re-tokenize without --keep-source-order "
       "(docs/data.md)")
FAR_FROM_IID = 0.9        # warn below this fraction of the i.i.d. figure (global batch or micro-batch)
EPOCHS = 2                # epochs' shard orders averaged over
MAX_WINDOWS = 16          # windows evaluated per epoch (evenly spaced) when an epoch has more


def iid_distinct(totals: np.ndarray, draws: int) -> float:
    """Expected distinct classes in `draws` i.i.d. samples from the class frequencies `totals`."""
    p = totals / totals.sum()
    return float(np.sum(1.0 - (1.0 - p) ** draws))


def absent(k: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    """P(a class is missing from m samples drawn without replacement from a window of s samples that holds
    k of it); k is (windows, classes), s is (windows,). Fractional k (parts of shards) interpolates."""
    s = s[:, None].astype(np.float64)
    p = np.ones_like(k, dtype=np.float64)
    for i in range(m):
        p *= np.clip(s - k - i, 0.0, None) / (s - i)
    return p


def piece_counts(counts: np.ndarray, ends: np.ndarray, shard: int, first: int, count: int, size: int,
                 sorted_within: bool) -> np.ndarray:
    """Class counts of samples [first, first + count) of a shard. Written in random order: the shard's
    counts in proportion. In source order: the shard runs class by class in label order (`ends`: each
    class's end within each shard), so the piece holds exactly the classes that overlap it."""
    if count == size:
        return counts[shard]
    if not sorted_within:
        return counts[shard] * (count / size)
    end, start = ends[shard], ends[shard] - counts[shard]
    return np.clip(np.minimum(end, first + count) - np.maximum(start, first), 0, None)


def window_counts(order: Order, counts: np.ndarray, epoch: int, window: int,
                  sorted_within: bool) -> tuple[np.ndarray, np.ndarray]:
    """(class counts (streams, classes), samples (streams,)) of window `window` of every stream."""
    ends = np.cumsum(counts, axis=1) if sorted_within else counts
    k = np.zeros((order.streams, counts.shape[1]))
    s = np.zeros(order.streams)
    for j in range(order.streams):
        start, end = order.window_range(j, window)
        for shard, first, count in order.pieces(epoch, start, end):
            k[j] += piece_counts(counts, ends, shard, first, count, order.sizes[shard], sorted_within)
        s[j] = end - start
    return k, s


def sampled_windows(order: Order) -> list[tuple[int, int]]:
    """(window, global batches in it) of one epoch, at most MAX_WINDOWS of them, evenly spaced."""
    n, per = order.windows_per_epoch, order.batches_per_window
    picks = np.unique(np.linspace(0, n - 1, min(n, MAX_WINDOWS)).round().astype(int))
    return [(int(w), min(per, order.batches_per_epoch - w * per)) for w in picks]


def expected_mix(counts: np.ndarray, sizes, seed: int, global_batch: int, micro_batch: int,
                 shuffle_buffer: int, sorted_within: bool = False) -> dict:
    """Expected distinct classes per global batch and per micro-batch under the project's Order, with the
    i.i.d. figures beside them. `counts` is (shards, classes), rows in the order of `sizes`;
    `sorted_within`: the shards run class by class (`piece_counts`, `sorted_within()`)."""
    order = Order(tuple(int(n) for n in sizes), seed, global_batch, micro_batch, shuffle_buffer)
    glob, micro, weights = [], [], []
    for epoch in range(EPOCHS):
        for window, batches in sampled_windows(order):
            k, s = window_counts(order, counts, epoch, window, sorted_within)
            miss = absent(k, s, micro_batch)
            glob.append(float((1.0 - miss.prod(axis=0)).sum()))
            micro.append((1.0 - miss).sum(axis=1))               # per stream
            weights.append(batches)
    w = np.asarray(weights, np.float64)
    totals = counts.sum(axis=0)
    out = {"global_batch": global_batch, "micro_batch": micro_batch, "window": min(order.window, order.span),
           "shards": int(counts.shape[0]), "classes": int((totals > 0).sum()),
           "global": float(np.average(glob, weights=w)), "global_low": float(min(glob)),
           "global_iid": iid_distinct(totals, global_batch),
           "micro": float(np.average([x.mean() for x in micro], weights=w)),
           "micro_low": float(min(x.min() for x in micro)),
           "micro_iid": iid_distinct(totals, micro_batch)}
    out["ratio"] = min(out["global"] / out["global_iid"], out["micro"] / out["micro_iid"])
    return out


def simulate_mix(order: Order, shard_labels: list[np.ndarray], batches: list[int]) -> dict:
    """The check on `expected_mix`, with the labels known: the distinct classes of the given global batches
    as the project's Order draws them (every stream's micro-batch). -> means and lows over the batches."""
    glob, micro = [], []
    for b in batches:
        per_stream = [[int(shard_labels[s][i]) for s, i in order.micro_batch_samples(b, j)]
                      for j in range(order.streams)]
        glob.append(len({c for labels in per_stream for c in labels}))
        micro += [len(set(labels)) for labels in per_stream]
    return {"batches": len(batches), "global": float(np.mean(glob)), "global_low": int(min(glob)),
            "micro": float(np.mean(micro)), "micro_low": int(min(micro))}


def spread_batches(order: Order, count: int, epochs: int = EPOCHS) -> list[int]:
    """`count` global batch indices evenly spread over the first `epochs` epochs (every window's share)."""
    return np.linspace(0, epochs * order.batches_per_epoch - 1, count).round().astype(int).tolist()


# ---------------------------------------------------------------------------------------------
# where the counts come from

def shard_class_counts(manifest: dict, split: str, urls: list[str]) -> tuple[np.ndarray | None, str]:
    """(counts (shards, classes) of the shards at `urls`, in their order, or None; where they came from, or
    why there are none). The manifest's `shard_class_counts`; for a manifest of an older tokenize.py, the
    shards' own sidecars `{shard}.json` when they are local files (never fetched over a URL)."""
    entry = manifest["splits"][split]
    names = [u.rsplit("/", 1)[-1] for u in urls]
    rows = entry.get("shard_class_counts")
    if rows is not None:
        if len(rows) != len(entry["shards"]):
            return None, f"splits.{split}.shard_class_counts has {len(rows)} rows for {len(entry['shards'])} shards"
        by_name = dict(zip(entry["shards"], rows))
        try:
            return decode_class_counts([by_name[n] for n in names]), "manifest"
        except ValueError as e:
            return None, f"splits.{split}.shard_class_counts is malformed ({e})"
    sides = [sidecar_path(u) for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(sides) != len(urls) or not all(p.is_file() for p in sides):
        return None, "the manifest has no per-shard class counts (written by an older tokenize.py or another tool)"
    classes = manifest.get("num_classes", 0)
    dense = np.zeros((len(sides), classes), np.int64)
    for i, path in enumerate(sides):
        for label, n in json.loads(Path(path).read_text()).get("class_counts", {}).items():
            if not 0 <= int(label) < classes:
                return None, f"{path}: class {label} outside num_classes={classes}"
            dense[i, int(label)] = n
    return dense, "shard sidecars"


def sorted_within(manifest: dict, split: str) -> bool:
    """Do the shards run class by class? Written in source order by a class-grouped source (`class_runs`
    about the class count; digits' source order is not grouped), or unrecorded: an older tokenize.py, whose
    ImageNet, UCF-101 and folder sources were grouped by class."""
    entry = manifest["splits"][split]
    order = entry.get("item_order", {})
    if order.get("shuffled", False):
        return False
    return order.get("class_runs", 0) <= 2 * max(1, len(entry.get("class_counts", {})))


def order_note(manifest: dict, split: str) -> str:
    entry = manifest["splits"][split].get("item_order")
    if entry is None:
        return "write order not recorded"
    return f"written shuffled, seed {entry.get('seed')}" if entry.get("shuffled") else "written in source order"


def format_mix(mix: dict) -> str:
    return (f"{mix['global']:.1f} distinct classes per global batch of {mix['global_batch']} (lowest window "
            f"{mix['global_low']:.1f}; i.i.d. draw {mix['global_iid']:.1f}), {mix['micro']:.1f} per micro-batch of "
            f"{mix['micro_batch']} (lowest {mix['micro_low']:.1f}; i.i.d. {mix['micro_iid']:.1f})")


def far_from_iid(mix: dict) -> bool:
    return mix["ratio"] < FAR_FROM_IID


# ---------------------------------------------------------------------------------------------
# the start-up check

def recipe_batches(recipe) -> tuple[int, int]:
    """(G, m) of a training start: train.global_batch when the recipe fixes it, else micro-batch x accumulation
    x the launcher's WORLD_SIZE (the check runs before the process group exists)."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return t.global_batch or t.micro_batch * t.grad_accum * world, t.micro_batch


def check_mix(recipe, manifest: dict, urls: list[str], sizes: list[int], say=None) -> dict | None:
    """Rank 0 of a training start: one WARNING line naming the figure when the batches would mix far fewer
    classes than an i.i.d. draw (a class-sorted shard set), one quiet note when it cannot tell; else silent.
    Advisory only: it never stops a run. Returns the mix (None when unknown or not rank 0)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    say = say or (lambda line: print(line, file=sys.stderr))
    d = recipe.data
    counts, where = shard_class_counts(manifest, d.split, urls)
    if counts is not None and counts.sum(axis=1).tolist() != list(sizes):
        counts, where = None, f"its per-shard class counts ({where}) disagree with splits.{d.split}.shard_sizes"
    if counts is None:
        say(f"elt-train: note: data.shards={d.shards}: batch class mix not checked: {where}")
        return None
    global_batch, micro_batch = recipe_batches(recipe)
    try:
        mix = expected_mix(counts, sizes, recipe.run.seed, global_batch, micro_batch, d.shuffle_buffer,
                           sorted_within(manifest, d.split))
    except ValueError as e:                     # e.g. fewer samples than one global batch: the loader says so
        say(f"elt-train: note: data.shards={d.shards}: batch class mix not checked: {e}")
        return None
    if far_from_iid(mix):
        say(f"elt-train: WARNING data.shards={d.shards} (split {d.split}, {order_note(manifest, d.split)}): "
            f"batches are far from an i.i.d. draw of classes: {format_mix(mix)}. The shards hold few classes "
            f"each (class-sorted): {FIX}")
    return mix


# ---------------------------------------------------------------------------------------------
# elt-plan

def plan_mix(recipe, spec: str | None, global_batch: int, micro_batch: int) -> dict:
    """The batch mix of `recipe` at (G, m) for the shards of `spec`: a shard directory or URL, its
    manifest.json, or synthetic:LAYOUT (synthetic.py: imagenet-shuffled, imagenet-sorted, ucf101-...);
    None: the recipe's data.shards when its manifest is a file on this machine.
    -> {"manifest", "order", "mix"} or {"manifest", "note"}."""
    from .synthetic import synthetic_manifest
    from .transport import io_policy
    from .webds import is_remote, load_manifest, shard_urls

    split = recipe.data.split
    if spec is None:
        spec = recipe.data.shards
        if is_remote(spec) or "{" in spec or not (Path(spec) / "manifest.json").is_file():
            return {"manifest": None, "note": f"no manifest.json at data.shards={spec} on this machine "
                                              "(--manifest DIR, or synthetic:imagenet-sorted etc.)"}
    if spec.startswith("synthetic:"):
        manifest, _ = synthetic_manifest(spec.split(":", 1)[1])
        split = next(iter(manifest["splits"]))
        urls, sizes = manifest["splits"][split]["shards"], manifest["splits"][split]["shard_sizes"]
    else:
        spec = str(Path(spec).parent) if spec.endswith("manifest.json") and not is_remote(spec) else spec
        manifest = load_manifest(spec, allow_pipe=False, io=io_policy(recipe.data))
        urls, sizes = shard_urls(spec, split, manifest)
    counts, where = shard_class_counts(manifest, split, urls)
    if counts is None:
        return {"manifest": spec, "note": where}
    mix = expected_mix(counts, sizes, recipe.run.seed, global_batch, micro_batch, recipe.data.shuffle_buffer,
                       sorted_within(manifest, split))
    return {"manifest": spec, "order": order_note(manifest, split), "mix": mix}


def format_plan_mix(result: dict) -> str:
    if "mix" not in result:
        return f"  batch class mix: not computed: {result['note']}"
    mix = result["mix"]
    line = (f"  batch class mix ({result['manifest']}: {mix['shards']} shards, {mix['classes']} classes, "
            f"{result['order']}; shuffle window {mix['window']}):\n    {format_mix(mix)}")
    if far_from_iid(mix):
        line += f"\n    far from an i.i.d. draw: the shards are class-sorted; {FIX}"
    return line
