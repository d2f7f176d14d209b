"""The run directory, written by rank 0 at the start of every attempt: what sampling needs later from any working
directory (recipe.yaml, tokenizer.json), run_info.json, metrics.jsonl opened; and the start line."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from ..config import save_recipe
from ..files import atomic_write_text, free_space
from ..inference.load import RUN_TOKENIZER
from . import checkpoint as ckpt
from .checkpoint import SAVE_FAILED_EXIT_CODE
from .logger import Reporter, write_run_info
from .resume import Started


def prepare_run_dir(recipe, started: Started, world: int, ds_config: dict, manifest: dict) -> dict:
    """Rank 0: the run directory with what sampling needs later from any working directory (recipe.yaml and
    the tokenizer that decodes samples), run_info.json; folders of saves that never completed pruned. Every
    file is replaced whole (written aside, renamed), so a full disk never leaves a torn one for the next start."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    atomic_write_text(run_dir / RUN_TOKENIZER, json.dumps(manifest["tokenizer"], indent=1))
    if (run_dir / "ckpt").exists():
        ckpt.prune(run_dir / "ckpt", recipe.train.keep_last)
    return write_run_info(run_dir / "run_info.json", recipe, started.engine.module, world, ds_config,
                          started.state.wandb_id)


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def open_run(recipe, started: Started, world: int, ds_config: dict, manifest: dict, rank: int):
    """Rank 0 writes the run directory and opens metrics.jsonl; all ranks agree whether that worked (one
    all-reduce) -> (run info on rank 0, Reporter), or None when it failed (rank 0 has said why)."""
    info, reporter, error = None, None, None
    try:
        if rank == 0:
            info = prepare_run_dir(recipe, started, world, ds_config, manifest)
        reporter = Reporter(recipe, rank, started.state.step, started.state.wandb_id)
    except OSError as e:
        error = ckpt.describe(e)
    if not any_rank(error is not None, started.engine.device):
        return info, reporter
    if error:
        print(f"elt-train: cannot write the run directory {recipe.run_dir}: {error} ({free_space(recipe.run_dir)});"
              f" free space or raise the quota, then rerun; exiting {SAVE_FAILED_EXIT_CODE}", file=sys.stderr)
    return None


def start_line(recipe, info: dict, world: int, start: int, resume_from) -> str:
    m, t = recipe.model, recipe.train
    return (f"{m.family} {m.unique_layers}N×{m.loops}L, {info['unique_params'] / 1e6:.2f}M params "
            f"({info['effective_params'] / 1e6:.2f}M effective), world {world}, ZeRO-{recipe.deepspeed.zero_stage}, "
            f"global batch {info['global_batch']} = {t.micro_batch} micro × {t.grad_accum} accum × {world} ranks, "
            f"steps {start}→{t.steps}" + (f", resumed from {resume_from}" if resume_from else ""))


def add_to_run_info(run_dir, extra: dict) -> None:
    """Rank 0: keys merged into run_info.json (replaced whole); a full disk here loses nothing else."""
    path = run_dir / "run_info.json"
    try:
        atomic_write_text(path, json.dumps({**json.loads(path.read_text()), **extra}, indent=1))
    except (OSError, ValueError):
        pass
