"""Reference images from a shard set: read samples straight from the tars and decode them through the
tokenizer recorded in the manifest, as uint8 channels-last (the same layout elt-sample writes)."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.shards import SAMPLE_MEMBER, decode_npy, read_manifest
from ..tokenizers import tokenizer_from_manifest


def shard_images(shards: str | Path, limit: int = 50_000, split: str | None = None, batch: int = 256) -> np.ndarray:
    from ..sample import to_uint8

    manifest = read_manifest(shards)
    split = split or ("val" if "val" in manifest["splits"] else next(iter(manifest["splits"])))
    decoder = tokenizer_from_manifest(manifest)
    out, pending = [], []

    def flush():
        if pending:
            out.append(to_uint8(decoder.decode(torch.from_numpy(np.stack(pending)))))
            pending.clear()

    count = 0
    for name in tqdm(manifest["splits"][split]["shards"], desc=f"reference {split}", leave=False):
        path = Path(shards) / name
        with tarfile.open(path) as tar:
            for member in tar:
                if count >= limit:
                    break
                if member.name.endswith("." + SAMPLE_MEMBER):
                    try:
                        pending.append(decode_npy(tar.extractfile(member).read()))
                    except ValueError as e:
                        raise ValueError(f"{path}: sample {member.name}: {e}") from None
                    count += 1
                    if len(pending) == batch:
                        flush()
    flush()
    if not out:
        raise ValueError(f"{shards}: no samples in split {split!r}")
    return np.concatenate(out)
