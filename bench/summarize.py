"""Markdown tables (for bench/RESULTS.md) and the issue's targets, from a bench/gpu.sh results folder.

    python bench/summarize.py OUT_DIR > summary.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = "ELT-L masked trunk >= 440 TFLOP/s; diffusion 7Nx4L >= 600 img/s; ILSD <= 1.03x vanilla; loop ckpt <= 1.15x none"


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def train_table(title: str, result: dict) -> list[str]:
    meta = result["meta"]
    lines = [f"### {title}: {meta.get('preset')} on {meta['device']} ({meta['date']}, commit {meta['commit']})",
             f"matmul ceiling measured in the same run: {meta['matmul_peak']['tflops']:.0f} TFLOP/s "
             f"({meta['matmul_peak']['dtype']} {meta['matmul_peak']['size']}³); per case {meta['warmup']} warm-up steps, "
             f"then {meta.get('windows', 1)} window(s) of {meta['steps']} timed steps (median window)", "",
             "| case | shape | ms/step | img/s | trunk TFLOP/s | MFU | peak GB | first steps s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        if "step_time_s" not in r:
            lines.append(f"| {r['name']} | not measured: {r.get('error') or r.get('skipped')} ||||||")
            continue
        lines.append(f"| {r['name']} | {r['shape']} | {r['step_time_s'] * 1e3:.1f} | {r['img_per_s']:.0f} | "
                     f"{r['trunk_tflops']:.0f} | {r['mfu']:.1%} | {fmt(r['peak_mem_gb'])} | {r['warmup_s']:.1f} |")
    lines += ["", "| step-time ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    return lines + [""]


def best(result: dict | None, key: str) -> dict | None:
    if not result:
        return None
    rows = [r for r in result["cases"] if r.get("variant") == "ilsd" and r.get("checkpointing") == "none"
            and not r.get("ablate") and key in r and "error" not in r]
    return max(rows, key=lambda r: r[key], default=None)


def targets(masked: dict | None, diffusion: dict | None) -> list[str]:
    lines = ["### Targets (issue 8)", "", "| target | measured | met |", "|---|---|---|"]
    m = best(masked, "trunk_tflops")
    lines.append("| ELT-L 8N×3L masked, trunk >= 440 TFLOP/s | "
                 + (f"{m['trunk_tflops']:.0f} TFLOP/s ({m['name']}) | {'yes' if m['trunk_tflops'] >= 440 else 'no'} |"
                    if m else "not measured | - |"))
    d = best(diffusion, "img_per_s")
    lines.append("| diffusion 7N×4L d=1152, >= 600 img/s | "
                 + (f"{d['img_per_s']:.0f} img/s ({d['name']}) | {'yes' if d['img_per_s'] >= 600 else 'no'} |"
                    if d else "not measured | - |"))
    ratios = (masked or {}).get("ratios", {})
    for label, prefix, limit in (("ILSD step time <= 1.03× vanilla", "ilsd / vanilla [ckpt=none", 1.03),
                                 ("per-loop checkpointing <= 1.15× none", "ckpt=loop / none [ilsd", 1.15)):
        found = {k: v for k, v in ratios.items() if k.startswith(prefix)}
        if not found:
            lines.append(f"| {label} | not measured | - |")
        for k, v in found.items():
            lines.append(f"| {label} | {v:.3f} ({k}) | {'yes' if v <= limit else 'no'} |")
    return lines + [""]


def sample_table(result: dict) -> list[str]:
    meta = result["meta"]
    lines = [f"### Sampling on {meta['device']} ({meta['date']}, commit {meta['commit']})",
             "one pass = one sampling step over the CFG batch (2 × images); img/s at the sampler's step count", "",
             "| family | model | mode | images | L | ms/pass | img/s | TFLOP/s | first passes s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['model']} | {r['mode']} | {r['images']} | {r['loops']} | "
                         f"not measured: {r['error']} ||||")
            continue
        lines.append(f"| {r['family']} | {r['model']} ({r['shape']}) | {r['mode']} | {r['images']} | {r['loops']} | "
                     f"{r['forward_ms']:.2f} | {r['img_per_s']:.2f} (at {r['steps']} steps) | {r['tflops']:.0f} | "
                     f"{r['first_s']:.1f} |")
    for s in result.get("skipped", []):
        lines.append(f"| {s} | not measured: time budget ||||||||")
    return lines + [""]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    masked, diffusion, sample = (load(folder, n) for n in ("train_masked.json", "train_diffusion.json", "sample.json"))
    lines = targets(masked, diffusion)
    if masked:
        lines += train_table("Training, masked", masked)
    if diffusion:
        lines += train_table("Training, diffusion", diffusion)
    if sample:
        lines += sample_table(sample)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
