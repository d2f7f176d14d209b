"""Where a run starts, in one call: the model, the DeepSpeed engine and the train state, fresh or resumed.

    same layout (world size and ZeRO stage)   DeepSpeed's own load: bitwise-exact continuation
    another layout                             consolidated fp32 weights before `deepspeed.initialize`, then
                                               Adam's moments through a universal checkpoint (universal.py)
    fresh                                      step 0, a new wandb id
The EMA, kept sharded like the master weights, is re-sliced from its shards on any layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..inference.weights import consolidated_weights
from ..models import build_model
from . import checkpoint as ckpt
from . import universal
from .checkpoint import TrainState
from .ds_config import make_optimizer
from .ema import ShardedEMA
from .logger import new_wandb_id


class ResumeRefused(ValueError):
    """The checkpoint cannot be resumed into this recipe's model; the message says why (exit 2)."""


@dataclass
class Started:
    engine: object                  # deepspeed.DeepSpeedEngine (model inside: engine.module)
    ema: ShardedEMA | None
    state: TrainState               # for this run's layout; step 0 when fresh
    notes: list[str] = field(default_factory=list)   # what rank 0 should tell the user about the resume


def start_engine(recipe, ds_config: dict, resume_from: Path | None, rank: int, world: int) -> Started:
    """Collective. Builds the model (seeded: identical on every rank), compiles its block if asked, wraps it
    in DeepSpeed and restores `resume_from` (a checkpoint folder) when given."""
    import deepspeed

    stage = recipe.deepspeed.zero_stage
    saved = TrainState.read(resume_from) if resume_from else None
    same_layout = saved is not None and (saved.world_size, saved.zero_stage) == (world, stage)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe)
    shapes = ckpt.param_shapes(model)
    if saved and (why := ckpt.shape_mismatch(saved.model_shapes, shapes)):
        raise ResumeRefused(f"cannot resume from {resume_from}: {why}; a different model needs its own run.name")
    if saved and not same_layout:
        model.load_state_dict(consolidated_weights(resume_from))
        ds_config = universal.universal_config(ds_config, resume_from, stage)
    if recipe.train.compile:
        model.trunk.compile_block()
    optimizer = None if "optimizer" in ds_config else make_optimizer(recipe, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    notes = []
    if same_layout:
        state = ckpt.load_same_world(engine, resume_from)
    elif saved:
        how = universal.load(engine, resume_from, stage, recipe.train.watchdog_first_s)
        notes.append(f"optimizer state from layout (world {saved.world_size}, ZeRO-{saved.zero_stage}) loaded by {how}")
        engine.global_steps = saved.step      # DeepSpeed's own counter (the lr is a function of the step)
        state = saved
    else:
        state = TrainState(wandb_id=new_wandb_id())
    state.world_size, state.zero_stage, state.model_shapes = world, stage, shapes

    ema = ShardedEMA(engine.module, recipe.train.ema_decay, rank, world) if recipe.train.ema_decay > 0 else None
    if ema and saved:
        if any(resume_from.glob("ema_rank*.safetensors")):
            ema.load(resume_from)
        else:
            notes.append(f"WARNING {resume_from} holds no EMA; it starts from the resumed weights")
    return Started(engine, ema, state, notes)
