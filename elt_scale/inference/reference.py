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
FVD keeps reading reference videos whole (`load_reference`).

Statistics are checked wherever they are read (metrics.adm.check_reference_arrays: finite, symmetric, sizes
that agree with each other and with the Inception's), on every rank before any collective, so a bad file
fails in one line naming it and the key; `check_reference` does the checks that need no network, for
start-up."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.shards import MANIFEST, read_manifest
from ..data.webds import split_samples
from ..metrics.adm import BadReference, ReferenceStats, check_reference_arrays
from ..metrics.manifold import K_NEIGHBOURS
from ..tokenizers import tokenizer_from_manifest
from .features import BATCH, array_batches, extractor
from .outputs import load_npz, open_npz_images
from .samples import to_uint8

PR_REFERENCE = 10_000      # reference images for precision/recall: the size of ADM's reference batches
REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool_features", "num_images", "inception_sha256", "source")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")         # ReferenceStats' fields, then its pool as pool_features
Dims = tuple[int | None, int | None]                   # (pool, spatial) sizes of the Inception's features


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
        return npz_reference(path, extract, sha256, batch_size, rank, inception_dims(net, device))
    cached = Path(cache_dir or default_cache_dir()) / f"{reference_key(path, sha256, limit)}.npz"
    if rank0_decides(cached.is_file(), world):          # all ranks take the same branch, even without a shared disk
        return Reference(read_written(cached, sha256, inception_dims(net, device)), "cached",
                         str(cached)) if rank == 0 else None
    written = write_reference(path, cached, extract, sha256, limit, batch_size, rank)
    return Reference(written, "from shards", str(cached)) if rank == 0 else None


def npz_reference(path: Path, extract, sha256: str, batch_size: int, rank: int,
                  dims: Dims = (None, None)) -> Reference | None:
    keys, stats = read_npz(path, STAT_KEYS)
    check_reference_arrays(stats, path, *dims)         # on every rank: none waits in a collective for a failed one
    if "pool_features" in keys and "mu" in keys:
        return Reference(read_written(path, sha256, dims), "precomputed", str(path)) if rank == 0 else None
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


def read_written(path: Path, sha256: str, dims: Dims = (None, None)) -> ReferenceStats:
    """A reference .npz written by write_reference (checked); its features must come from the same Inception file."""
    _, arrays = read_npz(path, ("inception_sha256", *STAT_KEYS, "pool_features"))
    _check_made_with(path, arrays, sha256)
    return ReferenceStats(*(arrays.get(k) for k in (*STAT_KEYS, "pool_features"))).checked(path, *dims)


def _check_made_with(path: Path, arrays: dict, sha256: str) -> None:
    made_with = str(arrays["inception_sha256"]) if "inception_sha256" in arrays else None
    if made_with not in (None, sha256):
        raise BadReference(f"{path}: made with the Inception file of sha256 {made_with[:12]}…, not the one given "
                           f"({sha256[:12]}…): its statistics are not comparable; rebuild it (elt-eval reference)")


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


# ---------------------------------------------------------------------------------------------
# checks: what a reference file must be, before anything is sampled

def inception_dims(net, device="cpu") -> Dims:
    """(pool, spatial) feature sizes of an Inception module (metrics.load_inception), from one tiny image:
    the spatial size depends on the file, and the network resizes every input to 299×299 anyway."""
    with torch.no_grad():
        pool, spatial = net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device))
    return pool.shape[-1], None if spatial is None else spatial.shape[-1]


def check_reference(path: str | Path, *, videos: bool | None = None, dims: Dims = (None, None)) -> None:
    """A reference for fid/fvd, checked without a feature network (training start-up, the CLIs): the path
    exists; an .npz opens without pickles and holds statistics (mu/sigma, checked as where they are read,
    against `dims` where given) or arr_0 uint8 images (N, H, W, 3) (videos=False), videos (N, T, H, W, 3)
    (videos=True) or either (None); a shards directory has a readable manifest. Raises FileNotFoundError or
    BadReference, one line naming the path (and the key)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such reference file or directory")
    if path.suffix == ".npz":
        return _check_npz_reference(path, videos, dims)
    if path.is_file() and path.name != MANIFEST:
        raise BadReference(f"{path}: a reference is an .npz (ADM reference batch, or images in arr_0) or a "
                           f"shards directory with {MANIFEST}")
    try:
        manifest = read_manifest(path)
    except ValueError as e:
        raise BadReference(str(e)) from None
    if not manifest.get("splits"):
        raise BadReference(f"{path}: key 'splits' of its {MANIFEST} names no split to read reference images from")


def check_adm_reference(path: str | Path, dims: Dims, sha256: str, limit: int = 50_000,
                        cache_dir: str | Path | None = None) -> None:
    """What `adm_reference` will read for ADM's suite, checked against the Inception that will score (its
    feature sizes `dims`, its file's `sha256`) without computing anything: check_reference's checks with
    images only; an .npz written by `write_reference` made with this Inception file; images enough for
    precision/recall where statistics are to be computed; a shards directory of images whose cached
    statistics, if any, are sound. Raises FileNotFoundError or BadReference naming the path (the reference's
    own tokenizer is the caller's to load)."""
    path = Path(path)
    check_reference(path, videos=False, dims=dims)
    if path.suffix != ".npz":
        return _check_shards_for_adm(path, dims, sha256, limit, cache_dir)
    keys, arrays = read_npz(path, ("inception_sha256",))
    _check_made_with(path, arrays, sha256)
    if "arr_0" in keys and not {"mu", "pool_features"} <= set(keys):        # its images will be scored
        _check_enough(path, len(open_npz_images(path)), "key 'arr_0' holds")


def _check_shards_for_adm(path: Path, dims: Dims, sha256: str, limit: int, cache_dir) -> None:
    manifest = read_manifest(path)
    split, sample = default_split(manifest), manifest.get("sample", {})
    if len(sample.get("shape", ())) - (sample.get("kind") == "latents") == 3:
        raise BadReference(f"{path}: its samples are videos {sample['shape']}; ADM's suite scores images")
    _check_enough(path, min(limit, int(manifest["splits"][split].get("num_samples", 0))), f"split {split!r} has")
    cached = Path(cache_dir or default_cache_dir()) / f"{reference_key(path, sha256, limit)}.npz"
    if cached.is_file():
        read_written(cached, sha256, dims)


def _check_enough(path: Path, count: int, what: str) -> None:
    if count <= K_NEIGHBOURS:
        raise BadReference(f"{path}: {what} {count} images; reference statistics need more than {K_NEIGHBOURS} "
                           f"(precision/recall use k={K_NEIGHBOURS} neighbours)")


def _check_npz_reference(path: Path, videos: bool | None, dims: Dims) -> None:
    keys, arrays = read_npz(path, (*STAT_KEYS, "pool_features"))
    check_reference_arrays(arrays, path, *dims)
    if "arr_0" in keys:
        _check_images(path, videos)
    elif "mu" not in arrays:
        raise BadReference(f"{path}: neither statistics (keys 'mu', 'sigma') nor images (key 'arr_0'); keys: "
                           f"{', '.join(keys) or 'none'}")


def _check_images(path: Path, videos: bool | None) -> None:
    """arr_0's dtype and shape from its header: the images themselves (ADM: 10,000 of 256²) are not read."""
    try:
        images = open_npz_images(path)
    except ValueError as e:
        raise BadReference(str(e)) from None
    layouts = {4: "(N, H, W, 3)", 5: "(N, T, H, W, 3)"}
    allowed = {None: (4, 5), False: (4,), True: (5,)}[videos]
    shape = tuple(images.shape)
    if images.dtype != np.uint8 or len(shape) not in allowed or shape[-1] != 3 or shape[0] == 0:
        expected = " or ".join(layouts[n] for n in allowed)
        raise BadReference(f"{path}: key 'arr_0' is {images.dtype} of shape {shape}, expected uint8 {expected} "
                           "with N > 0")


def read_npz(path: Path, keys) -> tuple[list[str], dict[str, np.ndarray]]:
    """(all keys of the .npz, {key: array} of those of `keys` it holds); no pickles; BadReference otherwise."""
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise BadReference(f"{path}: not a readable .npz ({type(e).__name__})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise BadReference(f"{path}: holds one .npy array; expected an .npz with keys mu/sigma or arr_0")
    with f:
        return list(f.files), {k: _member(f, path, k) for k in keys if k in f.files}


def _member(f, path: Path, key: str) -> np.ndarray:
    try:
        return f[key]
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:    # object arrays need pickles: never loaded
        first_line = (str(e).splitlines() or [""])[0]
        raise BadReference(f"{path}: key {key!r} cannot be read ({type(e).__name__}: {first_line})") from None
