"""Recipe -> DeepSpeed config dict (ZeRO stage, batch arithmetic, precision) and the optimizer. The learning
rate is not DeepSpeed's scheduler's: `set_lr` writes elt_scale/schedules.py's value before every update."""
from __future__ import annotations

import copy

import torch

from .guard import GuardedAdamW


class BatchMismatch(ValueError):
    pass


def global_batch(recipe, world: int) -> int:
    t = recipe.train
    g = t.micro_batch * t.grad_accum * world
    if t.global_batch and t.global_batch != g:
        raise BatchMismatch(f"train.global_batch={t.global_batch} but train.micro_batch ({t.micro_batch}) × "
                            f"train.grad_accum ({t.grad_accum}) × world size ({world}) = {g}")
    return g


def bf16_enabled(recipe) -> bool:
    return bool(recipe.train.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def own_clip(recipe) -> bool:
    """Stage 0 in fp32 hands our optimizer to DeepSpeed unwrapped: GuardedAdamW clips (and reports the
    pre-clip norm and skips non-finite steps) itself."""
    return recipe.deepspeed.zero_stage == 0 and not bf16_enabled(recipe) and not recipe.deepspeed.offload_optimizer


def make_ds_config(recipe, world: int) -> dict:
    t, d = recipe.train, recipe.deepspeed
    if "scheduler" in d.extra:     # a second schedule would fight set_lr's every step
        raise BatchMismatch("deepspeed.extra.scheduler: the learning-rate schedule is train.lr, train.warmup_steps "
                            "and train.min_lr_ratio (linear warm-up, then cosine: elt-plan RECIPE --schedules "
                            "shows it); remove deepspeed.extra.scheduler")
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        # one rank has no communication to overlap, and the side stream cost 5-15% of an H200 step (bench/RESULTS.md)
        zero.update(overlap_comm=torch.cuda.is_available() and world > 1, contiguous_gradients=True)
    if d.zero_stage == 3:    # the looped block runs the same modules L times: say so if the prefetch trace breaks
        zero["log_trace_cache_warnings"] = True
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_batch_size": global_batch(recipe, world),
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if own_clip(recipe) else t.grad_clip,
        "bf16": {"enabled": bf16_enabled(recipe)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,           # we log ourselves
        "wall_clock_breakdown": False,
    }
    return merge(cfg, d.extra)


def set_lr(engine, lr: float) -> float:
    """Write `lr` into every param group of the optimizer that takes the step (under ZeRO/bf16 the torch
    optimizer DeepSpeed wraps); returns the value now in force, read back from the optimizer."""
    opt = engine.optimizer
    groups = opt.param_groups if opt is not None else []
    for g in groups:
        g["lr"] = lr
    return groups[0]["lr"] if groups else lr


def make_optimizer(recipe, model):
    """torch AdamW (fused on GPU), DeepSpeed's CPU Adam under ZeRO-Offload; no weight decay on norms, biases
    and embeddings-as-vectors."""
    t = recipe.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.deepspeed.offload_optimizer:   # ZeRO-Offload steps on the host and accepts only its CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), adamw_mode=True)
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available())
    if own_clip(recipe):          # unwrapped by DeepSpeed: skip non-finite steps ourselves
        return GuardedAdamW(groups, max_grad_norm=t.grad_clip, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)   # DeepSpeed's ZeRO/bf16 wrapper skips non-finite steps
