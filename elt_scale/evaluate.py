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

import argparse
import csv
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .metrics.detectors import MissingWeightsError

CSV_NAME, PLOT_NAME = "anytime.csv", "anytime.png"
LOWER_IS_BETTER = {"fd_digits": True, "class_acc": False, "fid": True, "is": False, "fvd": True}


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """ADM-style .npz -> (arr_0 uint8 images/videos, arr_1 labels or None)."""
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, IsADirectoryError, zipfile.BadZipFile) as e:
        # numpy's own message for a file that is no .npy/.npz is about pickles and names no file
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}); expected an ADM-style .npz "
                         "(arr_0 uint8 N×H×W×3 images, arr_1 labels) such as elt-sample writes") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one .npy array; expected an ADM-style .npz with arr_0 (and arr_1)")
    with f:
        if "arr_0" not in f:
            raise ValueError(f"{path}: no arr_0 (expected an ADM-style .npz with uint8 N×H×W×3 images)")
        return f["arr_0"], (f["arr_1"] if "arr_1" in f else None)


def load_reference(path: str | Path, limit: int = 50_000) -> np.ndarray:
    """Reference images: an ADM reference .npz (arr_0), or a shard set decoded through its tokenizer."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_npz(path)[0][:limit]
    from .metrics.reference import shard_images
    return shard_images(path, limit)


def is_digits(images: np.ndarray, num_classes: int) -> bool:
    return images.ndim == 4 and images.shape[1:3] == (8, 8) and num_classes == 10


def measure(images: np.ndarray, labels: np.ndarray, metric: str, reference: np.ndarray | None = None,
            inception_weights=None, i3d_weights=None, inception_score: bool = False) -> dict[str, float]:
    """One sample set -> {metric name: value}."""
    if metric == "digits":
        from .metrics.digits import digits_metrics
        return digits_metrics(images, labels)
    if reference is None:
        raise ValueError(f"metric {metric} needs reference images: pass --reference REF.npz or a shards dir")
    if metric == "fvd":
        from .metrics import fvd, load_i3d
        return {"fvd": fvd(images, reference, load_i3d(i3d_weights))}
    if metric != "fid":
        raise ValueError(f"unknown metric {metric!r}; allowed: digits, fid, fvd, auto")
    from .metrics import frechet_distance, load_inception
    out = {"fid": frechet_distance(images, reference, load_inception(inception_weights, "features"))}
    if inception_score:
        from .metrics import inception_score as isc
        out["is"] = isc(images, load_inception(inception_weights, "logits"))[0]
    return out


def anytime_sweep(run_dirs: Sequence[str | Path], loops: str | Sequence[str | int], num: int,
                  out_dir: str | Path, *, names: Sequence[str] | None = None, metric: str = "auto",
                  cfg: float = 1.0, steps: int | None = None, sampler: str = "ddpm", seed: int = 0,
                  batch_size: int = 64, ema: bool = False, shards: str | Path | None = None,
                  reference: str | Path | None = None, inception_weights=None, i3d_weights=None,
                  progress: bool = True) -> list[dict]:
    """Sample each run at each loop spec, measure quality and cost; write anytime.csv + anytime.png.

    run_dirs: run directories or .safetensors exports; loops: '1-6' / '1,2,4,auto:0.02' or a list of
    specs; names: labels for the runs (default: directory names). Returns the CSV rows as dicts with
    keys run, L, loops_per_step, <metrics...>, gflops_per_sample, wall_s. The CSV is rewritten after
    every row, so an interrupted sweep keeps what it measured."""
    from .engine.export import load_model
    from .sample import load_decoder, sample_set
    from .sampling import parse_loop_list, parse_loops

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else [Path(r).stem if Path(r).suffix else Path(r).name for r in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    ref_images = load_reference(reference, max(num, 10_000)) if reference else None
    rows: list[dict] = []
    for run, name in zip(run_dirs, names):
        model, recipe = load_model(run, ema=ema)
        decoder = load_decoder(recipe, shards)
        schedules = (parse_loop_list(loops, recipe.model.loops) if isinstance(loops, str)
                     else [parse_loops(spec, recipe.model.loops) for spec in loops])
        for schedule in schedules:
            s = sample_set(model, recipe, schedule, num, decoder, cfg, steps, sampler, seed, batch_size,
                           progress=progress)
            chosen = metric
            if metric == "auto":
                chosen = "digits" if is_digits(s.images, recipe.model.num_classes) else (
                    "fvd" if s.images.ndim == 5 else "fid")
            values = measure(s.images, s.labels, chosen, ref_images, inception_weights, i3d_weights)
            rows.append({"run": name, "L": schedule.spec, "loops_per_step": round(s.loops_per_step, 4),
                         **{k: round(v, 6) for k, v in values.items()},
                         "gflops_per_sample": round(s.gflops_per_sample, 6), "wall_s": round(s.wall_s, 3)})
            write_csv(out_dir / CSV_NAME, rows)
            if progress:
                print(f"anytime: {name} L={schedule.spec} " +
                      " ".join(f"{k}={v:.4g}" for k, v in values.items()) +
                      f" {s.gflops_per_sample:.4g} GFLOPs/sample {s.wall_s:.1f}s", flush=True)
    plot_anytime(rows, out_dir / PLOT_NAME)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def metric_columns(rows: list[dict]) -> list[str]:
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k in LOWER_IS_BETTER]


def plot_anytime(rows: list[dict], path: Path) -> Path:
    """One row of panels per metric: metric vs loops per step, and metric vs GFLOPs per sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_columns(rows)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for i, m in enumerate(metrics):
        for run in dict.fromkeys(r["run"] for r in rows):
            mine = [r for r in rows if r["run"] == run and m in r]
            fixed = [r for r in mine if not str(r["L"]).startswith("auto")]
            auto = [r for r in mine if str(r["L"]).startswith("auto")]
            for j, x in enumerate(("loops_per_step", "gflops_per_sample")):
                ax = axes[i, j]
                line, = ax.plot([r[x] for r in fixed], [r[m] for r in fixed], "o-", label=run)
                if auto:
                    ax.scatter([r[x] for r in auto], [r[m] for r in auto], marker="*", s=120,
                               color=line.get_color(), label=f"{run} (auto)")
                ax.set_xlabel("loops per step (L)" if j == 0 else "GFLOPs per sample")
                ax.set_ylabel(f"{m} ({'lower' if LOWER_IS_BETTER[m] else 'higher'} is better)")
                ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.suptitle("ELT any-time inference: quality vs loops and compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# CLI

def _samples_cmd(args) -> dict:
    images, labels = load_npz(args.samples)
    if args.command == "digits":
        if labels is None:
            raise ValueError(f"{args.samples}: no arr_1 labels; class consistency needs them")
        return measure(images, labels, "digits")
    if not args.reference:
        raise ValueError(f"elt-eval {args.command} needs --reference REF.npz or a shards dir")
    ref = load_reference(args.reference)
    return measure(images, labels, args.command, ref, args.inception_weights, args.i3d_weights,
                   inception_score=getattr(args, "inception_score", False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elt-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    a.add_argument("--shards", help="shards dir with the tokenizer manifest (default: the recipe's)")
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
            rows = anytime_sweep([args.run, *args.compare], args.loops, args.num, args.out, metric=args.metric,
                                 cfg=args.cfg, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                 batch_size=args.batch_size, ema=args.ema, shards=args.shards,
                                 reference=args.reference, inception_weights=args.inception_weights,
                                 i3d_weights=args.i3d_weights)
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
