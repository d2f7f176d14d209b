"""Sampling throughput: images/s at each loop count L, for both families, eager vs torch.compile vs CUDA graphs.

    python bench/sample_throughput.py --out sample.json                  # both families, paper shapes
    python bench/sample_throughput.py --family masked --loops 1,2,3,4 --batch 1,64 --modes eager,cudagraphs
    python bench/sample_throughput.py --tiny                             # CPU, seconds (CI smoke test)

Protocol: one sampling step is one forward pass of the network at L loops over the classifier-free-guidance
batch (2 × images: conditional + null class), in bf16 weights on GPU (fp32 on CPU), under inference_mode.
Each (family, batch, mode, L) gets `--warmup` untimed passes (compilation or graph capture happens there)
and `--repeats` timed passes between two device synchronisations. images/s = images / (steps × pass
time), with the paper's step counts (MaskGIT 24, DDPM 512); the sampler's own bookkeeping between passes
(top-k / DDPM update, a few elementwise ops) is not included. `--baseline` adds the N×L-unique-layer
model of equal FLOPs at L=1 for comparison with the looped model at L_max.

Modes: eager; compile (model.trunk.compile_block(), every loop reuses it); cudagraphs (the whole forward
at fixed L captured once with torch.cuda.CUDAGraph and replayed: removes launch overhead; GPU only).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

# common first: it puts the project root on sys.path, so elt_scale imports without an install
from common import Deadline, device_facts, free_memory, on_gpu, sync, write_json
from presets import PRESETS, TINY, TINY_GRID

from elt_scale.config import load_recipe
from elt_scale.models import build_model
from elt_scale.flops import forward_flops

FAMILY_PRESET = {"masked": "elt-xl-masked", "diffusion": "elt-xl-diffusion"}
STEPS = {"masked": 24, "diffusion": 512}


def family_recipe(family: str, tiny: bool, extra: list[str]):
    overrides = PRESETS[FAMILY_PRESET[family]] + (TINY + TINY_GRID[family] if tiny else []) + extra
    return load_recipe(None, overrides)


def cfg_inputs(recipe, images: int, device) -> tuple:
    """Model inputs for one guided step: the batch twice, second half with the null class."""
    m = recipe.model
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, m.num_classes, (images,), generator=g)
    labels = torch.cat([labels, torch.full_like(labels, m.num_classes)]).to(device)
    if m.family == "masked":
        tokens = torch.randint(0, m.vocab_size + 1, (2 * images, *m.grid), generator=g)   # incl. [MASK]
        return tokens.to(device), labels
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    x_t = torch.randn(2 * images, m.channels, *m.grid, generator=g).to(device, dtype)
    t = torch.rand(2 * images, generator=g).to(device)
    return x_t, t, labels


def make_runner(model, inputs, loops: int, mode: str):
    """A zero-argument callable running one forward pass at `loops` loops in the given mode."""
    forward = lambda: model(*inputs, exits=(loops,))   # noqa: E731
    if mode != "cudagraphs":
        return forward
    side = torch.cuda.Stream()                     # warm up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def time_runner(run, warmup: int, repeats: int) -> tuple[float, float]:
    """(seconds for the warm-up passes, seconds per timed pass)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return first, (time.perf_counter() - t0) / repeats


def bench_model(recipe, mode: str, images: int, loops_list: list[int], args, label: str) -> list[dict]:
    device = torch.device("cuda" if on_gpu() else "cpu")
    torch.manual_seed(0)
    model = build_model(recipe).to(device).eval()
    if on_gpu():
        model = model.to(torch.bfloat16)
    if mode == "compile":
        torch._dynamo.reset()
        model.trunk.compile_block()
    inputs = cfg_inputs(recipe, images, device)
    m, steps = recipe.model, args.steps or STEPS[recipe.model.family]
    rows = []
    for loops in loops_list:
        row = {"family": m.family, "model": label, "mode": mode, "images": images, "model_batch": 2 * images,
               "loops": loops, "shape": f"{m.unique_layers}Nx{m.loops}L d={m.width}", "steps": steps}
        try:
            with torch.inference_mode():
                run = make_runner(model, inputs, loops, mode)
                first, per_pass = time_runner(run, args.warmup, args.repeats)
            row.update(first_s=first, forward_ms=per_pass * 1e3, img_per_s=images / (steps * per_pass),
                       tflops=forward_flops(m, loops) * 2 * images / per_pass / 1e12)
        except Exception as e:              # e.g. a capture that fails: record it, keep measuring the rest
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    del model, inputs
    free_memory()
    return rows


def split_ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides applied to every family's preset")
    p.add_argument("--family", default="masked,diffusion", help="masked,diffusion")
    p.add_argument("--modes", default="eager,cudagraphs,compile", help="eager,cudagraphs,compile (measured in this order)")
    p.add_argument("--loops", type=split_ints, default=None, help="loop counts (default 1..L_max)")
    p.add_argument("--batch", type=split_ints, default=[64], help="images per step (the model sees 2× for CFG)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps per image (default: masked 24, diffusion 512)")
    p.add_argument("--baseline", action="store_true", help="also time N×L unique layers looped once")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="shrink the models to run on a CPU in seconds")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; skip measurements that would start later")
    p.add_argument("--compile-cost", type=float, default=40, help="seconds a compiled measurement needs at least")
    p.add_argument("--out", help="JSON file, rewritten after each measurement")
    args = p.parse_args(argv)
    args.family = [f for f in args.family.split(",") if f]
    args.modes = [m for m in args.modes.split(",") if m]
    for name, values, allowed in (("family", args.family, STEPS), ("modes", args.modes, ("eager", "compile", "cudagraphs"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes if m != "cudagraphs" or on_gpu()]   # CUDA graphs need a GPU
    result = {"meta": {**device_facts(), "warmup": args.warmup, "repeats": args.repeats,
                       "skipped_modes": sorted(set(args.modes) - set(modes))}, "rows": []}
    from tqdm import tqdm
    jobs = []   # in --modes order first, so the cheap modes are measured before a time budget runs out
    for mode in modes:
        for family in args.family:
            recipe = family_recipe(family, args.tiny, args.overrides)
            loops = args.loops or list(range(1, recipe.model.loops + 1))
            for images in args.batch:
                jobs.append((recipe, mode, images, loops, "looped"))
                if args.baseline:
                    n = recipe.model.unique_layers * recipe.model.loops
                    base = family_recipe(family, args.tiny, args.overrides + [
                        "ilsd.enabled=false", f"model.unique_layers={n}", "model.loops=1"])
                    jobs.append((base, mode, images, [1], "baseline"))
    deadline = Deadline(args.time_budget)
    for recipe, mode, images, loops, label in tqdm(jobs, desc="sample cases", unit="case", disable=None):
        if deadline.left() < (args.compile_cost if mode == "compile" else 0):
            result["skipped"] = result.get("skipped", []) + [f"{recipe.model.family} {label} {mode} images={images}"]
            write_json(args.out, result)
            continue
        rows = bench_model(recipe, mode, images, loops, args, label)
        result["rows"] += rows
        write_json(args.out, result)
        for r in rows:
            print(format_row(r))
    ok = [r for r in result["rows"] if "error" not in r]
    print(f"sample_throughput: {len(ok)}/{len(result['rows'])} measurements"
          + (f", results in {args.out}" if args.out else ""))
    return 0 if ok else 1


def format_row(r: dict) -> str:
    head = f"  {r['family']:9s} {r['model']:8s} {r['mode']:10s} images={r['images']:<3d} L={r['loops']}"
    if "error" in r:
        return f"{head}: {r['error']}"
    return (f"{head}: {r['forward_ms']:.2f} ms/pass, {r['img_per_s']:.2f} img/s at {r['steps']} steps, "
            f"{r['tflops']:.1f} TFLOP/s, first {r['first_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
