"""Tokenize a dataset into WebDataset shards + manifest.json.

    python data_prep/tokenize.py --source digits --tokenizer pixels --out shards/digits
"""
from __future__ import annotations

import os
import sys

# Run as a script, this file's folder heads sys.path and its name would shadow the stdlib `tokenize`
# module (imported by inspect/linecache); put the project root there instead, before other imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(_ROOT, "data_prep")]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_prep.sources import SOURCES  # noqa: E402
from elt_scale.data.shards import FORMAT, ShardWriter, write_manifest  # noqa: E402
from elt_scale.tokenizers import build_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset reader")
    p.add_argument("--input", default=None, help="dataset root (not needed for digits)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--split", default="train", help="train | val | test")
    p.add_argument("--tokenizer", default="pixels", help="pixels")
    p.add_argument("--pixel-mode", default="quantized", choices=["quantized", "identity"],
                   help="pixels tokenizer: integer grey levels (masked models) or [-1, 1] floats (diffusion)")
    p.add_argument("--levels", type=int, default=17, help="grey levels of the pixels tokenizer")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def config_hash(args) -> str:
    keep = {k: v for k, v in vars(args).items() if k not in ("out", "batch_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    source = SOURCES[args.source](split=args.split, input=args.input)
    tok = build_tokenizer(args.tokenizer, mode=args.pixel_mode, levels=args.levels)
    shape = tok.output_shape(source.channels, source.grid)
    counts, skipped = Counter(), []
    start = time.time()
    with ShardWriter(args.out, args.split, args.samples_per_shard) as writer, \
            tqdm(total=len(source.items), unit="file", desc=f"tokenize {args.source}/{args.split}") as bar:
        for i in range(0, len(source.items), args.batch_size):
            batch, images = [], []
            for item in source.items[i:i + args.batch_size]:
                try:
                    images.append(item.load())
                    batch.append(item)
                except Exception as e:  # an unreadable input is listed, never fatal
                    skipped.append({"source": item.source, "reason": f"{type(e).__name__}: {e}"})
            if batch:
                codes = tok.encode(torch.stack(images)).cpu().numpy()
                for item, z in zip(batch, codes):
                    writer.write(item.key, z, item.label, item.source)
                    counts[item.label] += 1
            bar.update(len(source.items[i:i + args.batch_size]))
    manifest = {
        "format": FORMAT,
        "tokenizer": tok.manifest_entry(),
        "sample": {"kind": tok.kind, "shape": shape, "dtype": str(tok.dtype.__name__),
                   "vocab_size": tok.vocab_size, "scaling_factor": tok.scaling_factor},
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "splits": {args.split: {"num_samples": sum(counts.values()), "shards": writer.written,
                                "class_counts": {str(k): v for k, v in sorted(counts.items())}}},
        "config_hash": config_hash(args),
        "skipped": skipped,
    }
    write_manifest(args.out, manifest)
    print(f"wrote {sum(counts.values())} samples in {len(writer.written)} shards to {args.out} "
          f"({len(skipped)} skipped) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
