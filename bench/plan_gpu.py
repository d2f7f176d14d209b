"""elt-plan against CUDA memory: one training step per (recipe shape, checkpointing policy, precision).

    python bench/plan_gpu.py [--out plan_gpu.json]

Protocol (plain PyTorch, no DeepSpeed, one GPU): build the model on the GPU, run one AdamW step so the
optimizer state exists, free the gradients, then measure
  states     memory_allocated() with weights + Adam state (fused AdamW);
  kept       memory_allocated() after forward + ILSD loss, minus states (what is held for backward);
  peak       max_memory_allocated() during forward + backward, minus states (activations, recompute,
             gradients and every transient buffer of backward);
and compare with elt-plan's parts at the same micro-batch: kept vs activations' 'kept' + 'recompute' (the
pass's last unit is not checkpointed, so its internals are held too); peak vs 'kept' + 'recompute' + grads. fp32 runs keep fp32 weights and Adam state (the planner's fp32 row);
bf16 runs cast the whole model to bf16 (activations as in DeepSpeed bf16; the optimizer state is then
not DeepSpeed's, so only the activation parts are compared). Needs a CUDA GPU; results are printed
and written as JSON; bench/RESULTS.md records them with device and date.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elt_scale.config import load_recipe  # noqa: E402
from elt_scale.objectives import ilsd_loss  # noqa: E402
from elt_scale.models import build_model  # noqa: E402
from elt_scale.objectives import build_objective  # noqa: E402
from elt_scale.plan import PRECISIONS, activation_parts, parameter_counts, state_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
CASES = [  # recipe, micro-batch
    ("imagenet256_masked_elt_l_8x3.yaml", 32),
    ("imagenet256_diffusion_elt_8x4.yaml", 8),
]


def batch(recipe, b, device):
    m = recipe.model
    if m.family == "masked":
        x = torch.randint(0, m.vocab_size, (b, *m.grid), device=device)
    else:
        x = torch.randn(b, m.channels, *m.grid, device=device)
    return x, torch.randint(0, m.num_classes, (b,), device=device)


def one_case(name: str, b: int, policy: str, precision: str) -> dict:
    recipe = load_recipe(ROOT / "recipes" / name, [f"train.checkpointing={policy}"])
    dev = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()           # whatever earlier cases left behind
    torch.manual_seed(0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = build_model(recipe).to(dev, dtype)
    objective = build_objective(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    x, labels = batch(recipe, b, dev)
    if recipe.model.family == "diffusion":
        x = x.to(dtype)
    L = recipe.model.loops

    def loss_fn(seed):
        prepared = objective.prepare(x, labels, torch.Generator().manual_seed(seed))
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in prepared.inputs)
        student, teacher = model(*inputs, exits=(1, L))
        return ilsd_loss(teacher, student, objective, prepared, 0.5)[0]

    loss_fn(0).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    states = base - before
    torch.cuda.reset_peak_memory_stats()
    loss = loss_fn(1)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)

    prec = PRECISIONS[precision]
    params = parameter_counts(recipe)
    est_act = activation_parts(recipe, b, policy, prec)
    est_states = state_bytes(params, 0, 1, prec)
    est_peak = est_act["kept"] + est_act["recompute"] + est_states["grads"]
    row = {"recipe": name, "micro_batch": b, "checkpointing": policy, "precision": precision,
           "kept_mib": kept / MiB, "plan_kept_mib": (est_act["kept"] + est_act["recompute"]) / MiB,
           "peak_mib": peak / MiB, "plan_peak_mib": est_peak / MiB,
           "grads_mib": grads / MiB, "plan_grads_mib": est_states["grads"] / MiB,
           "states_mib": states / MiB}
    if precision == "fp32":
        row["plan_states_mib"] = (est_states["weights"] + est_states["optimizer"]) / MiB
    del model, opt, loss
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="plan_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name, b in CASES:
        for precision in ("bf16", "fp32"):
            for policy in ("none", "loop", "layer"):
                t = time.time()
                r = one_case(name, b, policy, precision)
                rows.append(r)
                print(f"{name:38s} b={b:<3} {precision} {policy:5s} kept {r['kept_mib']:8.0f} MiB (plan "
                      f"{r['plan_kept_mib']:8.0f}, {r['plan_kept_mib'] / r['kept_mib']:.2f}x)  peak {r['peak_mib']:8.0f} "
                      f"MiB (plan {r['plan_peak_mib']:8.0f}, {r['plan_peak_mib'] / r['peak_mib']:.2f}x)  "
                      f"states {r['states_mib']:.0f}/{r.get('plan_states_mib', float('nan')):.0f} MiB  {time.time() - t:.1f}s",
                      flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"plan_gpu: {len(rows)} cases on {meta['device']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
