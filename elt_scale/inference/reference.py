"""Reference images for FID/FVD: an ADM reference batch (.npz, arr_0) or a shard set decoded through the
tokenizer its manifest names, as uint8 channels-last (the layout elt-sample writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.shards import read_manifest
from ..data.webds import split_samples
from ..tokenizers import tokenizer_from_manifest
from .outputs import load_npz
from .samples import to_uint8


def shard_images(shards: str | Path, limit: int = 50_000, split: str | None = None, batch: int = 256) -> np.ndarray:
    """Up to `limit` samples of a split (default: val if there is one) decoded to uint8 images/videos."""
    manifest = read_manifest(shards)
    split = split or ("val" if "val" in manifest["splits"] else next(iter(manifest["splits"])))
    decoder = tokenizer_from_manifest(manifest)
    out, pending = [], []

    def flush():
        if pending:
            out.append(to_uint8(decoder.decode(torch.from_numpy(np.stack(pending)))))
            pending.clear()

    for _, array, _ in tqdm(split_samples(str(shards), split, limit=limit), desc=f"reference {split}",
                            leave=False, total=min(limit, manifest["splits"][split]["num_samples"])):
        pending.append(array)
        if len(pending) == batch:
            flush()
    flush()
    if not out:
        raise ValueError(f"{shards}: no samples in split {split!r}")
    return np.concatenate(out)


def load_reference(path: str | Path, limit: int = 50_000) -> np.ndarray:
    """Reference images: an ADM reference .npz (arr_0), or a shard set decoded through its tokenizer."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_npz(path)[0][:limit]
    return shard_images(path, limit)
