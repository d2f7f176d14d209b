"""Tokenize a dataset into WebDataset shards + manifest.json, on one machine or as a Slurm array.

    python data_prep/tokenize.py --source digits --tokenizer pixels --out shards/digits
    python data_prep/tokenize.py --source imagenet --input /data/imagenet/train --resolution 256 \\
        --tokenizer sd-vae --tokenizer-path stabilityai/sd-vae-ft-ema --out /data/shards/in256-sdvae
    python data_prep/tokenize.py --source ucf101 --input /data/UCF-101 --split train --split-id 1 \\
        --resolution 128 --frames 16 --tokenizer vq --tokenizer-path /models/vq --out /data/shards/ucf

Items are written in a seeded random permutation of the sorted input list (--seed; --keep-source-order
writes them class by class, as older versions did), so every shard holds most classes and the loader's
batches mix classes like an i.i.d. draw (docs/data.md). Work splits over ranks: rank R of --world-size W
(defaults: Slurm array task id minus the array's first id, and the task count) takes its slice of that
list (the same permutation on every rank), writes its own shard range
and manifest.{split}.rankRRRRR.json; `--merge --out DIR` then joins them into manifest.json (with
W = 1 that happens at once). A rerun skips shards already complete. Inputs that cannot be read are
listed with the reason in the manifest's `skipped`; the run still exits 0.
"""
from __future__ import annotations

import os
import sys

# Run as a script, this file's folder heads sys.path and its name would shadow the stdlib `tokenize`
# module (imported by inspect/linecache); put the project root there instead, before other imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(_ROOT, "data_prep")]

import hashlib  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_prep.shard_plan import (finished, fold_into_manifest, merge_ranks, plan_shards, rank_from_env,  # noqa: E402
                                  rank_manifest_path, split_entry)
from data_prep.sources import SOURCES, add_flips, assign_keys  # noqa: E402
from elt_scale.cli import ArgumentParser  # noqa: E402
from elt_scale.data.shards import FORMAT, MANIFEST, ShardFile, read_manifest, write_json, write_order  # noqa: E402
from elt_scale.seeding import derive_seed  # noqa: E402
from elt_scale.tokenizers import REGISTRY, build_tokenizer  # noqa: E402

# settings that decide what a sample holds (config_hash, shared by all splits of one shard directory)
SAMPLE_SETTINGS = ("source", "tokenizer", "tokenizer_path", "tokenizer_subfolder", "vae_class", "pixel_mode",
                   "levels", "latent_sample", "precision", "resolution", "frames", "frame_stride", "flip",
                   "samples_per_shard", "seed", "class_index", "vocab_size", "compression")
# ... plus what decides which items a split holds and how they are cut into shards (split_hash)
SPLIT_SETTINGS = ("split", "input", "labels", "split_id", "annotations", "world_size")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--source", choices=sorted(SOURCES), help="dataset reader (see data_prep/sources.py)")
    p.add_argument("--input", default=None, help="dataset root (not needed for digits)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--split", default=None,
                   help="train (default) | val | test (ucf101: train | test); with --merge: only this split")
    g = p.add_argument_group("sources")
    g.add_argument("--resolution", type=int, default=256, help="side of the centre-cropped square (pixels)")
    g.add_argument("--flip", action="store_true", help="also write a horizontally flipped copy of each input")
    g.add_argument("--labels", default=None, help="imagenet flat val layout: lines `FILE SYNSET` or `FILE LABEL`")
    g.add_argument("--class-index", default=None,
                   help="class order file, one class per line (default: sorted folder names; for ImageNet "
                        "the sorted synset ids are the standard 1000-class order)")
    g.add_argument("--split-id", type=int, default=1, help="ucf101: which official split, 1..3")
    g.add_argument("--annotations", default=None, help="ucf101: folder with classInd.txt and the split lists")
    g.add_argument("--frames", type=int, default=16, help="video: frames per clip")
    g.add_argument("--frame-stride", type=int, default=1, help="video: take every S-th frame")
    g.add_argument("--mosaic-grid", default="2x2",
                   help="digit-mosaic: ROWSxCOLS digits per image, each cell 8x8 pixels (default 2x2: 16x16 pixels)")
    g.add_argument("--mosaic-rule", default="sum", choices=["sum", "first"],
                   help="digit-mosaic: the class of a mosaic; sum = its digits' sum mod 10 (default: every cell "
                        "matters), first = its top-left digit (a local control)")
    g.add_argument("--mosaic-count", type=int, default=None,
                   help="digit-mosaic: mosaics in this split (default train 4000, val 500), drawn from --seed; "
                        "train mosaics use train digits only, val mosaics val digits only")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default="pixels", choices=sorted(REGISTRY),
                   help="pixels | sd-vae (AutoencoderKL) | vq (VQModel) | maskgit-vq (MaskGIT's VQGAN: its "
                        "PyTorch state dict, e.g. fun-research/TiTok's maskgit-vqgan-imagenet-f16-256.bin) | "
                        "video-vae (3D VAE, e.g. Wan) | "
                        "jit (TorchScript discrete video tokenizer: encoder.jit + decoder.jit, e.g. Cosmos "
                        "DV4x8x8); image tokenizers run per frame on video")
    g.add_argument("--tokenizer-path", default=None,
                   help="local directory or hub id (recorded in the manifest); maskgit-vq: also a weights file")
    g.add_argument("--tokenizer-subfolder", default=None, help="subfolder inside --tokenizer-path, e.g. vae")
    g.add_argument("--vae-class", default="AutoencoderKLWan", help="video-vae: the diffusers class to load")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="jit: codebook size (default: config.json beside encoder.jit; Cosmos DV: 64000)")
    g.add_argument("--compression", default=None,
                   help="jit: TxSxS time x space compression (default: config.json; Cosmos DV4x8x8: 4x8x8)")
    g.add_argument("--latent-sample", action="store_true",
                   help="sd-vae/video-vae: store a posterior sample (seeded per sample key) instead of the mean")
    g.add_argument("--pixel-mode", default="quantized", choices=["quantized", "identity"],
                   help="pixels tokenizer: integer grey levels (masked models) or [-1, 1] floats (diffusion)")
    g.add_argument("--levels", type=int, default=17, help="grey levels of the pixels tokenizer")
    g.add_argument("--device", default="auto", help="cuda | cpu | auto")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model compute precision; auto = bf16 on GPUs that support it, else fp32")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the order items are written in (a permutation of all items) and --latent-sample noise")
    g = p.add_argument_group("work")
    g.add_argument("--samples-per-shard", type=int, default=256, help="input items per shard (1000+ for ImageNet)")
    g.add_argument("--keep-source-order", action="store_true",
                   help="write items in sorted source order (ImageNet folder by folder, UCF-101 class by class) "
                        "instead of a seeded random order; each shard then holds one or two classes and batches "
                        "mix far fewer classes than an i.i.d. draw")
    g.add_argument("--batch-size", type=int, default=64, help="tokenizer batch")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding inputs (0 = in the main process)")
    rank, world = rank_from_env()
    g.add_argument("--rank", type=int, default=rank, help="this rank (default from SLURM_ARRAY_TASK_ID)")
    g.add_argument("--world-size", type=int, default=world, help="ranks in all (default SLURM_ARRAY_TASK_COUNT)")
    g.add_argument("--merge", action="store_true", help="only join finished ranks' manifests into manifest.json")
    args = p.parse_args(argv)
    if not args.merge and not args.source:
        p.error("--source is required (unless --merge)")
    for flag, value, least in (("--samples-per-shard", args.samples_per_shard, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0)):
        if value < least:
            p.error(f"{flag} {value}: must be >= {least}")
    if not args.merge:
        args.split = args.split or "train"
    return args


def source_settings(args) -> dict:
    """The digit-mosaic options, hashed only for that source: the hashes of every other source (and so the
    shard sets already on disk) stay what they were before these options existed."""
    if args.source != "digit-mosaic":
        return {}
    return {"mosaic_grid": args.mosaic_grid, "mosaic_rule": args.mosaic_rule, "mosaic_count": args.mosaic_count}


def settings_hash(args, names, extra: dict | None = None) -> str:
    keep = {k: getattr(args, k) for k in names} | (extra or {})
    return hashlib.sha256(repr(sorted(keep.items())).encode()).hexdigest()[:16]


def order_setting(args) -> dict:
    """The write order, for the split hash. Source order adds nothing, so it hashes as runs of versions before
    the shuffle did and such a run can be completed with --keep-source-order; the seed is hashed already."""
    return {} if args.keep_source_order else {"item_order": "shuffled"}


def item_order_entry(args, items) -> dict:
    """What the manifest records about the write order (per split). `class_runs` (runs of equal labels in the
    written list: about the class count for a class-sorted source, about the item count for digits) tells
    elt_scale/data/mix.py whether a part of a shard holds a few whole classes or a sample of all of them."""
    runs = 1 + sum(a.label != b.label for a, b in zip(items, items[1:]))
    return {"shuffled": False, "class_runs": runs} if args.keep_source_order else \
        {"shuffled": True, "seed": args.seed}


def key_seed(key: str, seed: int) -> int:
    return derive_seed(seed, "key", key)


class Decoded(Dataset):
    """Decodes items in DataLoader workers; a failure comes back as a reason, not an exception."""

    def __init__(self, items, decode, expect_shape):
        self.items, self.decode, self.expect_shape = items, decode, tuple(expect_shape)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            x = self.decode(item.ref, item.flip)
            if tuple(x.shape) != self.expect_shape:
                raise ValueError(f"decoded to shape {tuple(x.shape)}, expected {self.expect_shape}")
            return i, x, None
        except Exception as e:  # noqa: BLE001 - any unreadable input is listed, never fatal
            return i, None, f"{type(e).__name__}: {e}"


def build(args, source):
    per_frame = len(source.grid) == 3 and args.tokenizer not in ("pixels", "video-vae", "jit")
    kwargs = dict(per_frame=per_frame, device=args.device, precision=args.precision,
                  latent_sample=args.latent_sample, subfolder=args.tokenizer_subfolder)
    if args.tokenizer == "pixels":
        kwargs = dict(mode=args.pixel_mode, levels=args.levels)
    elif args.tokenizer == "video-vae":
        kwargs.update(vae_class=args.vae_class)
    elif args.tokenizer == "jit":
        kwargs.update(vocab_size=args.vocab_size, compression=args.compression)
    if args.tokenizer != "pixels" and args.tokenizer_path:
        kwargs["path"] = args.tokenizer_path
    tok = build_tokenizer(args.tokenizer, **kwargs)
    return tok, tok.output_shape(source.channels, source.grid)


def write_shards(args, out: Path, source, tok, pending, expects: dict) -> tuple[int, int]:
    """Decode + encode the items of `pending` shards and write them; returns (samples, skipped)."""
    flat = [(s, i) for s in pending for i in range(s.start, s.end)]
    data = Decoded([source.items[i] for _, i in flat], source.decode, [source.channels] + source.grid)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=list)
    written = skipped = 0
    shard, counts, bad = None, Counter(), []
    bar = tqdm(total=len(flat), unit="file", desc=f"tokenize {args.source}/{args.split} rank {args.rank}")
    try:
        for batch in loader:
            good = [(i, x) for i, x, err in batch if err is None]
            codes = {}
            if good:
                seeds = [key_seed(source.items[flat[i][1]].key, args.seed) for i, _ in good]
                z = tok.encode(torch.stack([x for _, x in good]), seeds).cpu().numpy().astype(tok.dtype)
                codes = {i: zi for (i, _), zi in zip(good, z)}
            for i, _, err in batch:
                plan, idx = flat[i]
                item = source.items[idx]
                if shard is None:
                    shard, counts, bad = ShardFile(out, args.split, plan.index), Counter(), []
                if err is None:
                    shard.write(item.key, codes[i], item.label, item.source)
                    counts[item.label] += 1
                else:
                    bad.append({"source": item.source, "reason": err, "split": args.split})
                if idx == plan.end - 1:            # last item of this shard: make it whole
                    shard.commit({**expects[plan.index], "num_samples": shard.count, "skipped": bad,
                                  "class_counts": {str(k): v for k, v in sorted(counts.items())},
                                  "first": source.items[plan.start].key, "last": item.key})
                    written, skipped, shard = written + shard.count, skipped + len(bad), None
            bar.update(len(batch))
    finally:
        bar.close()
        if shard is not None:                      # interrupted: no half shard ever looks complete
            shard.abort()
    return written, skipped


def check_out_dir(out: Path, config_hash: str) -> None:
    """Fail before any work when --out already holds shards made with other settings."""
    if (out / MANIFEST).exists():
        old = read_manifest(out).get("config_hash")
        if old != config_hash:
            raise ValueError(f"{out / MANIFEST} was written with other settings (config_hash {old} != "
                             f"{config_hash}); use another --out or delete it")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    # a bad argument (missing --input, unknown split, rank outside the world, --frames a tokenizer cannot
    # round-trip ...) is the user's error: one line, exit 2. Failures while writing keep their traceback.
    try:
        if args.merge:
            splits = merge_ranks(out, args.split)
            print(f"merged rank manifests of split(s) {', '.join(splits)} into {out / 'manifest.json'}")
            return 0
        start = time.time()
        source = SOURCES[args.source](**vars(args))
        items = add_flips(source.items) if args.flip else source.items
        assign_keys(items)                         # from the sorted list: keys do not depend on the order
        if not args.keep_source_order:             # after add_flips: a flip copy lands apart from its original
            items = [items[i] for i in write_order(len(items), args.seed)]
        source.items = items
        if not items:
            raise ValueError(f"no inputs for {args.source}/{args.split} under {args.input}"
                             f" ({len(source.skipped)} refused: {source.skipped[:3]})")
        mosaic = source_settings(args)
        # the count may differ between splits (4000 train, 500 val): a split setting, not a sample one
        sample_extra = {k: v for k, v in mosaic.items() if k != "mosaic_count"}
        check_out_dir(out, settings_hash(args, SAMPLE_SETTINGS, sample_extra))
        tok, shape = build(args, source)
        shards = plan_shards(len(items), args.samples_per_shard, args.rank, args.world_size)
        split_hash = settings_hash(args, SAMPLE_SETTINGS + SPLIT_SETTINGS, order_setting(args) | mosaic)

        def expect(s):
            return {"split_hash": split_hash, "items": s.end - s.start, "first_key": items[s.start].key}
        done = {s.index: finished(out, args.split, s, expect(s)) for s in shards}
        pending = [s for s in shards if done[s.index] is None]
        expects = {s.index: expect(s) for s in pending}
    except (FileNotFoundError, ValueError) as e:
        print(f"elt-tokenize: error: {e}", file=sys.stderr)
        return 2
    written, _ = write_shards(args, out, source, tok, pending, expects)
    sidecars = [(s.name(args.split), finished(out, args.split, s, expect(s))) for s in shards]
    listing_skipped = [{**s, "split": args.split} for s in source.skipped] if args.rank == 0 else []
    manifest = {
        "format": FORMAT,
        "source": {"name": args.source, **source.info},
        "tokenizer": tok.manifest_entry(),
        "sample": {"kind": tok.kind, "shape": shape, "dtype": tok.dtype.__name__,
                   "vocab_size": tok.vocab_size, "scaling_factor": tok.scaling_factor},
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "splits": {args.split: split_entry(sidecars, len(source.class_names), item_order_entry(args, items))},
        "config_hash": settings_hash(args, SAMPLE_SETTINGS, sample_extra),
        "split_hash": split_hash, "rank": args.rank, "world_size": args.world_size,
        "skipped": listing_skipped + [s for _, side in sidecars for s in side["skipped"]],
    }
    if args.world_size == 1:
        fold_into_manifest(out, args.split, [manifest])
        where = out / "manifest.json"
    else:
        where = rank_manifest_path(out, args.split, args.rank)
        write_json(where, manifest)
    entry = manifest["splits"][args.split]
    print(f"{args.source}/{args.split} rank {args.rank}/{args.world_size}: {entry['num_samples']} samples in "
          f"{len(entry['shards'])} shards ({len(shards) - len(pending)} already done, {written} new samples), "
          f"{len(manifest['skipped'])} skipped -> {where} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
