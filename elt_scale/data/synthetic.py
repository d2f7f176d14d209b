"""Synthetic dataset-sized manifests: the shard layout tokenize.py would write, without any data.

For `elt-plan --manifest synthetic:LAYOUT`, docs/data.md's batch-mix table (bench/batch_mix.py) and tests.
  imagenet-*  1000 classes, 1,281,167 training samples (ImageNet-1k's total), 935 classes of 1300 and 65
              between 732 and 1300 (its extremes; its exact class sizes are not in this repo), shards of
              1000 (docs/data.md's --samples-per-shard).
  ucf101-*    101 classes, 9,537 clips (split 1's train list) spread evenly, shards of 256 (the default).
`*-shuffled` lays the sorted items out with tokenize.py's own `write_order`, `*-sorted` as older versions
did (class by class)."""
from __future__ import annotations

import numpy as np

from .shards import FORMAT, encode_class_counts, write_order

IMAGENET_TRAIN = 1_281_167
UCF101_TRAIN = 9_537
LAYOUTS = ("imagenet-shuffled", "imagenet-sorted", "ucf101-shuffled", "ucf101-sorted")


def imagenet_class_sizes(num_classes: int = 1000, total: int = IMAGENET_TRAIN) -> np.ndarray:
    """935 classes of 1300, then 65 ramping from 732 up, the last one sized to make `total` exactly."""
    small = 65
    sizes = np.full(num_classes, 1300, np.int64)
    sizes[-small:] = np.linspace(732, 1300, small, endpoint=False).round()
    sizes[-1] += total - sizes.sum()
    assert 732 <= sizes.min() and sizes.max() <= 1300 and sizes.sum() == total
    return sizes


def even_class_sizes(num_classes: int, total: int) -> np.ndarray:
    return total // num_classes + (np.arange(num_classes) < total % num_classes)


def layout_labels(class_sizes: np.ndarray, shuffled: bool, seed: int = 0) -> np.ndarray:
    """Every item's label in the order tokenize.py writes it."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)      # the sorted source list
    if shuffled:
        labels = labels[np.asarray(write_order(len(labels), seed))]
    return labels


def manifest_from_labels(labels: np.ndarray, num_classes: int, per_shard: int, shuffled: bool, seed: int = 0,
                         split: str = "train") -> dict:
    """A manifest (the keys the loader and mix.py read) for items written in this label order."""
    shard_of = np.arange(len(labels)) // per_shard
    n_shards = int(shard_of[-1]) + 1
    counts = np.bincount(shard_of * num_classes + labels, minlength=n_shards * num_classes)
    counts = counts.reshape(n_shards, num_classes)
    entry = {"num_samples": int(len(labels)),
             "shards": [f"{split}-{i:06d}.tar" for i in range(n_shards)],
             "shard_sizes": counts.sum(axis=1).tolist(),
             "shard_class_counts": [encode_class_counts(dict(enumerate(row.tolist())), num_classes) for row in counts],
             "class_counts": {str(c): int(n) for c, n in enumerate(counts.sum(axis=0)) if n},
             "item_order": ({"shuffled": True, "seed": seed} if shuffled
                            else {"shuffled": False, "class_runs": 1 + int((np.diff(labels) != 0).sum())})}
    return {"format": FORMAT, "synthetic": True, "num_classes": num_classes,
            "class_names": [str(c) for c in range(num_classes)], "splits": {split: entry}}


def synthetic_manifest(layout: str, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(manifest, labels in write order) for one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"synthetic manifest {layout!r}; allowed: {', '.join(LAYOUTS)}")
    dataset, how = layout.split("-")
    sizes, per_shard = ((imagenet_class_sizes(), 1000) if dataset == "imagenet"
                        else (even_class_sizes(101, UCF101_TRAIN), 256))
    labels = layout_labels(sizes, how == "shuffled", seed)
    return manifest_from_labels(labels, len(sizes), per_shard, how == "shuffled", seed), labels
