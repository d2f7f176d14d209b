"""elt-plan: what a recipe costs before the cluster is booked.

    elt-plan RECIPE.yaml --gpus 64 --gpu-mem 80 [--mfu 0.4] [--peak-tflops 989] [key.sub=value ...]

Prints unique and effective parameters, FLOPs per sample at each loop count, the per-GPU memory for
every ZeRO stage × activation-checkpointing policy at the recipe's micro-batch, the largest micro-batch
that fits, the GPU-hours of the recipe's steps at the given MFU, and how many distinct classes a global
batch and a micro-batch hold against an i.i.d. draw (elt_scale/data/mix.py, from the manifest's per-shard
class counts: `--manifest`, default the recipe's shards when their manifest.json is on this machine).
`--json` prints the same as JSON.

    elt-plan RECIPE.yaml --schedules [--schedules-png PATH] [key.sub=value ...]

prints instead every schedule of the run over its whole length (elt_scale/schedules.py, the functions the
trainer calls): lr, lr/peak and ILSD's λ at evenly spaced steps, the L_int distribution and, for masked
recipes, the masking ratio; `--schedules-png PATH` also draws them (elt_scale/plan_schedules.py). Needs no
data, manifest, GPU or network.

The memory model (bytes per GPU, Ψ = unique parameters, W = data-parallel ranks):

  weights / grads / optimizer   2Ψ / 2Ψ / 12Ψ in bf16 mixed precision (fp32 master + Adam m, v),
                                4Ψ / 4Ψ / 8Ψ in fp32; ZeRO-1 shards the optimizer over W, ZeRO-2 also the
                                grads, ZeRO-3 also the weights (plus one gathered layer as working set).
  activations                   what autograd keeps for backward, from this repo's own layers
                                (pre-norm attention + GELU MLP, flash/memory-efficient SDPA: no n² scores):
                                per layer (8 + 2·r)·n·d elements, (12 + 2·r) with adaLN, plus fp32
                                softmax statistics per head and LayerNorm statistics.
                                none   keeps every layer's internals for all N×L layer applications;
                                loop   keeps the inputs of loops 1..L−1, plus one loop's internals
                                       (N layers): the last loop's, which is not checkpointed, and
                                       in backward each earlier loop's while it is recomputed;
                                layer  keeps the N×L−1 checkpointed layer inputs, plus one layer's
                                       internals (the last layer's, then each recomputed one's).
                                The readout (head + loss, both ILSD exits) is always kept.

tests/unit/test_plan.py checks each part against the bytes a small model really holds (saved-tensor hooks,
parameter/gradient/Adam-state sizes); bench/plan_gpu.py compares the total with CUDA peak memory.
Not modelled: CUDA context, NCCL buffers and allocator fragmentation (`--headroom`, default 10% of the
GPU), and transient buffers of the optimizer step and of ZeRO's communication buckets.

How often to save (Young/Daly): with a checkpoint costing δ seconds and the job failing every M seconds on
average, saving every τ = √(2δM) seconds loses the least time to saves and to steps redone after a failure
(about δ/τ + τ/2M of the run). M = per-GPU MTBF / GPUs; `--mtbf-gpu-hours` (default 45,000: Llama 3's
pre-training saw 466 interruptions in 54 days on 16,384 GPUs, arXiv 2407.21783 §3.3.4). δ and the step time
come from a measured run's goodput ledger (`--from-run runs/NAME`, its goodput.json: save_s / saves and
training_s / steps) when given, else δ from `--save-s` or from the checkpoint's bytes per GPU at
`--write-gbps` (default 2 GB/s per GPU), and the step time from the GPU-hours above.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch

from .batching import BatchLayoutError, batch_layout
from .cli import ArgumentParser
from .config import RecipeError, load_recipe
from .data.mix import format_plan_mix, plan_mix
from .models import build_model, param_counts
from .flops import forward_flops, sequence_length, train_flops_per_sample
from .plan_schedules import format_schedules, schedule_summary, write_schedules_png

GiB = 2**30
POLICIES = ("none", "loop", "layer")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Precision:
    weight: int        # bytes per parameter held by the model
    grad: int          # bytes per gradient element
    optimizer: int     # bytes of optimizer state per parameter (master copy + Adam m, v)
    act: int           # bytes per activation element


PRECISIONS = {"bf16": Precision(2, 2, 12, 2), "fp32": Precision(4, 4, 8, 4)}


# ---------------------------------------------------------------------------------------------
# parameters

def parameter_counts(recipe) -> dict:
    """Unique parameters (built on the meta device: no memory, no init cost), the trunk's share, and the
    effective count of the unrolled network (trunk × L_max + everything else)."""
    with torch.device("meta"):
        return param_counts(build_model(recipe))


# ---------------------------------------------------------------------------------------------
# activations (bytes for one micro-batch of b samples)

def _adaln(m) -> bool:
    return m.family == "diffusion"


def layer_internals(m, b: int, p: int) -> float:
    """Bytes one layer application saves for backward (one loop of one unique layer)."""
    n, d, h = sequence_length(m), m.width, int(m.width * m.mlp_ratio)
    # x, norm1 out, qkv (3), attention out, x after attention, norm2 out, fc1 out (h), gelu out (h);
    # adaLN adds the two modulated inputs and the two gated branch outputs.
    elements = (12 if _adaln(m) else 8) * n * d + 2 * n * h
    stats = (m.heads + 4) * n * 4                        # fp32 logsumexp per head + 2 LayerNorms' mean/rstd
    cond = 7 * d * p if _adaln(m) else 0                 # silu(cond) and the 6·d modulation vector
    return b * (elements * p + stats + cond)


def boundary_state(m, b: int, p: int) -> float:
    """Bytes of one hidden state (B, n, d): what checkpointing keeps at each boundary."""
    return b * sequence_length(m) * m.width * p


def readout_bytes(m, b: int, p: int, ilsd: bool) -> float:
    """Head and loss of the teacher exit, plus the student exit's head, GT and distillation terms."""
    n, d = sequence_length(m), m.width
    if m.family == "masked":
        t = n - 1                                         # image tokens (the class token is dropped)
        logp = t * m.vocab_size * 4                       # fp32 log-probabilities kept by the CE
        teacher = n * d * p + t * d * p + logp + 2 * t * 4
        student = t * d * p + logp + 2 * logp + 2 * t * 4   # norm out, GT, distill (log p_s and p_t)
        embed = t * 8                                     # int64 token ids kept by the embedding
    else:
        pixels = m.channels * math.prod(m.grid)
        loss = pixels * 4                                 # fp32 (pred - target) kept by each MSE
        teacher = 3 * n * d * p + loss + 2 * n * 4 + 3 * d * p
        student = 2 * n * d * p + 2 * loss + 2 * n * 4 + 3 * d * p
        embed = pixels * p + (256 + 2 * d) * p            # patchify input, timestep features
    return b * (teacher + (student if ilsd else 0) + embed)


def activation_parts(recipe, b: int, policy: str, precision: Precision) -> dict:
    """{'kept': checkpointed inputs (or, for "none", all internals) and the readout, alive from forward to
    backward; 'recompute': one unit's internals, held by the pass's last (never checkpointed) unit at the
    end of forward and by each recomputed unit in turn in backward}. Peak = kept + recompute."""
    m, p = recipe.model, precision.act
    n_apps = m.unique_layers * m.loops
    readout = readout_bytes(m, b, p, recipe.ilsd.enabled)
    cond = b * m.width * p if _adaln(m) else 0            # the conditioning vector checkpoint keeps
    if policy == "none":
        return {"kept": n_apps * layer_internals(m, b, p) + readout, "recompute": 0.0}
    if policy == "loop":
        return {"kept": (m.loops - 1) * boundary_state(m, b, p) + cond + readout,
                "recompute": m.unique_layers * layer_internals(m, b, p)}
    if policy == "layer":
        return {"kept": (n_apps - 1) * boundary_state(m, b, p) + cond + readout,
                "recompute": layer_internals(m, b, p)}
    raise ValueError(f"checkpointing policy {policy!r}; allowed: {', '.join(POLICIES)}")


# ---------------------------------------------------------------------------------------------
# model states under ZeRO

def state_bytes(params: dict, zero_stage: int, world: int, precision: Precision) -> dict:
    psi = params["unique"]
    weights = psi * precision.weight
    grads = psi * precision.grad
    optimizer = psi * precision.optimizer
    if zero_stage >= 1:
        optimizer /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:   # sharded, but each layer is gathered whole while it runs
        weights = weights / world + params["largest_layer"] * precision.weight
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


def checkpoint_bytes(params: dict, zero_stage: int, world: int, precision: str, ema: bool) -> dict:
    """Payload bytes of one checkpoint folder (engine/checkpoint.py), by file kind, and the most one rank writes:
      module     rank 0's model-states file: the module's weights at the training precision (nothing at
                 ZeRO-3, where the weights are partitioned into the ZeRO files)
      optimizer  one ZeRO file per rank, 1/W each: DeepSpeed's fp32 master partition and Adam's m, v = 12Ψ at
                 stages 1-3 (fp32 training too: DeepSpeed keeps a separate fp32 partition), and the bf16
                 optimizer at stage 0; fp32 at stage 0 saves only m, v (8Ψ) in rank 0's model-states file
      ema        the fp32 EMA shards (engine/ema.py), 4Ψ in all, 1/W each
    Pickle framing and ZeRO's padding are not counted (bench/RESULTS.md compares this with real folders)."""
    psi = params["unique"]
    module = 0 if zero_stage == 3 else psi * PRECISIONS[precision].weight
    replicated = zero_stage == 0 and precision == "fp32"
    optimizer = psi * (8 if replicated else 12)
    ema_bytes = 4 * psi if ema else 0
    rank0 = module + (optimizer if replicated else optimizer / world) + ema_bytes / world
    return {"module": module, "optimizer": optimizer, "ema": ema_bytes, "total": module + optimizer + ema_bytes,
            "per_rank_max": rank0}


def memory(recipe, params: dict, b: int, zero_stage: int, policy: str, world: int, precision: Precision) -> dict:
    parts = state_bytes(params, zero_stage, world, precision)
    act = activation_parts(recipe, b, policy, precision)
    parts["activations"] = act["kept"] + act["recompute"]
    parts["total"] = sum(parts.values())
    return parts


def largest_micro_batch(recipe, params, zero_stage, policy, world, precision, budget: float) -> int:
    """Activations grow linearly in the micro-batch: solve fixed + b·per_sample <= budget."""
    fixed = memory(recipe, params, 0, zero_stage, policy, world, precision)["total"]
    per_sample = memory(recipe, params, 1, zero_stage, policy, world, precision)["total"] - fixed
    return max(0, int((budget - fixed) // per_sample))


# ---------------------------------------------------------------------------------------------
# the plan

def batch_for(recipe, gpus: int) -> tuple[int, int, int, str]:
    """(micro_batch, grad_accum, global_batch, note) on `gpus` GPUs: the layout elt-train would choose
    (batching.py). A GPU count that cannot split the recipe's global batch keeps the recipe's settings for
    the arithmetic, and the note is the line elt-train would refuse it with."""
    t = recipe.train
    try:
        layout = batch_layout(t, gpus)
    except BatchLayoutError as e:
        return t.micro_batch, t.grad_accum, t.micro_batch * t.grad_accum * gpus, str(e)
    return layout.micro_batch, layout.grad_accum, layout.global_batch, layout.note


def make_plan(recipe, gpus: int, gpu_mem_gib: float, mfu: float = 0.4, peak_tflops: float = 989.0,
              precision: str = "bf16", headroom: float = 0.10) -> dict:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu}: must be in (0, 1]")
    prec = PRECISIONS[precision]
    m, t = recipe.model, recipe.train
    params = parameter_counts(recipe)
    budget = gpu_mem_gib * GiB * (1 - headroom)
    micro, accum, gb, batch_note = batch_for(recipe, gpus)
    rows = []
    for stage in ZERO_STAGES:
        for policy in POLICIES:
            mem = memory(recipe, params, micro, stage, policy, gpus, prec)
            rows.append({"zero_stage": stage, "checkpointing": policy,
                         **{k: v / GiB for k, v in mem.items()},
                         "fits": mem["total"] <= budget,
                         "max_micro_batch": largest_micro_batch(recipe, params, stage, policy, gpus, prec, budget)})
    total_flops = t.steps * gb * train_flops_per_sample(recipe)
    gpu_hours = total_flops / (peak_tflops * 1e12 * mfu) / 3600
    return {
        "recipe": recipe.run.name, "family": m.family, "shape": f"{m.unique_layers}N×{m.loops}L",
        "tokens": sequence_length(m), "params": params,
        "gflops_per_sample": {L: forward_flops(m, L) / 1e9 for L in range(1, m.loops + 2)},
        "train_gflops_per_sample": train_flops_per_sample(recipe) / 1e9,
        "gpus": gpus, "gpu_mem_gib": gpu_mem_gib, "usable_gib": budget / GiB, "precision": precision,
        "micro_batch": micro, "grad_accum": accum, "global_batch": gb, "batch_note": batch_note,
        "recipe_setting": {"zero_stage": recipe.deepspeed.zero_stage, "checkpointing": t.checkpointing},
        "memory": rows,
        "checkpoint": checkpoint_bytes(params, recipe.deepspeed.zero_stage, gpus, precision, t.ema_decay > 0),
        "steps": t.steps, "mfu": mfu, "peak_tflops": peak_tflops,
        "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus,
    }


# ---------------------------------------------------------------------------------------------
# printing

def format_plan(plan: dict) -> str:
    p = plan["params"]
    lines = [
        f"{plan['recipe']}: {plan['family']} ELT {plan['shape']}, {plan['tokens']} tokens per sample",
        f"  parameters: {p['unique'] / 1e6:.1f}M unique ({p['trunk'] / 1e6:.1f}M in the looped block), "
        f"{p['effective'] / 1e6:.1f}M effective (unrolled)",
        "  forward GFLOPs per sample: " + ", ".join(f"L={L}: {g:.2f}" for L, g in plan["gflops_per_sample"].items()),
        f"  training step: {plan['train_gflops_per_sample']:.2f} GFLOPs per sample (fwd+bwd, ILSD exits)",
        f"  cluster: {plan['gpus']} GPUs × {plan['gpu_mem_gib']:g} GiB ({plan['usable_gib']:.1f} GiB usable), "
        f"{plan['precision']}, micro-batch {plan['micro_batch']} × accum {plan['grad_accum']} "
        f"→ global batch {plan['global_batch']}" + (f"\n  note: {plan['batch_note']}" if plan["batch_note"] else ""),
        "",
        "  ZeRO ckpt   weights  grads  optim  activ  total GiB  fits  max micro-batch",
    ]
    chosen = plan["recipe_setting"]
    for r in plan["memory"]:
        mark = " ← recipe" if (r["zero_stage"], r["checkpointing"]) == (chosen["zero_stage"], chosen["checkpointing"]) else ""
        lines.append(f"  {r['zero_stage']:>4} {r['checkpointing']:<6}{r['weights']:8.2f}{r['grads']:7.2f}"
                     f"{r['optimizer']:7.2f}{r['activations']:7.2f}{r['total']:11.2f}  {'yes' if r['fits'] else 'NO ':<4}"
                     f"  {r['max_micro_batch']:>6}{mark}")
    c = plan["checkpoint"]
    lines += ["", f"  checkpoint (ZeRO-{chosen['zero_stage']}, {plan['precision']}): {c['total'] / GiB:.2f} GiB per save "
                  f"({c['module'] / GiB:.2f} module + {c['optimizer'] / GiB:.2f} optimizer + {c['ema'] / GiB:.2f} EMA), "
                  f"at most {c['per_rank_max'] / GiB:.2f} GiB from one rank"]
    lines += ["", f"  {plan['steps']} steps × {plan['global_batch']} samples at MFU {plan['mfu']:.0%} of "
                  f"{plan['peak_tflops']:g} TFLOP/s: {plan['gpu_hours']:,.0f} GPU-hours "
                  f"({plan['wall_hours']:,.1f} h on {plan['gpus']} GPUs)"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="elt-plan", description=__doc__)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=64")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (nodes × GPUs per node)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for GPU-hours")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="bf16: mixed precision (bf16 weights/grads/activations, fp32 master + Adam); "
                        "fp32: everything fp32 (default: bf16)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of GPU memory kept free for CUDA context, NCCL and fragmentation")
    p.add_argument("--manifest", default=None,
                   help="shards (directory, URL or manifest.json) or synthetic:{imagenet,ucf101}-{shuffled,sorted} "
                        "for the batch class mix (default: the recipe's data.shards, when on this machine)")
    p.add_argument("--mtbf-gpu-hours", type=float, default=45_000.0,
                   help="assumed mean time between failures of one GPU (with its share of host, network, storage), "
                        "for the save interval (default 45,000: Llama 3's 16k-GPU pre-training)")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="a run of this recipe whose goodput.json gives the measured save and step time")
    p.add_argument("--save-s", type=float, default=None, help="seconds one checkpoint save takes (else measured or estimated)")
    p.add_argument("--write-gbps", type=float, default=2.0, help="checkpoint write speed per GPU, GB/s, for the estimate")
    p.add_argument("--json", action="store_true", help="print the plan (or with --schedules, the schedules) as JSON")
    p.add_argument("--schedules", action="store_true",
                   help="print the run's schedules instead of the cost plan: lr, lr/peak and λ over all steps, "
                        "the L_int distribution and (masked recipes) the masking ratio; needs no data")
    p.add_argument("--schedules-png", metavar="PATH", default=None,
                   help="with --schedules (implies it): also draw them to this PNG (lr with the end of warm-up "
                        "marked, λ, the L_int distribution, the masking-ratio distribution)")
    args, rest = p.parse_known_args(argv)     # overrides may also come after the options, as the usage shows
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpus < 1 or args.gpu_mem <= 0 or not 0 <= args.headroom < 1:
        print("elt-plan: --gpus >= 1, --gpu-mem > 0 and 0 <= --headroom < 1 are required", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.schedules or args.schedules_png:
            return print_schedules(recipe, args)
        plan = make_plan(recipe, args.gpus, args.gpu_mem, args.mfu, args.peak_tflops, args.precision, args.headroom)
        plan["batch_mix"] = plan_mix(recipe, args.manifest, plan["global_batch"], plan["micro_batch"])
        plan["save_interval"] = save_interval(plan, args.mtbf_gpu_hours, args.from_run, args.save_s, args.write_gbps)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"elt-plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else "\n\n".join([format_plan(plan), format_save_interval(
        plan["save_interval"]), format_plan_mix(plan["batch_mix"])]))
    return 0


def save_interval(plan: dict, mtbf_gpu_hours: float, from_run=None, save_s=None, write_gbps: float = 2.0) -> dict:
    """Young/Daly's save interval for this recipe on plan['gpus'] GPUs (see the module docstring)."""
    if mtbf_gpu_hours <= 0 or write_gbps <= 0:
        raise ValueError("--mtbf-gpu-hours and --write-gbps must be > 0")
    step_s, source = plan["wall_hours"] * 3600 / plan["steps"], "estimated from the GPU-hours at the MFU"
    if from_run:
        measured = read_goodput(from_run)
        step_s, source = measured["training_s"] / max(1, measured["steps_trained"]), f"measured in {from_run}"
        if save_s is None and measured["saves"]:
            save_s = measured["save_s"] / measured["saves"]
    if save_s is None:
        chosen = next(r for r in plan["memory"] if (r["zero_stage"], r["checkpointing"]) ==
                      (plan["recipe_setting"]["zero_stage"], plan["recipe_setting"]["checkpointing"]))
        save_s = (chosen["weights"] + chosen["optimizer"]) * GiB / (write_gbps * 1e9)
        save_source = f"estimated: {chosen['weights'] + chosen['optimizer']:.1f} GiB per GPU at {write_gbps:g} GB/s"
    else:
        save_source = f"measured in {from_run}" if from_run else "given"
    mtbf_s = mtbf_gpu_hours * 3600 / plan["gpus"]
    tau = math.sqrt(2 * save_s * mtbf_s)
    every = max(1, round(tau / step_s))
    return {"save_s": save_s, "save_source": save_source, "step_s": step_s, "step_source": source,
            "mtbf_hours": mtbf_s / 3600, "mtbf_gpu_hours": mtbf_gpu_hours, "interval_s": tau,
            "save_every": every, "expected_loss": save_s / tau + tau / (2 * mtbf_s)}


def read_goodput(run_dir) -> dict:
    from pathlib import Path
    path = Path(run_dir) / "goodput.json"
    try:
        return json.loads(path.read_text())["total"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"--from-run {run_dir}: no readable goodput ledger ({path}: {e})") from e


def format_save_interval(s: dict) -> str:
    return (f"  saving (Young/Daly): a save takes {s['save_s']:.1f} s ({s['save_source']}), a step {s['step_s']:.2f} s "
            f"({s['step_source']}); job MTBF {s['mtbf_hours']:.1f} h at {s['mtbf_gpu_hours']:,.0f} GPU-hours per GPU\n"
            f"  → train.save_every={s['save_every']} (every {s['interval_s'] / 60:.0f} min): about "
            f"{s['expected_loss']:.1%} of the run lost to saves and redone steps")


def print_schedules(recipe, args) -> int:
    summary = schedule_summary(recipe)
    print(json.dumps(summary, indent=2) if args.json else format_schedules(summary))
    if args.schedules_png:
        print(f"wrote {write_schedules_png(recipe, args.schedules_png)}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
