"""Source readers: each yields Item(key, load, label) for one split; `load()` returns pixels in [0, 1]
as a float tensor (C, H, W) for images or (C, T, H, W) for video, or raises for an unreadable input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Item:
    key: str                              # unique, tar-safe sample key
    load: Callable[[], torch.Tensor]      # decode on demand (in a worker), may raise
    label: int
    source: str                           # original file name / index, for the manifest and errors


@dataclass
class Source:
    items: list[Item]
    class_names: list[str]
    channels: int
    grid: list[int]                       # [H, W] or [T, H, W] of the decoded pixels


def digits(split: str, **_) -> Source:
    """scikit-learn's 8×8 digits (1797 images, 17 grey levels). Every 10th image is `val`, the rest `train`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if split not in ("train", "val"):
        raise ValueError(f"digits has splits train and val, not {split!r}")
    keep = [i for i in range(len(data.images)) if (i % 10 == 0) == (split == "val")]
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)

    def item(i: int) -> Item:
        return Item(f"digits_{i:05d}", lambda: images[i][None], int(data.target[i]), f"digits[{i}]")

    return Source([item(i) for i in keep], [str(c) for c in range(10)], 1, [8, 8])


SOURCES = {"digits": digits}
