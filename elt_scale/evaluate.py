"""Evaluate samples and the any-time behaviour of trained ELTs.

    elt-eval digits samples_L4.npz                       class consistency + FD-digits (CPU, seconds)
    elt-eval fid samples_L4.npz --reference REF.npz|SHARDS_DIR --inception-weights inception-2015-12-05.pt
    elt-eval reference SHARDS_DIR --inception-weights inception-2015-12-05.pt --out REF.npz
    elt-eval fvd samples_L4.npz --reference REF.npz|SHARDS_DIR --i3d-weights i3d_torchscript.pt
    elt-eval anytime RUN_DIR --loops 1-6 --num 1000 [--compare RUN2 ...] --out DIR

`fid` is ADM's evaluation suite (openai/guided-diffusion evaluations/evaluator.py): Inception Score, FID,
sFID, precision and recall, one JSON line with the sample count, the reference and which statistics of it
were used, and the Inception file with its sha256. An ADM reference batch (VIRTUAL_imagenet256_labeled.npz)
is used through its precomputed mu/sigma and mu_s/sigma_s; `reference` writes a shard set's statistics
as such a file. Under torchrun the feature extraction is split across the processes.

`anytime` samples every run at every loop spec, measures the metric, GFLOPs per sample (every forward
pass and loop actually run, CFG counted twice) and wall time, and writes anytime.csv and anytime.png
(metric vs L and metric vs GFLOPs, one line per run). The metric is the digits classifier for 8×8
digit models and FID (needs --inception-weights and --reference) otherwise.

A reference that cannot be used (missing, NaN or asymmetric statistics, sizes other than the Inception's)
exits 2 with one line naming the file and the key, before anything is sampled or extracted."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import ArgumentParser
from .dist import init_from_env, set_threads
from .inference.anytime import CSV_NAME, PLOT_NAME, anytime_sweep
from .inference.outputs import load_npz, open_npz_images
from .inference.reference import check_reference, inception_dims
from .inference.scoring import PAPER_SAMPLES, Scorer
from .metrics.detectors import MissingWeightsError

# ---------------------------------------------------------------------------------------------
# CLI

def _samples_cmd(args) -> dict:
    if args.command != "digits":
        if not args.reference:
            raise ValueError(f"elt-eval {args.command} needs --reference REF.npz or a shards dir")
        check_reference(args.reference, videos=args.command == "fvd")
    images, labels = load_npz(args.samples)
    if args.command == "digits" and labels is None:
        raise ValueError(f"{args.samples}: no arr_1 labels; class consistency needs them")
    scorer = Scorer(args.reference, args.inception_weights, args.i3d_weights)
    return scorer(images, labels, args.command)


def _fid_cmd(args, rank: int, world: int) -> dict | None:
    """ADM's suite of one samples file; the record on rank 0, None on the others."""
    if not args.reference:
        raise ValueError("elt-eval fid needs --reference REF.npz (ADM reference batch) or a shards dir")
    check_reference(args.reference, videos=False)    # sizes against the Inception's: in the Scorer, before samples
    scorer = Scorer(args.reference, args.inception_weights, rank=rank, world=world, batch_size=args.batch_size,
                    pr_distances=args.pr_distances)
    return scorer.adm(open_npz_images(args.samples))


def _notes(record: dict) -> list[str]:
    """What a reader of the numbers should know: missing metrics, a sample count other than ADM's."""
    notes = [f"{k}: not computed (the reference has no {need})" for k, need in
             (("fid", "mu/sigma or arr_0"), ("sfid", "mu_s/sigma_s or arr_0"),
              ("precision", "arr_0 images or pool_features")) if record[k] is None]
    if record["num_samples"] != PAPER_SAMPLES:
        notes.append(f"{record['num_samples']} samples: ADM's protocol (and the paper's FIDs) use {PAPER_SAMPLES}; "
                     "FID, sFID and recall move with the count")
    return notes


def _check_anytime_reference(args) -> None:
    """The sweep first reads the reference when it scores the first run: check it before anything is sampled,
    against the Inception's feature sizes when FID may be the metric."""
    if not args.reference:
        return
    dims = (None, None)
    if args.inception_weights and args.metric in ("auto", "fid"):
        from .metrics import load_inception
        dims = inception_dims(load_inception(args.inception_weights))
    check_reference(args.reference, dims=dims)


def _reference_cmd(args, rank: int, world: int) -> Path | None:
    from .dist import local_device
    from .inference.features import extractor
    from .inference.reference import write_reference
    from .metrics import file_sha256, load_inception

    device = local_device()
    net = load_inception(args.inception_weights).to(device)
    write_reference(Path(args.shards), Path(args.out), extractor(net, device, rank, world),
                    file_sha256(args.inception_weights), args.limit, args.batch_size, rank, args.split)
    return Path(args.out) if rank == 0 else None


def main(argv=None) -> int:
    p = ArgumentParser(prog="elt-eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("digits", "digits classifier: class consistency + FD-digits"),
                           ("fid", "ADM's suite (IS, FID, sFID, precision, recall) with local Inception weights"),
                           ("fvd", "FVD on 16-frame clips with local I3D weights")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("samples", help="ADM-style .npz from elt-sample")
        s.add_argument("--reference", help="ADM reference batch .npz (mu/sigma, mu_s/sigma_s, arr_0), an .npz of "
                                           "images (arr_0), or a shards dir with manifest.json")
        s.add_argument("--inception-weights", help="local Inception file (required: nothing is downloaded)")
        s.add_argument("--i3d-weights", help="local I3D TorchScript file (required: nothing is downloaded)")
        if name == "fid":
            s.add_argument("--is", dest="inception_score", action="store_true",
                           help="ignored: the Inception Score is always reported")
            s.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (ADM: 64)")
            s.add_argument("--pr-distances", default="float16", choices=("float16", "float32"),
                           help="precision/recall distances: float16 with float32 fallback as ADM (default), "
                                "or float32 throughout")
    r = sub.add_parser("reference", help="a shard set's reference statistics as an ADM-layout .npz")
    r.add_argument("shards", help="shards dir with manifest.json")
    r.add_argument("--inception-weights", help="local Inception file (required: nothing is downloaded)")
    r.add_argument("--out", required=True, help="the .npz to write (mu, sigma, mu_s, sigma_s, pool_features)")
    r.add_argument("--limit", type=int, default=50_000, help="reference images (default 50,000)")
    r.add_argument("--split", default=None, help="shard split (default: val if there is one)")
    r.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (ADM: 64)")
    a = sub.add_parser("anytime", help="quality and compute at each loop count; CSV + plot")
    a.add_argument("run", help="run directory or .safetensors export")
    a.add_argument("--compare", nargs="*", default=[], help="more runs on the same plot")
    a.add_argument("--loops", default="1-6", help="loop specs: 1-6, 1,2,4, 6>2, auto:0.02 (default 1-6)")
    a.add_argument("--num", type=int, default=1000, help="samples per run and loop spec")
    a.add_argument("--metric", default="auto", choices=("auto", "digits", "fid", "fvd"),
                   help="auto: digits for 8×8 digit models, fvd for video, fid otherwise")
    a.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    a.add_argument("--steps", type=int, default=None, help="sampling steps (default: the paper's, see elt-sample)")
    a.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"), help="diffusion sampler")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="--ema: the EMA weights of run directories (an error if one has none); --no-ema: the raw "
                        "weights (default: the EMA when the checkpoint keeps one, as elt-sample)")
    a.add_argument("--shards", help="shards dir with the tokenizer manifest (default: the one each run recorded)")
    a.add_argument("--reference", help="reference images for fid/fvd: ADM .npz or shards dir")
    a.add_argument("--inception-weights", help="local Inception file for fid (nothing is downloaded)")
    a.add_argument("--i3d-weights", help="local I3D TorchScript file for fvd (nothing is downloaded)")
    a.add_argument("--out", default=None,
                   help="output directory for anytime.csv and anytime.png (default: RUN/anytime for a run "
                        "directory, ./anytime for an export)")
    args = p.parse_args(argv)
    set_threads()
    if args.command == "anytime" and args.out is None:
        args.out = str(Path(args.run) / "anytime" if Path(args.run).is_dir() else Path("anytime"))
    try:
        return _run(args)
    except (MissingWeightsError, FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        print(f"elt-eval: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "anytime":
        _check_anytime_reference(args)
        scorer = Scorer(args.reference, args.inception_weights, args.i3d_weights,
                        reference_limit=max(args.num, 10_000))
        rows = anytime_sweep([args.run, *args.compare], args.loops, args.num, args.out, metric=args.metric,
                             cfg=args.cfg, steps=args.steps, sampler=args.sampler, seed=args.seed,
                             batch_size=args.batch_size, ema=args.ema, shards=args.shards, scorer=scorer)
        print(f"elt-eval anytime: {len(rows)} rows -> {Path(args.out) / CSV_NAME}, {Path(args.out) / PLOT_NAME}")
    elif args.command in ("fid", "reference"):
        rank, world = init_from_env()
        if args.command == "reference":
            out = _reference_cmd(args, rank, world)
            if out:
                print(f"elt-eval reference: {args.shards} -> {out} (mu, sigma, mu_s, sigma_s, pool_features)")
            return 0
        record = _fid_cmd(args, rank, world)
        if record:
            for note in _notes(record):
                print(f"elt-eval fid: note: {note}", file=sys.stderr)
            print(json.dumps(record), flush=True)
    else:
        values = _samples_cmd(args)
        print(f"elt-eval {args.command}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
