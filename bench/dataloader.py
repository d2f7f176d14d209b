"""Benchmark: shard streaming through webdataset (samples/s per worker, time to first batch after a
resume, bytes read per rank) and tokenization throughput (files/s).

Protocol
--------
1. Synthetic shards are written once to --dir (default /tmp/elt-bench-data) with the project's own
   ShardWriter: 4x32x32 fp16 latents (SD-VAE ImageNet-256 shape), 16x16 int16 codes (VQ ImageNet-256)
   and 4x16x16 int16 video codes (UCF-101 tokens), 20,000 samples each in shards of 1,000.
2. Loader: `make_loader` from a recipe matching each shape, micro-batch 64, shuffle buffer 1,000,
   num_workers 0 (the main process is the single worker: this is the per-worker number) and, with
   --workers N, N worker processes. 30 batches warm-up, then samples/s over the next --batches batches.
   Each configuration runs --repeats times; the median is reported. Reference, interleaved with it so
   both see the same machine load: webdataset's own pipeline (`wds.WebDataset(urls)` + a safe `.npy`
   decode + `.batched(64)`), the same number of samples.
3. Resume: wall time from `make_loader(position=P)` to its first batch, for P = 0, P = 10 epochs and
   P = 10.5 epochs (mid-epoch, mid-shard), the best of max(--repeats, 5) (the least disturbed by other
   jobs on a shared machine), and the shard bytes read to get it (load-independent); the ratios to P = 0
   are reported (target <= 1.5: the loader opens the shard under P instead of reading what came before).
4. Bytes read per rank: two loaders (rank 0 and 1 of world 2) each take one epoch of batches; the bytes
   each read through webdataset's gopen, as a fraction of the split's shard bytes (target about 0.5).
5. Tokenization: data_prep/tokenize.py with the pixels tokenizer over (a) the built-in digits
   (1617 images) and (b) a folder of 512 generated 64x48 JPEGs at --resolution 32, --workers 0 and
   --workers 2; files/s = inputs / wall time of main(), so start-up is included (source listing,
   and for digits scikit-learn's import and load_digits, about a second); tqdm's bar shows the
   steady rate.
Report the machine (CPU model, core count, other load) with the numbers; the target is >= 5,000 latent
samples/s per worker on the 2-core CPU machine.

    python bench/dataloader.py [--batches 200] [--repeats 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elt_scale.config import load_recipe  # noqa: E402
from elt_scale.data import make_loader  # noqa: E402
from elt_scale.data.shards import FORMAT, ShardWriter, write_manifest  # noqa: E402

CASES = {  # name: (kind, shape, dtype, recipe overrides)
    "latents 4x32x32 fp16": ("latents", [4, 32, 32], np.float16,
                             ["model.family=diffusion", "model.channels=4", "model.grid=[32, 32]",
                              "model.patch_size=2"]),
    "codes 16x16 int16": ("codes", [16, 16], np.int16, ["model.family=masked", "model.grid=[16, 16]",
                                                        "model.vocab_size=1024"]),
    "video codes 4x16x16 int16": ("codes", [4, 16, 16], np.int16,
                                  ["model.family=masked", "model.grid=[4, 16, 16]", "model.vocab_size=1024"]),
}


def make_shards(out: Path, kind: str, shape: list[int], dtype, n: int = 20000, per_shard: int = 1000) -> None:
    if (out / "manifest.json").exists():
        return
    rng = np.random.default_rng(0)
    with ShardWriter(out, "train", per_shard) as w:
        for i in range(n):
            x = rng.standard_normal(shape) if kind == "latents" else rng.integers(0, 1024, shape)
            w.write(f"s{i:07d}", x.astype(dtype), i % 1000)
    write_manifest(out, {"format": FORMAT, "tokenizer": {"name": "synthetic"},
                         "sample": {"kind": kind, "shape": shape, "dtype": np.dtype(dtype).name,
                                    "vocab_size": 1024 if kind == "codes" else None, "scaling_factor": 1.0},
                         "num_classes": 1000, "class_names": [str(i) for i in range(1000)],
                         "splits": {"train": {"num_samples": n, "shards": w.written, "class_counts": {},
                                              "shard_sizes": [per_shard] * (n // per_shard)}},
                         "config_hash": "bench", "skipped": []})


def loader_rate(shards: Path, overrides: list[str], workers: int, batches: int) -> float:
    recipe = bench_recipe(shards, [f"data.num_workers={workers}", *overrides])
    loader = make_loader(recipe)
    for _ in range(30):
        next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * 64 / (time.perf_counter() - t)
    del loader
    return rate


def webdataset_rate(shards: Path, batches: int) -> float:
    """webdataset's own tar pipeline with a safe decode: what this loader is measured against."""
    import webdataset as wds

    from elt_scale.data.shards import decode_npy
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    it = iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False)
              .map(lambda s: (decode_npy(s["input.npy"]), int(s["cls"]))).batched(64))
    for _ in range(30):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 64 / (time.perf_counter() - t)


def bench_recipe(shards: Path, overrides: list[str]):
    return load_recipe(None, [f"data.shards={shards}", "data.shuffle_buffer=1000", "train.micro_batch=64",
                              "model.num_classes=1000", *overrides])


def first_batch(shards: Path, overrides: list[str], position: int) -> tuple[float, int]:
    """Resume cost: make_loader(position=...) to its first batch -> (seconds, shard bytes read)."""
    t = time.perf_counter()
    loader = make_loader(bench_recipe(shards, overrides), position=position)
    next(loader)
    return time.perf_counter() - t, loader.bytes_read


def bytes_per_rank(shards: Path, overrides: list[str], world: int = 2) -> list[float]:
    """Fraction of the split's shard bytes each rank reads in one epoch."""
    recipe = bench_recipe(shards, overrides)
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    out = []
    for rank in range(world):
        loader = make_loader(recipe, rank, world)
        for _ in range(loader.dataset.order.batches_per_epoch):
            next(loader)
        out.append(loader.bytes_read / total)
    return out


def tokenize_rate(args: list[str], n: int) -> float:
    from data_prep import tokenize
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        assert tokenize.main([*args, "--out", out]) == 0
        return n / (time.perf_counter() - t)


def make_jpegs(root: Path, n: int = 512) -> None:
    from PIL import Image
    if root.exists():
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/elt-bench-data")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="also measure with this many worker processes")
    p.add_argument("--skip-tokenize", action="store_true")
    a = p.parse_args()
    root = Path(a.dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}")
    for name, (kind, shape, dtype, overrides) in CASES.items():
        shards = root / name.split()[0] / "x".join(map(str, shape))
        make_shards(shards, kind, shape, dtype)
        ref = []
        for workers in sorted({0, a.workers}):
            rates = []
            for _ in range(a.repeats):
                rates.append(loader_rate(shards, overrides, workers, a.batches))
                if workers == 0:
                    ref.append(webdataset_rate(shards, a.batches))
            per = "per worker" if workers == 0 else f"with {workers} workers"
            print(f"loader {name:28s} {per:16s} {statistics.median(rates):9.0f} samples/s "
                  f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
        print(f"webdataset's pipeline {name:19s} per worker      {statistics.median(ref):9.0f} samples/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in ref)})")
        epoch = make_loader(bench_recipe(shards, overrides)).dataset.order.batches_per_epoch
        at = {"0": 0, "10 epochs": 10 * epoch, "10.5 epochs": 10 * epoch + epoch // 2}
        first = {k: min(first_batch(shards, overrides, p) for _ in range(max(a.repeats, 5))) for k, p in at.items()}
        (t0, b0) = first["0"]
        print(f"first batch {name:28s} " + "; ".join(
            f"at {k}: {t:.3f} s (x{t / t0:.2f}), {b / 1e6:.1f} MB (x{b / b0:.2f})" for k, (t, b) in first.items()))
        if kind == "latents":
            print(f"bytes read per rank per epoch, 2 ranks: "
                  f"{', '.join(f'{f:.3f}' for f in bytes_per_rank(shards, overrides))} of the split")
    if not a.skip_tokenize:
        make_jpegs(root / "jpegs")
        for workers in (0, 2):
            r = tokenize_rate(["--source", "digits", "--workers", str(workers)], 1617)
            print(f"tokenize digits -> pixels, {workers} workers: {r:7.0f} files/s")
            r = tokenize_rate(["--source", "folder", "--input", str(root / "jpegs"), "--resolution", "32",
                               "--pixel-mode", "identity", "--workers", str(workers)], 512)
            print(f"tokenize 64x48 JPEG folder -> pixels 32px, {workers} workers: {r:7.0f} files/s")


if __name__ == "__main__":
    main()
