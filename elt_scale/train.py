"""Train an Elastic Looped Transformer with ILSD through DeepSpeed.

    elt-train RECIPE.yaml [key.sub=value ...]
    python -m elt_scale.train RECIPE.yaml train.steps=200
    deepspeed --num_gpus 8 --module elt_scale.train RECIPE.yaml deepspeed.zero_stage=2

Writes <run.out_dir>/<run.name>/{recipe.yaml, tokenizer.json, run_info.json, metrics.jsonl, ckpt/}. A run
directory that already holds a checkpoint is resumed (train.resume=auto|never|PATH), also on another world
size. Exit codes: 0 done, 2 bad recipe, data, resume path or DeepSpeed version, 3 numerics guard stopped the
run, 75 preempted (checkpoint saved; requeue it: see elt_scale/engine/preemption.py), 124 a stalled step
(elt_scale/engine/watchdog.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .cli import ArgumentParser
from .config import RecipeError, load_recipe, save_recipe
from .data import check_data, make_loader
from .engine import checkpoint as ckpt
from .engine import ds_internals, faults
from .engine.distributed import init_distributed
from .engine.ds_config import BatchMismatch, make_ds_config
from .engine.guard import NumericsGuard, NumericsStop, poison, term_flags
from .engine.live_eval import LiveEval
from .engine.logger import Reporter, Throughput, write_run_info
from .engine.preemption import PREEMPT_EXIT_CODE, PreemptionFlag
from .engine.resume import ResumeRefused, Started, start_engine
from .engine.watchdog import StepWatchdog
from .ilsd import draw_l_int, ilsd_lambda, ilsd_loss
from .inference.load import RUN_TOKENIZER
from .objectives import build_objective
from .seeding import generator

USER_ERRORS = (RecipeError, FileNotFoundError, ValueError, ds_internals.DeepSpeedMismatch)


def parse_args(argv=None):
    p = ArgumentParser(prog="elt-train", description=__doc__)
    p.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 deepspeed.zero_stage=3")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        manifest, _ = check_data(recipe)     # missing or mismatched shards: before a run dir or DeepSpeed exists
        ds_internals.check()                 # a DeepSpeed whose internals we do not know: before any work
        resume_from = ckpt.find_resume(recipe.train.resume, recipe.run_dir / "ckpt")
    except USER_ERRORS as e:
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed(recipe.train.collective_timeout_s)
    status = train(recipe, manifest, resume_from, rank, world)
    # Only on a normal return: gloo's worker threads still hold tensors if the interpreter tears the process
    # group down itself, and exit aborts ("terminate called without an active exception", seen on a Slurm
    # rank). After an exception a collective teardown could hang on a rank that never arrives: let it die.
    dist.destroy_process_group()
    return status


# ---------------------------------------------------------------------------------------------------------
# one micro-batch, one step

def train_step(engine, objective, batch, recipe, step: int, rank: int, micro: int):
    """One micro-batch: ILSD exits from one forward pass, loss, backward. Returns (loss, terms, l_int, λ).
    Every random draw comes from (seed, step, j), j = rank * grad_accum + micro the micro-batch's place in
    the global batch: the same draws on any layout and after a resume. On the training device, so preparing
    a batch needs no copy from the host (the CPU and CUDA streams differ; each is reproducible)."""
    r = recipe
    faults.die_at(step + 1, rank)                                         # test-only (ELT_FAULT)
    x, labels = (t.to(engine.device, non_blocking=True) for t in batch)
    j = rank * r.train.grad_accum + micro
    prepared = objective.prepare(x, labels, generator(r.run.seed, "batch", step, j, device=engine.device))
    l_max = r.model.loops
    if r.ilsd.enabled:
        l_int = draw_l_int(r.run.seed, step, r.ilsd.min_loops, l_max)     # same on every rank, no comm
        student, teacher = engine(*prepared.inputs, exits=(l_int, l_max))
        lam = ilsd_lambda(step, r.ilsd.lambda_start, r.ilsd.lambda_end, r.ilsd.lambda_steps or r.train.steps)
    else:
        l_int, lam, student = l_max, 1.0, None
        (teacher,) = engine(*prepared.inputs, exits=(l_max,))
    if faults.nan_at(step + 1, rank, micro):                              # test-only (ELT_FAULT): a bad exit
        student = student * float("nan") if student is not None else None
        teacher = teacher * float("nan") if student is None else teacher
    loss, terms = ilsd_loss(teacher, student, objective, prepared, lam)
    engine.backward(poison(loss))
    engine.step()
    return loss.detach(), terms, l_int, lam


@dataclass
class StepResult:
    sums: dict = field(default_factory=dict)   # loss terms summed over this rank's micro-batches (on device)
    bad: torch.Tensor | None = None            # per-term non-finite flags, max over micro-batches
    l_int: int = 0
    lam: float = 1.0
    skipped: bool = False                      # DeepSpeed (or GuardedAdamW) skipped the optimizer step


def run_step(s: Started, objective, loader, recipe, step: int, rank: int) -> StepResult:
    """All micro-batches of one global step on this rank, then the EMA. No host read of device values."""
    out, skipped_before = StepResult(), s.engine.skipped_steps
    for micro in range(recipe.train.grad_accum):
        loss, terms, out.l_int, out.lam = train_step(s.engine, objective, next(loader), recipe, step, rank, micro)
        flags = term_flags(terms)
        out.bad = flags if out.bad is None else torch.maximum(out.bad, flags)
        for k, v in {"loss": loss, **terms}.items():
            out.sums[k] = out.sums[k] + v.detach().float() if k in out.sums else v.detach().float()
    out.skipped = s.engine.skipped_steps > skipped_before
    if s.ema and not out.skipped:
        s.ema.update()
    return out


def agree(bad: torch.Tensor, preempt: bool) -> list[float]:
    """Element-wise max over ranks of the numerics flags and the preemption flag: one small all-reduce and
    the step's one host read of them."""
    t = torch.cat([bad.float(), bad.new_full((1,), float(preempt), dtype=torch.float32)])   # no host->device copy
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def global_mean(sums: dict, count: int) -> dict:
    """Loss terms summed over this rank's micro-batches -> their mean over the whole global batch (one
    all-reduce; called on logging steps only, by every rank), so the logged curve is layout-free."""
    t = torch.stack(list(sums.values()))
    dist.all_reduce(t)
    return dict(zip(sums, (t / count).tolist()))


def as_float(x) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------
# the run

def step_facts(result: StepResult, started: Started, grad_norm, guard) -> dict:
    return {"lambda": result.lam, "l_int": result.l_int, "lr": started.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "skipped_steps": guard.skipped}


def save(started: Started, recipe, done: int, loader, result: StepResult, guard) -> None:
    """Collective: the train state as of step `done`, then every rank's checkpoint files."""
    s = started.state
    s.step, s.data_position, s.ilsd_lambda = done, loader.position, result.lam
    s.skipped_steps, s.bad_streak = guard.skipped, guard.streak
    ckpt.save(started.engine, recipe.run_dir / "ckpt", s, started.ema, recipe.train.keep_last)


def prepare_run_dir(recipe, started: Started, world: int, ds_config: dict, manifest: dict) -> dict:
    """Rank 0: the run directory with what sampling needs later from any working directory (recipe.yaml and
    the tokenizer that decodes samples), run_info.json; folders of saves that never completed pruned."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    (run_dir / RUN_TOKENIZER).write_text(json.dumps(manifest["tokenizer"], indent=1))
    if (run_dir / "ckpt").exists():
        ckpt.prune(run_dir / "ckpt", recipe.train.keep_last)
    return write_run_info(run_dir / "run_info.json", recipe, started.engine.module, world, ds_config,
                          started.state.wandb_id)


def start_line(recipe, info: dict, world: int, start: int, resume_from) -> str:
    m, t = recipe.model, recipe.train
    return (f"{m.family} {m.unique_layers}N×{m.loops}L, {info['unique_params'] / 1e6:.2f}M params "
            f"({info['effective_params'] / 1e6:.2f}M effective), world {world}, ZeRO-{recipe.deepspeed.zero_stage}, "
            f"global batch {info['global_batch']} = {t.micro_batch} micro × {t.grad_accum} accum × {world} ranks, "
            f"steps {start}→{t.steps}" + (f", resumed from {resume_from}" if resume_from else ""))


def train(recipe, manifest: dict, resume_from, rank: int, world: int) -> int:
    """The run itself, on an initialised process group. Returns the exit code (0, 2, 3 or 75)."""
    preempt = PreemptionFlag()                   # from here on a SIGTERM/SIGUSR1 waits for a step boundary
    try:
        ds_config = make_ds_config(recipe, world)
        started = start_engine(recipe, ds_config, resume_from, rank, world)
    except (BatchMismatch, ResumeRefused) as e:
        if rank == 0 or isinstance(e, BatchMismatch):
            print(f"elt-train: {e}", file=sys.stderr)
        return 2
    state, t = started.state, recipe.train
    start = state.step
    info = prepare_run_dir(recipe, started, world, ds_config, manifest) if rank == 0 else None
    reporter = Reporter(recipe, rank, start, state.wandb_id)
    for note in started.notes:
        reporter.say(note, error=True)
    reporter.say(start_line(recipe, info, world, start, resume_from) if info else "")
    objective = build_objective(recipe)
    loader = make_loader(recipe, rank, world, state.data_position)
    meter, live = Throughput(recipe, world), LiveEval(recipe, rank, world, manifest["tokenizer"])
    guard = NumericsGuard(t.max_bad_steps, state.skipped_steps, state.bad_streak)
    watchdog = StepWatchdog(t.watchdog_factor, t.watchdog_min_s, t.watchdog_first_s, rank)

    status = 0
    for step in range(start, t.steps):
        done = step + 1
        result = run_step(started, objective, loader, recipe, step, rank)
        meter.add(ds_config["train_batch_size"])
        *bad, preempted = agree(result.bad, preempt.requested)
        watchdog.beat(done)
        preempted = preempted > 0 and done < t.steps             # on the last step: just finish
        grad_norm = as_float(started.engine.get_global_grad_norm())
        try:
            guard.after_step(done, result.skipped, bad, grad_norm)
        except NumericsStop as e:
            reporter.say(f"stopping: {e}", error=True)
            status = 3
            break
        if done % t.log_every == 0 or done == t.steps or preempted:          # the same on every rank
            means = global_mean(result.sums, world * t.grad_accum)
            reporter.log({"step": done, **means, **step_facts(result, started, grad_norm, guard), **meter.read(),
                          "world_size": world})
        reporter.tick()
        if not preempted:                        # a preempted job saves and leaves: no sampling first
            with watchdog.paused():              # sampling is not a slow step
                live.after_step(done, started.engine, started.ema, reporter)
        if (t.save_every and done % t.save_every == 0) or done == t.steps or preempted:
            with watchdog.paused():              # long and legitimate: not a stalled step
                save(started, recipe, done, loader, result, guard)
        if preempted:
            reporter.say(f"preempted ({preempt.signal_name or 'signal on another rank'}) at step {done}; "
                         f"checkpoint saved; exiting {PREEMPT_EXIT_CODE} to be requeued", error=True)
            status = PREEMPT_EXIT_CODE
            break
    watchdog.stop()
    reporter.close()
    if status == 0:
        reporter.say(f"finished {t.steps} steps, {guard.skipped} skipped; run in {recipe.run_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
