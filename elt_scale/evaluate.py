"""Evaluate samples and the any-time behaviour of trained ELTs.

    elt-eval digits samples_L4.npz                       class consistency + FD-digits (CPU, seconds)
    elt-eval fid samples_L4.npz --reference REF.npz|SHARDS_DIR --inception-weights inception.pt [--is]
    elt-eval fvd samples_L4.npz --reference REF.npz|SHARDS_DIR --i3d-weights i3d_torchscript.pt
    elt-eval anytime RUN_DIR --loops 1-6 --num 1000 [--compare RUN2 ...] --out DIR

`anytime` samples every run at every loop spec, measures the metric, GFLOPs per sample (every forward
pass and loop actually run, CFG counted twice) and wall time, and writes anytime.csv and anytime.png
(metric vs L and metric vs GFLOPs, one line per run). The metric is the digits classifier for 8×8
digit models and FID (needs --inception-weights and --reference) otherwise."""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import ArgumentParser
from .inference.anytime import CSV_NAME, PLOT_NAME, anytime_sweep
from .inference.outputs import load_npz
from .inference.scoring import Scorer
from .metrics.detectors import MissingWeightsError

# ---------------------------------------------------------------------------------------------
# CLI

def _samples_cmd(args) -> dict:
    images, labels = load_npz(args.samples)
    if args.command == "digits" and labels is None:
        raise ValueError(f"{args.samples}: no arr_1 labels; class consistency needs them")
    if args.command != "digits" and not args.reference:
        raise ValueError(f"elt-eval {args.command} needs --reference REF.npz or a shards dir")
    scorer = Scorer(args.reference, args.inception_weights, args.i3d_weights, getattr(args, "inception_score", False))
    return scorer(images, labels, args.command)


def main(argv=None) -> int:
    p = ArgumentParser(prog="elt-eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("digits", "digits classifier: class consistency + FD-digits"),
                           ("fid", "FID (and --is) with local Inception weights"),
                           ("fvd", "FVD on 16-frame clips with local I3D weights")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("samples", help="ADM-style .npz from elt-sample")
        s.add_argument("--reference", help="ADM reference .npz (arr_0) or a shards dir with manifest.json")
        s.add_argument("--inception-weights", help="local Inception file (required: nothing is downloaded)")
        s.add_argument("--i3d-weights", help="local I3D TorchScript file (required: nothing is downloaded)")
        if name == "fid":
            s.add_argument("--is", dest="inception_score", action="store_true", help="also the Inception Score")
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
    a.add_argument("--ema", action="store_true", help="use the EMA weights of run directories")
    a.add_argument("--shards", help="shards dir with the tokenizer manifest (default: the one each run recorded)")
    a.add_argument("--reference", help="reference images for fid/fvd: ADM .npz or shards dir")
    a.add_argument("--inception-weights", help="local Inception file for fid (nothing is downloaded)")
    a.add_argument("--i3d-weights", help="local I3D TorchScript file for fvd (nothing is downloaded)")
    a.add_argument("--out", default=None,
                   help="output directory for anytime.csv and anytime.png (default: RUN/anytime for a run "
                        "directory, ./anytime for an export)")
    args = p.parse_args(argv)
    if args.command == "anytime" and args.out is None:
        args.out = str(Path(args.run) / "anytime" if Path(args.run).is_dir() else Path("anytime"))
    try:
        if args.command == "anytime":
            scorer = Scorer(args.reference, args.inception_weights, args.i3d_weights,
                            reference_limit=max(args.num, 10_000))
            rows = anytime_sweep([args.run, *args.compare], args.loops, args.num, args.out, metric=args.metric,
                                 cfg=args.cfg, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                 batch_size=args.batch_size, ema=args.ema, shards=args.shards, scorer=scorer)
            print(f"elt-eval anytime: {len(rows)} rows -> {Path(args.out) / CSV_NAME}, {Path(args.out) / PLOT_NAME}")
        else:
            values = _samples_cmd(args)
            print(f"elt-eval {args.command}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    except (MissingWeightsError, FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        print(f"elt-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
