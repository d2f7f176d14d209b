"""Training throughput of the real trainer path: img/s, tokens/s, trunk TFLOP/s, MFU, peak memory.

    python bench/train_throughput.py --preset elt-l-masked --compare vanilla,ilsd,baseline \\
        --checkpointing none,loop --compile off,layer --ablate fp32,sdpa-math --out train.json
    python bench/train_throughput.py recipes/digits_masked.yaml train.micro_batch=64
    python bench/train_throughput.py --preset elt-l-masked --tiny          # CPU, seconds (CI smoke test)

Every case builds the model from a recipe, wraps it with deepspeed.initialize and the recipe's DeepSpeed
config, and times elt_scale.train.micro_step (plus the EMA update when the recipe has train.ema_decay > 0)
on synthetic batches of the recipe's shape: what a user's run gets, minus data loading
(bench/dataloader.py measures that) and the loop's logging. Protocol: `--warmup` steps (which
include torch.compile), then `--windows` windows of `--steps` steps, each between two device
synchronisations; step time = the median window's elapsed / steps. FLOPs are model FLOPs
(elt_scale.flops: 3× forward; recomputation from checkpointing is not counted, so checkpointing
shows up as lower TFLOP/s). MFU is against a bf16 matmul measured in the same run. Cases:

  variants  vanilla   the looped model to L_max, GT loss only
            ilsd      the same plus the student exit and its two loss terms (the recipe's ILSD)
            baseline  N×L unique layers looped once: a plain transformer of equal trunk FLOPs
  --checkpointing none | loop | layer      (train.checkpointing)
  --compile off | layer | block            (model.trunk.compile_block(scope))
  --ablate  changes one fast path in the first case, to measure its effect as a ratio:
            no-fused-adamw  torch AdamW foreach instead of fused
            fp32            train.bf16=false
            sdpa-math / sdpa-efficient / sdpa-flash   force one SDPA backend (default: PyTorch picks)
            no-overlap-comm / overlap-comm   force ZeRO-2/3 overlap_comm (default: on when world > 1)
            zero0 / zero1   another ZeRO stage than the recipe's (one GPU: partitioning saves nothing)
            loop-sync       add what elt_scale.train's loop did after each step before its flags were
                            read a step late (an all-reduce read back to the host: one device
                            synchronisation per step)
  A case listed twice is measured twice: the second gives the run-to-run spread ("repeat / first").
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import torch

# common first: it puts the project root on sys.path, so elt_scale imports without an install
from common import Deadline, device_facts, free_memory, matmul_peak_tflops, on_gpu, peak_memory_gb, sync, write_json
from presets import PRESETS, TINY, TINY_GRID

from elt_scale.config import load_recipe
from elt_scale.engine.resume import make_ds_config, make_optimizer
from elt_scale.engine.ema import ShardedEMA
from elt_scale.models import build_model, count_params
from elt_scale.flops import sequence_length, train_flops_per_sample, trunk_flops
from elt_scale.objectives import build_objective
from elt_scale.schedules import Schedules
from elt_scale.train import micro_step

ABLATIONS = ("no-fused-adamw", "fp32", "sdpa-math", "sdpa-efficient", "sdpa-flash", "no-overlap-comm",
             "overlap-comm", "loop-sync", "zero0", "zero1")


@dataclass
class Case:
    variant: str                      # vanilla | ilsd | baseline
    checkpointing: str = "none"
    compile: str = "off"              # off | layer | block
    ablate: str = ""                  # one of ABLATIONS, or "" for all fast paths on
    overrides: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return "/".join([self.variant, f"ckpt={self.checkpointing}", f"compile={self.compile}"]
                        + ([f"ablate={self.ablate}"] if self.ablate else []))


def variant_overrides(variant: str, base) -> list[str]:
    m = base.model
    if variant == "ilsd":
        return ["ilsd.enabled=true"]
    if variant == "vanilla":
        return ["ilsd.enabled=false"]
    if variant == "baseline":   # equal trunk FLOPs, N·L unique parameters, no loop (so no ILSD either)
        return ["ilsd.enabled=false", f"model.unique_layers={m.unique_layers * m.loops}", "model.loops=1"]
    raise SystemExit(f"--compare: unknown variant {variant!r}; allowed: vanilla, ilsd, baseline")


def case_recipe(args, case: Case):
    overrides = list(args.base_overrides) + variant_overrides(case.variant, args.base) + [
        f"train.checkpointing={case.checkpointing}"] + case.overrides
    if case.ablate == "fp32":
        overrides.append("train.bf16=false")
    if case.ablate in ("zero0", "zero1"):
        overrides.append(f"deepspeed.zero_stage={case.ablate[-1]}")
    recipe = load_recipe(args.recipe, overrides)
    if case.ablate in ("no-overlap-comm", "overlap-comm"):
        overlap = case.ablate == "overlap-comm"
        recipe.deepspeed.extra = {**recipe.deepspeed.extra, "zero_optimization": {"overlap_comm": overlap}}
    return recipe


def synthetic_batches(recipe, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the recipe's shape, pinned like the loader's, so micro_step's copy is the real one."""
    m, b = recipe.model, recipe.train.micro_batch
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if m.family == "masked":
            x = torch.randint(0, m.vocab_size, (b, *m.grid), generator=g)
        else:
            x = torch.randn(b, m.channels, *m.grid, generator=g)
        labels = torch.randint(0, m.num_classes, (b,), generator=g)
        out.append(tuple(t.pin_memory() if on_gpu() else t for t in (x, labels)))
    return out


def sdpa_context(ablate: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa-math": SDPBackend.MATH, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-flash": SDPBackend.FLASH_ATTENTION}.get(ablate)
    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def build_engine(recipe, case: Case):
    """What elt_scale.train.main does before its loop (model, compile, objective, optimizer, DeepSpeed)."""
    import deepspeed
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe)
    if case.compile != "off":
        torch._dynamo.reset()      # fresh caches: earlier cases' models must not count as recompiles
        model.trunk.compile_block(scope=case.compile)
    ds_config = make_ds_config(recipe, world=1)
    optimizer = None if "optimizer" in ds_config else make_optimizer(recipe, model)
    if optimizer is not None and case.ablate == "no-fused-adamw":   # same groups, multi-tensor kernels
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=recipe.train.lr, betas=tuple(recipe.train.betas),
                                      fused=False, foreach=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, model, build_objective(recipe)


@contextlib.contextmanager
def profiled(path):
    if not path:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu() else [])
    with profile(activities=activities) as prof:
        yield prof


def write_profile(prof, path: str, name: str, elapsed: float) -> dict:
    """Top ops by device time, and roughly how busy the device was (kernel time / wall time; kernels on
    two streams at once count twice): the first place to look for lost time."""
    device = "cuda" if on_gpu() else "cpu"
    table = prof.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=30, max_name_column_width=60)
    kernels = sum(e.self_device_time_total for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6 if on_gpu() else None
    with open(path, "a") as f:
        f.write(f"== {name}: 3 profiled steps after the timed ones, {elapsed:.3f} s wall ==\n{table}\n")
    return {"file": str(path), "device_busy_fraction": kernels / elapsed if kernels is not None else None}


def measure(args, case: Case, peak: float, profile: bool = False) -> dict:
    recipe = case_recipe(args, case)
    m = recipe.model
    row = {"name": case.name, "variant": case.variant, "checkpointing": case.checkpointing,
           "compile": case.compile, "ablate": case.ablate, "family": m.family,
           "shape": f"{m.unique_layers}Nx{m.loops}L d={m.width} tokens={sequence_length(m)}",
           "batch": recipe.train.micro_batch, "zero_stage": recipe.deepspeed.zero_stage,
           "bf16": recipe.train.bf16 and on_gpu()}
    free_memory()
    held_before = torch.cuda.memory_allocated() if on_gpu() else 0   # anything an earlier case left behind
    engine, model, objective = build_engine(recipe, case)
    row["params_m"] = count_params(model) / 1e6
    batches, schedules = synthetic_batches(recipe), Schedules.of(recipe)
    # The trainer updates its EMA after every applied step: part of the step when the recipe has one.
    ema = ShardedEMA(engine.module, recipe.train.ema_decay, 0, 1) if recipe.train.ema_decay > 0 else None
    row["ema"] = ema is not None

    def step_at(step: int):
        loss, *_ = micro_step(engine, objective, batches[step % len(batches)], recipe, schedules, step, 0, 0)
        if ema:
            ema.update()
        return loss

    with sdpa_context(case.ablate):
        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = step_at(i)
        sync()
        row["warmup_s"] = time.perf_counter() - t0
        windows = []
        for w in range(args.windows):
            t0 = time.perf_counter()
            for i in range(args.steps):
                loss = step_at(args.warmup + w * args.steps + i)
                if case.ablate == "loop-sync":    # what each step did before flags were read a step late
                    flags = torch.zeros(3, device=engine.device)
                    torch.distributed.all_reduce(flags)
                    flags.tolist()
            sync()
            windows.append((time.perf_counter() - t0) / args.steps)
        if profile and args.profile:     # extra steps, after the timed ones: the profiler slows them
            with profiled(args.profile) as prof:
                t1 = time.perf_counter()
                for i in range(3):
                    step_at(args.warmup + args.windows * args.steps + i)
                sync()
            row["profile"] = write_profile(prof, args.profile, case.name, time.perf_counter() - t1)
    b = recipe.train.micro_batch
    step_time = sorted(windows)[len(windows) // 2]     # median window: a GC pause or clock dip moves it less
    row["window_step_times_s"] = windows
    trunk = 3 * trunk_flops(m, m.loops) * b / step_time / 1e12
    model_tflops = train_flops_per_sample(recipe) * b / step_time / 1e12
    row.update(step_time_s=step_time, img_per_s=b / step_time, tokens_per_s=b * sequence_length(m) / step_time,
               trunk_tflops=trunk, model_tflops=model_tflops, mfu=model_tflops / peak,
               peak_mem_gb=peak_memory_gb() - held_before / 2**30 if on_gpu() else None, loss=float(loss))
    if not math.isfinite(row["loss"]):
        row["error"] = f"non-finite loss {row['loss']}"
    engine.destroy()                 # drops ZeRO's hooks and buffers, so the next case starts clean
    del engine, model, objective, batches, ema
    free_memory()
    return row


def plan(args) -> list[Case]:
    if args.cases:   # an explicit, ordered list: the most important cases first when time is short
        return [Case(*c) for c in args.cases]
    cases = [Case(v, ck, c) for c in args.compile for ck in args.checkpointing for v in args.compare]
    first = cases[0]
    cases += [Case(first.variant, first.checkpointing, first.compile, ablate=a) for a in args.ablate]
    return cases


def ratios(rows: list[dict]) -> dict:
    """Step-time ratios between cases measured in this run (> 1: the first is slower)."""
    t, out = {}, {}
    for r in rows:
        if "step_time_s" not in r or "error" in r:
            continue
        key = (r["variant"], r["checkpointing"], r["compile"], r["ablate"])
        if key in t:    # the same case again: run-to-run spread
            out[f"repeat / first [{r['name']}]"] = r["step_time_s"] / t[key]
        else:
            t[key] = r["step_time_s"]
    for (v, ck, c, a), time_ in t.items():
        if a:
            ref = t.get((v, ck, c, ""))
            if ref:
                out[f"{a} / fast paths on [{v} ckpt={ck} compile={c}]"] = time_ / ref
            continue
        if v == "ilsd" and (ref := t.get(("vanilla", ck, c, ""))):
            out[f"ilsd / vanilla [ckpt={ck} compile={c}]"] = time_ / ref
        if v == "baseline" and (ref := t.get(("vanilla", ck, c, ""))):
            out[f"baseline / vanilla [ckpt={ck} compile={c}]"] = time_ / ref
        if ck != "none" and (ref := t.get((v, "none", c, ""))):
            out[f"ckpt={ck} / none [{v} compile={c}]"] = time_ / ref
        if c == "off":
            for other in ("layer", "block"):
                if ref := t.get((v, ck, other, "")):
                    out[f"compile=off / {other} [{v} ckpt={ck}]"] = time_ / ref
    return out


def split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe YAML (or use --preset)")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. train.micro_batch=32")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a paper-shaped workload instead of a recipe")
    p.add_argument("--compare", type=split, default=["ilsd"], help="variants: vanilla,ilsd,baseline")
    p.add_argument("--checkpointing", type=split, default=["none"], help="policies: none,loop,layer")
    p.add_argument("--compile", type=split, default=["off"], help="off,layer,block")
    p.add_argument("--ablate", type=split, default=[], help=f"fast paths to switch off: {','.join(ABLATIONS)}")
    p.add_argument("--cases", type=split, default=[],
                   help="explicit ordered cases VARIANT:CKPT:COMPILE[:ABLATE], e.g. ilsd:none:layer,vanilla:loop:off "
                        "(replaces the --compare × --checkpointing × --compile grid and --ablate)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--windows", type=int, default=1, help="timed windows per case; step time = the median window's")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case (compilation happens here)")
    p.add_argument("--tiny", action="store_true", help="shrink the model to run on a CPU in seconds")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; skip cases that would start later")
    p.add_argument("--compile-cost", type=float, default=60, help="seconds a compiled case needs at least")
    p.add_argument("--out", help="JSON file, rewritten after each case")
    p.add_argument("--profile", help="append a torch.profiler table of the first case's timed steps to this file")
    args = p.parse_args(argv)
    if args.preset and args.recipe and "=" in args.recipe:     # `--preset X key=value ...`: overrides only
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    if bool(args.recipe) == bool(args.preset):
        p.error("give a recipe or --preset, not both or neither")
    for name, allowed in (("compile", {"off", "layer", "block"}), ("checkpointing", {"none", "loop", "layer"}),
                          ("ablate", set(ABLATIONS))):
        bad = set(getattr(args, name)) - allowed
        if bad:
            p.error(f"--{name}: unknown {', '.join(sorted(bad))}; allowed: {', '.join(sorted(allowed))}")
    args.cases = [parse_case(p, c) for c in args.cases]
    args.base_overrides = PRESETS.get(args.preset, []) + list(args.overrides)
    family = load_recipe(args.recipe, args.base_overrides).model.family
    if args.tiny:
        args.base_overrides = PRESETS.get(args.preset, []) + TINY + TINY_GRID[family] + list(args.overrides)
    args.base = load_recipe(args.recipe, args.base_overrides)
    return args


def parse_case(p, text: str) -> tuple:
    parts = text.split(":")
    allowed = ({"vanilla", "ilsd", "baseline"}, {"none", "loop", "layer"}, {"off", "layer", "block"},
               set(ABLATIONS))
    if not 3 <= len(parts) <= 4 or any(v not in ok for v, ok in zip(parts, allowed)):
        p.error(f"--cases: {text!r} is not VARIANT:CKPT:COMPILE[:ABLATE] with VARIANT in vanilla|ilsd|baseline, "
                f"CKPT in none|loop|layer, COMPILE in off|layer|block, ABLATE in {'|'.join(ABLATIONS)}")
    return tuple(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    from elt_scale.engine.distributed import init_distributed
    init_distributed()
    deadline = Deadline(args.time_budget)
    peak = matmul_peak_tflops(256 if args.tiny else None)
    result = {"meta": {**device_facts(), "preset": args.preset, "recipe": args.recipe, "steps": args.steps,
                       "warmup": args.warmup, "windows": args.windows, "overrides": args.base_overrides, "matmul_peak": peak},
              "cases": [], "ratios": {}}
    print(f"matmul ceiling: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['size']}³) on {result['meta']['device']}")
    from tqdm import tqdm
    cases = plan(args)
    for case in tqdm(cases, desc="train cases", unit="case", disable=None):
        if deadline.left() < (args.compile_cost if case.compile != "off" else 0):
            row = {"name": case.name, "skipped": "time budget"}
        else:
            try:
                row = measure(args, case, peak["tflops"], profile=case is cases[0])
            except Exception as e:         # one failing case (OOM, backend missing) must not lose the rest
                row = {"name": case.name, "variant": case.variant, "checkpointing": case.checkpointing,
                       "compile": case.compile, "ablate": case.ablate, "error": f"{type(e).__name__}: {e}"[:500]}
                free_memory()
        result["cases"].append(row)
        result["ratios"] = ratios(result["cases"])
        write_json(args.out, result)
        tqdm.write(format_row(row))
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.3f}")
    ok = [r for r in result["cases"] if "step_time_s" in r and "error" not in r]
    print(f"train_throughput: {len(ok)}/{len(result['cases'])} cases measured"
          + (f", results in {args.out}" if args.out else ""))
    torch.distributed.destroy_process_group()      # else gloo can abort at interpreter exit (see train.py)
    return 0 if ok else 1


def format_row(r: dict) -> str:
    if "step_time_s" not in r:
        return f"  {r['name']}: {r.get('error') or r.get('skipped')}"
    mem = f"{r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else "-"
    return (f"  {r['name']}: {r['step_time_s'] * 1e3:.1f} ms/step, {r['img_per_s']:.0f} img/s, "
            f"trunk {r['trunk_tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%}, peak {mem}, first {r['warmup_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
