"""A study's result files: the per-seed CSV (one row per family × model × seed × L), the summary (mean and
min–max over seeds per model and L), the markdown report with the claims' verdicts, the plot with error bars,
and the JSON that carries all of it with its provenance (commit, date, machine, wall time)."""
from __future__ import annotations

import csv
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

from .claims import report, separation

COLUMNS = ["family", "model", "seed", "unique_layers", "trained_L", "L", "params", "gflops_per_sample", "val_loss",
           "class_acc", "fd_digits", "train_loss_first", "train_loss_last", "sample_wall_s"]
METRICS = {"val_loss": ("val loss", ".3f"), "class_acc": ("class acc", ".3f"), "fd_digits": ("FD-digits", ".2f")}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (family, model, L): seeds, and mean / min / max of every metric, in the rows' order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["model"], int(r["L"])), []).append(r)
    out = []
    for (family, model, L), rs in groups.items():
        s = {"family": family, "model": model, "L": L, "trained_L": rs[0]["trained_L"],
             "unique_layers": rs[0]["unique_layers"], "params": rs[0]["params"],
             "gflops_per_sample": rs[0]["gflops_per_sample"], "seeds": sorted(int(r["seed"]) for r in rs)}
        for m in METRICS:
            v = [float(r[m]) for r in rs if r.get(m) is not None]
            s[m] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} if v else None
        out.append(s)
    return out


def cell(stat: dict | None, spec: str) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:{spec}} [{stat['min']:{spec}}–{stat['max']:{spec}}]"


def table(summary: list[dict], family: str, only_ends: bool = False) -> list[str]:
    """A markdown table: one line per model and L, mean [min–max] over seeds; bold L = training loop count.
    only_ends: just L = 1 and L_max (the README's short form)."""
    lines = ["| model | layers × loops | params | L | GFLOPs/sample | "
             + " | ".join(name for name, _ in METRICS.values()) + " |",
             "|---|---|---|---|---|" + "---|" * len(METRICS)]
    for s in (s for s in summary if s["family"] == family and (not only_ends or s["L"] in (1, s["trained_L"]))):
        L = f"**{s['L']}**" if s["L"] == s["trained_L"] else str(s["L"])
        lines.append(f"| {s['model']} | {s['unique_layers']}×{s['trained_L']} | {s['params'] / 1e3:.0f}k | {L} "
                     f"| {s['gflops_per_sample']:.3f} | "
                     + " | ".join(cell(s[m], spec) for m, (_, spec) in METRICS.items()) + " |")
    return lines


def provenance(meta: dict) -> str:
    return (f"{meta['date']}, commit {meta['commit']}, {meta['machine']}: {len(meta['seeds'])} seeds "
            f"({', '.join(map(str, meta['seeds']))}), {meta['steps']} training steps × batch {meta['batch']} per model, "
            f"{meta['num']} samples per L ({meta['sampling']}); {meta['wall_min']:.1f} min wall, "
            f"{meta['cpu_min']:.1f} CPU-min, load average {meta['load']:.1f} at the end.")


def markdown(title: str, summary: list[dict], verdicts: list[dict], separations: list[dict], meta: dict) -> str:
    lines = [f"# {title}", "", provenance(meta), ""]
    for family in dict.fromkeys(s["family"] for s in summary):
        lines += [f"**{family}**", "", *table(summary, family), ""]
    lines += ["mean [min–max] over the seeds. val loss: held-out loss on the val split (masked-token cross-entropy, "
              "or the diffusion objective's weighted x0-MSE; lower is better); class acc: the digits classifier "
              "agrees with the conditioning class (higher is better); FD-digits: Fréchet distance in the "
              "classifier's feature space to the real digits (lower is better).", "", "## Claims", "",
              report(verdicts), "", "## Which metrics separate the models beyond seed noise", "",
              "| comparison | metric | A: min–max | B: min–max | separated |", "|---|---|---|---|---|"]
    for s in separations:
        rng = lambda v: f"{v[0]:.4g}–{v[1]:.4g}" if v else "-"   # noqa: E731
        lines.append(f"| {s['label']} | {s['metric']} | {rng(s['a'])} | {rng(s['b'])} | {'yes' if s['separated'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Rows: families; columns: the metrics against GFLOPs per sample; a line per model over L, error bars
    min–max over seeds, plain models as single points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(s["family"] for s in summary))
    fig, axes = plt.subplots(len(families), len(METRICS), figsize=(4.4 * len(METRICS), 3.8 * len(families)),
                             squeeze=False)
    for i, family in enumerate(families):
        for j, (m, (name, _)) in enumerate(METRICS.items()):
            ax = axes[i, j]
            for model in dict.fromkeys(s["model"] for s in summary if s["family"] == family):
                mine = [s for s in summary if s["family"] == family and s["model"] == model and s[m]]
                x = [s["gflops_per_sample"] for s in mine]
                y = [s[m]["mean"] for s in mine]
                err = [[s[m]["mean"] - s[m]["min"] for s in mine], [s[m]["max"] - s[m]["mean"] for s in mine]]
                ax.errorbar(x, y, yerr=err, fmt="o-" if len(mine) > 1 else "D", capsize=3, ms=5,
                            label=f"{model} {mine[0]['unique_layers']}×{mine[0]['trained_L']}" if mine else model)
            ax.set_xlabel("GFLOPs per sample (L = 1, 2, … left to right)")
            ax.set_title(f"{family}: {name} ({'lower' if m != 'class_acc' else 'higher'} is better)")
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def write_all(out: Path, name: str, title: str, rows: list[dict], verdicts: list[dict], separations: list[dict],
              meta: dict) -> str:
    """NAME.csv, NAME.md, NAME.png and NAME.json (meta, summary, verdicts, separations) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    write_csv(rows, out / f"{name}.csv")
    text = markdown(title, summary, verdicts, separations, meta)
    (out / f"{name}.md").write_text(text)
    plot(summary, out / f"{name}.png", title)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "claims": verdicts,
                                                  "separations": separations}, indent=1))
    return text



def publish(out: Path, name: str, title: str, rows: list[dict], verdicts: list[dict], separations: list[tuple],
            meta: dict, start: float) -> None:
    """A study's end: which (label, metric, a, b) comparisons separate beyond the seeds, NAME.* written to
    `out`, the report printed with the verdicts' tally."""
    seps = [{"label": label, **separation(rows, m, a, b)} for label, m, a, b in separations]
    print(write_all(out, name, title, rows, verdicts, seps, meta))
    print(f"{name}: finished in {time.time() - start:.0f}s; {sum(v['holds'] for v in verdicts)}/{len(verdicts)} "
          f"claims hold; results in {out / f'{name}.md'}\n" + report(verdicts))

# --- provenance -------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the trainers): a load-independent cost."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def commit() -> str:
    """HEAD, marked dirty when elt_scale/, data_prep/, recipes/ or studies/ differ from it (numbers from
    uncommitted code)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "elt_scale", "data_prep", "recipes", "studies"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def meta(start: float, seeds: list[int], steps: int, batch: int, num: int, sampling: str, quick: bool) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(), "seeds": seeds,
            "steps": steps, "batch": batch, "num": num, "sampling": sampling, "quick": quick,
            "wall_min": (time.time() - start) / 60, "cpu_min": cpu_seconds() / 60, "load": os.getloadavg()[0]}
