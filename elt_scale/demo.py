"""The built-in demonstration of the paper's central claim (Figure 1) on scikit-learn's digits, on a CPU.

    python -m elt_scale.demo [--out demo_out] [--steps 1500] [--num 500] [--quick]

1. tokenizes digits (train + val) into shards;
2. trains the masked ELT twice for the same budget, in parallel (one core each): with ILSD, and as a
   vanilla looped transformer (`ilsd.enabled=false`) that only ever sees L = L_max;
3. measures both at every L = 1 … L_max+1: the held-out masked-token loss on the val split, and the
   any-time sweep of `elt_scale.evaluate` (MaskGIT samples -> digits-classifier class accuracy and
   FD-digits, GFLOPs per sample), again one process per model;
4. writes demo_anytime.csv, demo_anytime.md and demo_anytime.png (plus the sweep's own anytime.csv/png).

The claim: the vanilla model is good only at its training loop count, the ILSD model at every L.
Whatever the numbers say, they are printed and written as measured.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_masked.yaml"
RUNS = {"ilsd": "ilsd.enabled=true", "vanilla": "ilsd.enabled=false"}


# ---------------------------------------------------------------------------------------------
# 1. data

def tokenize(shards: Path, args: tuple[str, ...] = ()) -> None:
    """Digits train and val splits into one shard set (skipped when already there); `args` go to
    tokenize.py (e.g. ('--pixel-mode', 'identity') for the diffusion recipe)."""
    from .data.shards import read_manifest
    have = set(read_manifest(shards)["splits"]) if (shards / "manifest.json").exists() else set()
    for split in ("train", "val"):
        if split not in have:
            subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits",
                            "--split", split, "--out", str(shards), *args], check=True, cwd=ROOT)


def read_split(shards: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split, in stored order: (codes (N, H, W) long or pixels float, labels (N,) long)."""
    from .data.webds import split_samples
    samples = list(split_samples(str(shards), split))
    x = torch.from_numpy(np.stack([a for _, a, _ in samples]))
    return (x.float() if x.is_floating_point() else x.long()), torch.tensor([label for _, _, label in samples])


# ---------------------------------------------------------------------------------------------
# 2. training

def train_both(out: Path, shards: Path, steps: int, extra: list[str], parallel: bool) -> dict[str, Path]:
    """Both runs through the real trainer (DeepSpeed), one process each; one progress bar over both."""
    runs, procs = {}, []
    env = dict(os.environ, OMP_NUM_THREADS="1") if parallel else dict(os.environ)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    for name, switch in RUNS.items():
        run_dir = out / "runs" / f"demo_{name}"
        runs[name] = run_dir
        cmd = [sys.executable, "-m", "elt_scale.train", str(RECIPE), f"data.shards={shards}",
               f"run.out_dir={out / 'runs'}", f"run.name=demo_{name}", f"train.steps={steps}",
               "train.resume=never", "train.save_every=0", f"train.log_every={max(1, min(10, steps // 10))}",
               switch, *extra]
        log = open(out / f"train_{name}.log", "w")
        shutil.rmtree(run_dir, ignore_errors=True)       # the demo's own output: each demo trains afresh
        procs.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        if not parallel:
            _follow(procs[-1:], {name: run_dir}, steps)
    if parallel:
        _follow(procs, runs, steps)
    return runs


def _follow(procs, runs: dict[str, Path], steps: int) -> None:
    bar = tqdm(total=steps * len(procs), desc="train " + " + ".join(runs), unit="step")
    while True:
        done = sum(_last_step(runs[name]) for name, _, _ in procs)
        bar.update(done - bar.n)
        codes = [p.poll() for _, p, _ in procs]
        if all(c is not None for c in codes):
            break
        time.sleep(1.0)
    bar.close()
    for name, p, log in procs:
        log.close()
        if p.returncode != 0:
            tail = Path(log.name).read_text()[-3000:]
            raise RuntimeError(f"training {name} failed (exit {p.returncode}); log {log.name}:\n{tail}")


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


# ---------------------------------------------------------------------------------------------
# 3. measurement

@torch.no_grad()
def val_loss_by_loops(model, codes: torch.Tensor, labels: torch.Tensor, loops: list[int],
                      repeats: int = 4, batch: int = 256) -> dict[int, float]:
    """Held-out masked-token cross-entropy at each loop count: the same masks (cosine schedule, seeded)
    for every L, true class labels; all exits come from one forward pass to max(loops)."""
    from .objectives.masking import masked_ce, random_mask
    g = torch.Generator().manual_seed(1234)
    totals = {L: 0.0 for L in loops}
    count = 0.0
    for _ in range(repeats):
        for i in range(0, len(codes), batch):
            x, y = codes[i:i + batch], labels[i:i + batch]
            mask = random_mask(x, g).view_as(x)
            inputs = torch.where(mask, torch.full_like(x, model.mask_id), x)
            outs = model(inputs, y, exits=loops)
            for L, logits in zip(loops, outs):
                totals[L] += masked_ce(logits, x.flatten(1), mask.flatten(1)).item() * mask.sum().item()
            count += mask.sum().item()
    return {L: totals[L] / count for L in loops}


def _sweep_one(run_dir: str, name: str, loops: str, num: int, sample_steps: int, shards: str, out: str) -> list[dict]:
    """One run's any-time sweep in its own process on one CPU thread (small matrices: a process per core
    beats two threads on one model)."""
    torch.set_num_threads(1)
    from .inference.anytime import anytime_sweep
    return anytime_sweep([run_dir], loops, num, out, names=[name], steps=sample_steps, seed=0, shards=shards,
                         progress=False)


def sweep_both(runs: dict[str, Path], l_max: int, num: int, sample_steps: int, shards: Path, out: Path,
               parallel: bool) -> list[dict]:
    """elt_scale.evaluate.anytime_sweep for both runs (in parallel), merged into one anytime.csv + plot."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from .inference.anytime import CSV_NAME, plot_anytime
    from .inference.anytime import write_csv as write_sweep_csv

    loops = f"1-{l_max + 1}"
    dirs = {name: out / "anytime" / name for name in runs}
    total = len(runs) * (l_max + 1)
    with ProcessPoolExecutor(2 if parallel else 1, mp_context=mp.get_context("spawn")) as pool, \
            tqdm(total=total, desc="any-time sweep (sample + classify)", unit="L") as bar:
        futures = {name: pool.submit(_sweep_one, str(run), name, loops, num, sample_steps, str(shards), str(dirs[name]))
                   for name, run in runs.items()}
        while not all(f.done() for f in futures.values()):
            bar.update(sum(_csv_rows(dirs[n] / CSV_NAME) for n in runs) - bar.n)
            time.sleep(1.0)
        rows = [r for name in runs for r in futures[name].result()]
        bar.update(total - bar.n)
    write_sweep_csv(out / "anytime" / CSV_NAME, rows)
    plot_anytime(rows, out / "anytime" / "anytime.png")
    return rows


def _csv_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def measure(runs: dict[str, Path], shards: Path, out: Path, num: int, sample_steps: int, parallel: bool) -> list[dict]:
    from .inference.load import load

    codes, labels = read_split(shards, "val")
    l_max = max(load(r).recipe.model.loops for r in runs.values())
    loops = list(range(1, l_max + 2))
    val = {}
    for name, run_dir in tqdm(runs.items(), desc="val loss at each L", unit="run"):
        model = load(run_dir).model
        val[name] = val_loss_by_loops(model, codes, labels, loops)
    sweep = sweep_both(runs, l_max, num, sample_steps, shards, out, parallel)
    rows = []
    for r in sweep:
        L = int(r["L"])
        rows.append({"model": r["run"], "L": L, "trained_L": l_max, "val_loss": round(val[r["run"]][L], 4),
                     "class_acc": r.get("class_acc"), "fd_digits": r.get("fd_digits"),
                     "gflops_per_sample": r["gflops_per_sample"], "sample_wall_s": r["wall_s"]})
    return rows


# ---------------------------------------------------------------------------------------------
# 4. outputs

COLUMNS = ["model", "L", "trained_L", "val_loss", "class_acc", "fd_digits", "gflops_per_sample", "sample_wall_s"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], meta: dict) -> str:
    """One line per L, ILSD and vanilla side by side."""
    by = {(r["model"], r["L"]): r for r in rows}
    Ls = sorted({r["L"] for r in rows})
    lines = [f"Digits any-time demo, {meta['date']}, {meta['machine']}: {meta['steps']} training steps per model, "
             f"{meta['num']} samples per L, {meta['sample_steps']} MaskGIT steps; trained with L_max = {meta['l_max']}; "
             f"{meta['wall_min']:.1f} min wall, {meta['cpu_min']:.1f} CPU-min.",
             "",
             "| L | GFLOPs/sample | val loss ILSD | val loss vanilla | class acc ILSD | class acc vanilla "
             "| FD-digits ILSD | FD-digits vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    for L in Ls:
        i, v = by.get(("ilsd", L), {}), by.get(("vanilla", L), {})
        mark = f"**{L}**" if L == meta["l_max"] else str(L)
        lines.append(f"| {mark} | {fmt(i.get('gflops_per_sample'), '.4f')} | {fmt(i.get('val_loss'), '.3f')} "
                     f"| {fmt(v.get('val_loss'), '.3f')} | {fmt(i.get('class_acc'), '.3f')} "
                     f"| {fmt(v.get('class_acc'), '.3f')} | {fmt(i.get('fd_digits'), '.2f')} "
                     f"| {fmt(v.get('fd_digits'), '.2f')} |")
    lines += ["", "val loss: held-out masked-token cross-entropy (lower is better); class acc: the digits "
              "classifier agrees with the conditioning class (higher is better); FD-digits: Fréchet distance "
              "in the classifier's feature space to real digits (lower is better). Bold: the training loop count."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, l_max: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_loss", "held-out masked-token loss ↓"), ("class_acc", "class accuracy ↑"),
              ("fd_digits", "FD-digits ↓")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for model, style in (("ilsd", "o-"), ("vanilla", "s--")):
            mine = [r for r in rows if r["model"] == model and r.get(key) is not None]
            ax.plot([r["L"] for r in mine], [r[key] for r in mine], style, label=model)
        ax.axvline(l_max, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("loops at inference (L); dotted: trained L_max")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Masked ELT on digits: ILSD vs vanilla looped training, same budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the trainers): a load-independent cost."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m elt_scale.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="where shards, runs and results go (default demo_out)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model (default 1500)")
    p.add_argument("--num", type=int, default=500, help="samples per model and loop count (default 500)")
    p.add_argument("--sample-steps", type=int, default=12, help="MaskGIT decoding steps (default 12)")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute: 30 steps, 40 samples")
    p.add_argument("--sequential", action="store_true", help="train and sweep one model after the other "
                                                              "(default: both at once, one CPU thread each)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for both runs, e.g. model.width=96")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.num, args.sample_steps = 30, 40, 4
    start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards" / "digits"
    tokenize(shards)
    runs = train_both(out, shards, args.steps, list(args.overrides), parallel=not args.sequential)
    rows = measure(runs, shards, out, args.num, args.sample_steps, parallel=not args.sequential)
    l_max = rows[0]["trained_L"]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": args.steps, "num": args.num,
            "sample_steps": args.sample_steps, "l_max": l_max, "wall_min": (time.time() - start) / 60,
            "cpu_min": cpu_seconds() / 60}
    write_csv(rows, out / "demo_anytime.csv")
    table = markdown_table(rows, meta)
    (out / "demo_anytime.md").write_text(table)
    plot(rows, out / "demo_anytime.png", l_max)
    print(table)
    print(f"demo: finished in {time.time() - start:.0f}s ({cpu_seconds():.0f} CPU-s); table {out / 'demo_anytime.md'}, "
          f"plot {out / 'demo_anytime.png'}, csv {out / 'demo_anytime.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
