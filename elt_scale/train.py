"""Train an Elastic Looped Transformer with ILSD through DeepSpeed.

    elt-train RECIPE.yaml [key.sub=value ...]
    python -m elt_scale.train RECIPE.yaml train.steps=200
    deepspeed --num_gpus 8 --module elt_scale.train RECIPE.yaml deepspeed.zero_stage=2

Writes <run.out_dir>/<run.name>/{recipe.yaml, tokenizer.json, run_info.json, metrics.jsonl, goodput.json, ckpt/}. A run
directory that already holds a checkpoint is resumed (train.resume=auto|never|PATH), also on another world
size. Exit codes:
    0   done
    2   bad recipe, data, resume path or DeepSpeed version (never retried)
    3   the numerics guard stopped the run (never retried)
    69  storage unavailable: a shard or the manifest stayed unreadable for data.io_retry_s; restart the job
        once storage is back, it resumes from its last checkpoint (elt_scale/data/transport.py)
    74  a checkpoint, metrics.jsonl or the run directory could not be written (disk full, quota, EIO); the
        last complete checkpoint is kept; free space, then rerun (elt_scale/engine/checkpoint.py; never retried)
    75  preempted: checkpoint saved; requeue it (elt_scale/engine/preemption.py)
    124 a stalled step (elt_scale/engine/watchdog.py) or a silent rank: stopped, dead or cut off, seen by the
        heartbeats within train.heartbeat_timeout_s (elt_scale/engine/heartbeat.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .cli import ArgumentParser
from .config import RecipeError, load_recipe, save_recipe
from .data import check_data, make_loader
from .data.transport import STORAGE_EXIT_CODE, StorageUnavailable
from .engine import checkpoint as ckpt
from .engine import ds_internals, faults
from .engine.checkpoint import SAVE_FAILED_EXIT_CODE, SaveFailed
from .engine.distributed import collective_deadline_s, init_distributed
from .engine.ds_config import BatchMismatch, make_ds_config, set_lr
from .engine.goodput import Ledger, summary_line
from .engine.guard import AgreedFlags, NumericsGuard, NumericsStop, poison, term_flags
from .engine.heartbeat import Heartbeat
from .engine.live_eval import EvalSetupError, LiveEval, preflight
from .engine.logger import Reporter, Throughput, write_run_info
from .engine.preemption import PREEMPT_EXIT_CODE, PreemptionFlag
from .engine.resume import ResumeRefused, Started, start_engine
from .engine.watchdog import StepWatchdog
from .files import atomic_write_text, free_space
from .ilsd import draw_l_int, ilsd_loss
from .inference.load import RUN_TOKENIZER
from .objectives import build_objective
from .schedules import Schedules
from .seeding import generator

USER_ERRORS = (RecipeError, FileNotFoundError, ValueError, ds_internals.DeepSpeedMismatch, EvalSetupError)


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
        decoder = preflight(recipe, manifest["tokenizer"])   # eval's reference, Inception file, decoder: now
    except USER_ERRORS as e:
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    except StorageUnavailable as e:
        print(f"elt-train: {e.line()}; exiting {STORAGE_EXIT_CODE}", file=sys.stderr)
        return STORAGE_EXIT_CODE
    rank, world = init_distributed(collective_deadline_s(recipe))
    ledger = Ledger(recipe.run_dir, rank)                   # from this process's start: imports count
    heartbeat = Heartbeat(rank, world, recipe.train.heartbeat_timeout_s, lambda: ledger.phase,
                          lambda: ledger.last_step)
    status = train(recipe, manifest, resume_from, rank, world, decoder, ledger)
    heartbeat.stop()
    if status == STORAGE_EXIT_CODE:      # this rank alone: the others are waiting in a collective for it
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)                 # no teardown that could wait for them (as the step watchdog)
    # Only on a normal return: gloo's worker threads still hold tensors if the interpreter tears the process
    # group down itself, and exit aborts ("terminate called without an active exception", seen on a Slurm
    # rank). After an exception a collective teardown could hang on a rank that never arrives: let it die.
    dist.destroy_process_group()
    return status


# ---------------------------------------------------------------------------------------------------------
# one micro-batch, one step

def train_step(engine, objective, batch, recipe, schedules: Schedules, step: int, rank: int, micro: int):
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
        lam = schedules.lam(step + 1)
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


def run_step(s: Started, objective, loader, recipe, schedules: Schedules, step: int, rank: int,
             ledger: Ledger) -> StepResult:
    """All micro-batches of one global step on this rank, then the EMA. No host read of device values."""
    out, skipped_before = StepResult(), s.engine.skipped_steps
    for micro in range(recipe.train.grad_accum):
        with ledger.during("data_wait"):
            batch = next(loader)
        loss, terms, out.l_int, out.lam = train_step(s.engine, objective, batch, recipe, schedules, step, rank, micro)
        flags = term_flags(terms)
        out.bad = flags if out.bad is None else torch.maximum(out.bad, flags)
        for k, v in {"loss": loss, **terms}.items():
            out.sums[k] = out.sums[k] + v.detach().float() if k in out.sums else v.detach().float()
    out.skipped = s.engine.skipped_steps > skipped_before
    if s.ema and not out.skipped:
        s.ema.update()
    return out


def global_row(sums: dict, count: int, counters: dict) -> dict:
    """Loss terms summed over this rank's micro-batches -> their mean over the whole global batch, and the
    loader's counters (retries, seconds waited, skipped shards and samples since this attempt started) summed
    over ranks: one all-reduce, on logging steps only, by every rank; the logged curve is layout-free."""
    t = torch.cat([torch.stack(list(sums.values())),
                   torch.tensor(list(counters.values()), dtype=torch.float32).to(next(iter(sums.values())).device)])
    dist.all_reduce(t)
    values = t.tolist()
    row = {k: v / count for k, v in zip(sums, values)}
    row.update({k: (round(v, 3) if k.endswith("_s") else int(v)) for k, v in zip(counters, values[len(sums):])})
    return row


def as_float(x) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------
# the run

def save(started: Started, recipe, done: int, loader, result: StepResult, guard) -> None:
    """Collective: the train state as of step `done`, then every rank's checkpoint files."""
    s = started.state
    s.step, s.data_position, s.ilsd_lambda = done, loader.position, result.lam
    s.skipped_steps, s.bad_streak = guard.skipped, guard.streak
    ckpt.save(started.engine, recipe.run_dir / "ckpt", s, started.ema, recipe.train.keep_last)


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


def train(recipe, manifest: dict, resume_from, rank: int, world: int, decoder, ledger: Ledger) -> int:
    """The run itself, on an initialised process group. Returns the exit code (0, 2, 3, 69, 74 or 75)."""
    preempt = PreemptionFlag()                   # from here on a SIGTERM/SIGUSR1 waits for a step boundary
    try:
        ds_config = make_ds_config(recipe, world)
        started = start_engine(recipe, ds_config, resume_from, rank, world)
    except (BatchMismatch, ResumeRefused) as e:
        if rank == 0 or isinstance(e, BatchMismatch):
            print(f"elt-train: {e}", file=sys.stderr)
        return 2
    opened = open_run(recipe, started, world, ds_config, manifest, rank)
    if opened is None:
        return SAVE_FAILED_EXIT_CODE
    info, reporter = opened
    ledger.first_step = ledger.last_step = started.state.step
    ledger.open()
    for note in started.notes:
        reporter.say(note, error=True)
    reporter.say(start_line(recipe, info, world, started.state.step, resume_from) if info else "")
    try:
        live = LiveEval(recipe, rank, world, decoder, started.engine.device)
        live.prepare()                           # reference statistics: before step 1, split across ranks
        loader = make_loader(recipe, rank, world, started.state.data_position)
        return loop(recipe, started, loader, reporter, preempt, live, ledger, rank, world)
    except StorageUnavailable as e:              # this rank's reads; the others learn it when it leaves
        print(f"elt-train: rank {rank}: {e.line()}; exiting {STORAGE_EXIT_CODE}: restart the job once the "
              f"storage is back, it resumes from its last checkpoint", file=sys.stderr, flush=True)
        return STORAGE_EXIT_CODE
    except SaveFailed as e:                      # raised on every rank together
        reporter.say(f"{e}; exiting {SAVE_FAILED_EXIT_CODE}", error=True)
        return SAVE_FAILED_EXIT_CODE
    finally:
        reporter.close()


def loop(recipe, started: Started, loader, reporter, preempt, live: LiveEval, ledger: Ledger, rank: int,
         world: int) -> int:
    """The training steps from the resumed step on. Returns 0, 3, 74 (metrics.jsonl unwritable) or 75."""
    t = recipe.train
    schedules, objective = Schedules.of(recipe), build_objective(recipe)
    meter, flags = Throughput(recipe, world), AgreedFlags(started.engine.device)
    guard = NumericsGuard(t.max_bad_steps, started.state.skipped_steps, started.state.bad_streak)
    watchdog = StepWatchdog(t.watchdog_factor, t.watchdog_min_s, t.watchdog_first_s, rank,
                            excused=lambda: loader.in_outage)      # an outage has its own bound (exit 69)
    try:
        for step in range(started.state.step, t.steps):
            done = step + 1
            lr = set_lr(started.engine, schedules.lr(done))         # a function of the step: any layout, skips
            result = run_step(started, objective, loader, recipe, schedules, step, rank, ledger)
            meter.add(t.micro_batch * t.grad_accum * world)
            watchdog.beat(done)
            ledger.step_done(done)
            if step == started.state.step:           # the first step (compilation, warm-up) was start-up
                ledger.enter("training")
            flags.launch(done, result.skipped, result.bad, preempt.requested, reporter.write_error is not None)
            logged = done % t.log_every == 0 or done == t.steps
            due = logged or live.due(done) or (t.save_every and done % t.save_every == 0)
            preempted, write_failed = settle(flags, guard, done if due else done - 1)
            if preempted and not due:                # seen on some rank: this step becomes the last one
                preempted, write_failed = settle(flags, guard, done, preempted, write_failed)
            if write_failed:                         # rank 0's, agreed: every rank stops here
                return metrics_failed(reporter, recipe)
            preempted = preempted and done < t.steps                 # on the last step: just finish
            if logged or preempted:                  # the same on every rank
                row = global_row(result.sums, world * t.grad_accum, loader.counters())
                ledger.outage(loader.counters()["io_wait_s"])
                ledger.flush()                       # before the row: a kill between them leaves no step uncounted
                reporter.log({"step": done, **row, "lambda": result.lam, "l_int": result.l_int, "lr": lr,
                              "grad_norm": as_float(started.engine.get_global_grad_norm()),
                              "skipped_steps": guard.skipped, **meter.read(), "world_size": world})
            reporter.tick()
            if not preempted:                        # a preempted job saves and leaves: no sampling first
                with watchdog.paused(), ledger.during("eval"):     # sampling is not a slow step
                    live.after_step(done, started.engine, started.ema, reporter)
            if (t.save_every and done % t.save_every == 0) or done == t.steps or preempted:
                with watchdog.paused(), ledger.during("save"):     # long and legitimate: not a stalled step
                    save(started, recipe, done, loader, result, guard)
            if preempted:
                reporter.say(f"preempted ({preempt.signal_name or 'signal on another rank'}) at step {done}; "
                             f"checkpoint saved; exiting {PREEMPT_EXIT_CODE} to be requeued", error=True)
                return PREEMPT_EXIT_CODE
    except NumericsStop as e:
        reporter.say(f"stopping: {e}", error=True)
        return 3
    finally:
        watchdog.stop()
    if reporter.write_error:                         # the last step's row (rank 0): the run is done otherwise
        return metrics_failed(reporter, recipe)
    reporter.say(f"finished {t.steps} steps, {guard.skipped} skipped; run in {recipe.run_dir}")
    if total := ledger.flush():
        reporter.say(summary_line(total))
        add_to_run_info(recipe.run_dir, {"goodput": total})
    return 0


def add_to_run_info(run_dir, extra: dict) -> None:
    """Rank 0: keys merged into run_info.json (replaced whole); a full disk here loses nothing else."""
    path = run_dir / "run_info.json"
    try:
        atomic_write_text(path, json.dumps({**json.loads(path.read_text()), **extra}, indent=1))
    except (OSError, ValueError):
        pass


def settle(flags: AgreedFlags, guard: NumericsGuard, through: int, preempted: bool = False,
           write_failed: bool = False) -> tuple[bool, bool]:
    """The agreed flags of the steps up to `through` into the numerics guard (which may raise NumericsStop)
    -> whether any of them saw a preemption signal or rank 0's failed write (or'ed into the given ones)."""
    for step, skipped, bad, p, w in flags.settle(through):
        guard.after_step(step, skipped, bad)
        preempted, write_failed = preempted or p, write_failed or w
    return preempted, write_failed


def metrics_failed(reporter, recipe) -> int:
    reporter.say(f"cannot append to {reporter.write_error} ({free_space(recipe.run_dir)}); the file ends with "
                 f"the last whole row; free space or raise the quota, then rerun to resume from the last "
                 f"checkpoint; exiting {SAVE_FAILED_EXIT_CODE}", error=True)
    return SAVE_FAILED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
