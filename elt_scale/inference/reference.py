"""Reference sets: an ADM reference batch (.npz), a shard set decoded through the tokenizer its manifest
names, or an array of images.

For ADM's suite (`adm_reference`), the reference is used as ADM's evaluator uses it:
  * an .npz with `mu`/`sigma` (and `mu_s`/`sigma_s`) is used through those statistics ("precomputed";
    ADM's VIRTUAL_imagenet256_labeled.npz: the whole ImageNet training set), and its `arr_0` images (ADM:
    10,000) give the reference pool features of precision/recall;
  * an .npz without them: the statistics of its `arr_0` ("from arr_0"), as ADM falls back to;
  * a shard set: up to `limit` decoded images of a split (default val) -> statistics and the pool features
    of the first 10,000 written once as an ADM-layout .npz (REFERENCE_KEYS) under the cache directory,
    keyed by the Inception file's sha256, the manifest, the split and the limit ("from shards", later
    "cached"); `write_reference` writes the same file where asked (elt-eval reference).
FVD keeps reading reference videos whole (`load_reference`)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.shards import read_manifest
from ..data.webds import split_samples
from ..metrics.adm import ReferenceStats
from ..tokenizers import tokenizer_from_manifest
from .features import BATCH, array_batches, extractor
from .outputs import load_npz, open_npz_images
from .samples import to_uint8

PR_REFERENCE = 10_000      # reference images for precision/recall: the size of ADM's reference batches
REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool_features", "num_images", "inception_sha256", "source")


@dataclass
class Reference:
    stats: ReferenceStats
    kind: str                # precomputed | from arr_0 | from shards | cached | from images
    where: str               # the file or directory the statistics came from


def default_split(manifest: dict, split: str | None = None) -> str:
    return split or ("val" if "val" in manifest["splits"] else next(iter(manifest["splits"])))


def shard_batches(shards: str | Path, limit: int, split: str | None = None, batch_size: int = BATCH):
    """Batches source (features.Batches) of up to `limit` decoded samples; unwanted batches are not decoded."""
    manifest = read_manifest(shards)
    split, decoder = default_split(manifest, split), tokenizer_from_manifest(manifest)

    def batches(keep):
        pending, b = [], 0
        for _, array, _ in split_samples(str(shards), split, limit=limit):
            pending.append(array)
            if len(pending) == batch_size:
                if keep(b):
                    yield b, to_uint8(decoder.decode(torch.from_numpy(np.stack(pending))))
                pending, b = [], b + 1
        if pending and keep(b):
            yield b, to_uint8(decoder.decode(torch.from_numpy(np.stack(pending))))
    return batches


def shard_images(shards: str | Path, limit: int = 50_000, split: str | None = None, batch: int = 256) -> np.ndarray:
    """Up to `limit` samples of a split (default: val if there is one) decoded to uint8 images/videos."""
    out = [images for _, images in shard_batches(shards, limit, split, batch)(lambda b: True)]
    if not out:
        raise ValueError(f"{shards}: no samples in split {default_split(read_manifest(shards), split)!r}")
    return np.concatenate(out)


def load_reference(path: str | Path, limit: int = 50_000) -> np.ndarray:
    """Reference images (FVD): an ADM reference .npz (arr_0), or a shard set decoded through its tokenizer."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_npz(path)[0][:limit]
    return shard_images(path, limit)


def adm_reference(source, net, sha256: str, device="cpu", rank: int = 0, world: int = 1, limit: int = 50_000,
                  batch_size: int = BATCH, cache_dir: str | Path | None = None) -> Reference | None:
    """The reference of ADM's suite (see the module docstring). Collective under world > 1 (rank 0 gets it)."""
    extract = extractor(net, device, rank, world)
    if isinstance(source, np.ndarray):
        features = extract(array_batches(source, batch_size), len(source), "reference features")
        return Reference(ReferenceStats.of(features), "from images", "array") if rank == 0 else None
    path = Path(source)
    if path.suffix == ".npz":
        return npz_reference(path, extract, sha256, batch_size, rank)
    cached = Path(cache_dir or default_cache_dir()) / f"{reference_key(path, sha256, limit)}.npz"
    if rank0_decides(cached.is_file(), world):          # all ranks take the same branch, even without a shared disk
        return Reference(read_written(cached, sha256), "cached", str(cached)) if rank == 0 else None
    written = write_reference(path, cached, extract, sha256, limit, batch_size, rank)
    return Reference(written, "from shards", str(cached)) if rank == 0 else None


def npz_reference(path: Path, extract, sha256: str, batch_size: int, rank: int) -> Reference | None:
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        stats = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
        written = "pool_features" in keys and "mu" in keys
    if written:
        return Reference(read_written(path, sha256), "precomputed", str(path)) if rank == 0 else None
    if "mu" in stats and "arr_0" not in keys:            # statistics only: no precision/recall
        return Reference(ReferenceStats(stats["mu"], stats["sigma"], stats.get("mu_s"), stats.get("sigma_s"), None),
                         "precomputed", str(path)) if rank == 0 else None
    images = open_npz_images(path)
    features = extract(array_batches(images, batch_size), len(images), "reference features (arr_0)")
    if rank != 0:
        return None
    if "mu" not in stats:
        return Reference(ReferenceStats.of(features), "from arr_0", str(path))
    return Reference(ReferenceStats(stats["mu"], stats["sigma"], stats.get("mu_s"), stats.get("sigma_s"),
                                    features.pool), "precomputed", str(path))


def read_written(path: Path, sha256: str) -> ReferenceStats:
    """A reference .npz written by write_reference; its features must come from the same Inception file."""
    with np.load(path, allow_pickle=False) as f:
        made_with = str(f["inception_sha256"]) if "inception_sha256" in f.files else None
        if made_with not in (None, sha256):
            raise ValueError(f"{path}: made with the Inception file of sha256 {made_with[:12]}…, not the one given "
                             f"({sha256[:12]}…): its statistics are not comparable; rebuild it (elt-eval reference)")
        return ReferenceStats(*(f[k] if k in f.files else None for k in ("mu", "sigma", "mu_s", "sigma_s",
                                                                         "pool_features")))


def write_reference(shards: Path, out: Path, extract, sha256: str, limit: int = 50_000,
                    batch_size: int = BATCH, rank: int = 0, split: str | None = None) -> ReferenceStats | None:
    """Statistics of a shard split written as an ADM-layout .npz at `out` (rank 0; atomic)."""
    manifest = read_manifest(shards)
    split = default_split(manifest, split)
    total = min(limit, manifest["splits"][split]["num_samples"])
    features = extract(shard_batches(shards, limit, split, batch_size), total, f"reference features ({split})")
    if rank != 0:
        return None
    stats = ReferenceStats.of(features, PR_REFERENCE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.npz")
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "mu_s": stats.mu_s, "sigma_s": stats.sigma_s,
              "pool_features": stats.pool, "num_images": np.array(len(features.pool)),
              "inception_sha256": np.array(sha256), "source": np.array(f"{shards} split={split} limit={limit}")}
    np.savez(tmp, **{k: v for k, v in arrays.items() if v is not None})
    os.replace(tmp, out)
    return stats


def rank0_decides(value, world: int):
    """Rank 0's value on every rank (a broadcast under world > 1)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reference_key(shards: Path, sha256: str, limit: int, split: str | None = None) -> str:
    manifest = read_manifest(shards)
    text = json.dumps([manifest, sha256, default_split(manifest, split), limit], sort_keys=True)
    return f"ref_{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "elt-scale" / "reference"
