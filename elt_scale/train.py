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
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .batching import BatchLayoutError, accum_given, batch_layout, with_layout
from .cli import ArgumentParser
from .config import RecipeError, load_recipe
from .data import check_data, make_loader
from .data.transport import STORAGE_EXIT_CODE, StorageUnavailable
from .dist import launcher_env, local_ranks, rendezvous, set_threads
from .engine import checkpoint as ckpt
from .engine import ds_internals, faults
from .engine.checkpoint import SAVE_FAILED_EXIT_CODE, SaveFailed
from .engine.distributed import collective_deadline_s, init_distributed
from .engine.goodput import Ledger, summary_line
from .engine.guard import AgreedFlags, NumericsGuard, NumericsStop, poison, term_flags
from .engine.heartbeat import Heartbeat
from .engine.live_eval import EvalSetupError, LiveEval, preflight
from .engine.logger import Reporter, Throughput
from .engine.preemption import PREEMPT_EXIT_CODE, PreemptionFlag
from .engine.resume import BatchMismatch, ResumeRefused, Started, make_ds_config, set_lr, start_engine
from .engine.rundir import add_to_run_info, open_run, start_line
from .engine.startup import waiting
from .engine.watchdog import StepWatchdog
from .files import free_space
from .objectives import draw_l_int, ilsd_loss
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
    set_threads()
    rank, world = launcher_env()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        layout = batch_layout(recipe.train, world, accum_given(args.overrides), local_ranks())
        recipe = with_layout(recipe, layout)   # grad_accum (micro_batch) for this world: before anything reads them
        manifest, _ = check_data(recipe)     # missing or mismatched shards: before a run dir or DeepSpeed exists
        ds_internals.check()                 # a DeepSpeed whose internals we do not know: before any work
        resume_from = ckpt.find_resume(recipe.train.resume, recipe.run_dir / "ckpt")
        decoder = preflight(recipe, manifest["tokenizer"])   # eval's reference, Inception file, decoder: now
    except USER_ERRORS as e:
        if rank and isinstance(e, BatchLayoutError):   # the same line on every rank: rank 0's is enough, and a
            time.sleep(10)                             # launcher ends the others once it has left (if not: say it)
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    except StorageUnavailable as e:
        print(f"elt-train: {e.line()}; exiting {STORAGE_EXIT_CODE}", file=sys.stderr)
        return STORAGE_EXIT_CODE
    with waiting(f"the rendezvous at {rendezvous()} and DeepSpeed's process group", recipe.train.startup_timeout_s,
                 recipe.train.stale_lock_s):
        rank, world = init_distributed(collective_deadline_s(recipe))
    ledger = Ledger(recipe.run_dir, rank)                   # from this process's start: imports count
    heartbeat = Heartbeat(rank, world, recipe.train.heartbeat_timeout_s, lambda: ledger.phase,
                          lambda: ledger.last_step)
    status = train(recipe, manifest, resume_from, rank, world, decoder, ledger, layout.note)
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

def micro_step(engine, objective, batch, recipe, schedules: Schedules, step: int, rank: int, micro: int):
    """One micro-batch: ILSD exits from one forward pass, loss, backward. Returns (loss, terms, l_int, λ).
    Every random draw comes from (seed, step, j), j = rank * grad_accum + micro the micro-batch's place in
    the global batch: the same draws on any layout and after a resume. On the training device, so preparing
    a batch needs no copy from the host (the CPU and CUDA streams differ; each is reproducible)."""
    r = recipe
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


def train_step(run: "Run", step: int) -> StepResult:
    """One global step on this rank: for each micro-batch the next batch, forward and backward (the optimizer
    steps at the last one, DeepSpeed's accumulation boundary), then the EMA. No host read of device values."""
    s, out, skipped_before = run.started, StepResult(), run.started.engine.skipped_steps
    for micro in range(run.recipe.train.grad_accum):
        with run.ledger.during("data_wait"):
            batch = next(run.loader)
        loss, terms, out.l_int, out.lam = micro_step(s.engine, run.objective, batch, run.recipe, run.schedules, step,
                                                     run.rank, micro)
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

class RunEnded(Exception):
    """The run stops early; str(e) is the line rank 0 says, `code` the exit code."""
    code = 1


class Preempted(RunEnded):
    code = PREEMPT_EXIT_CODE


class MetricsUnwritable(RunEnded):
    code = SAVE_FAILED_EXIT_CODE


# Every way a run ends early, and its exit code: the one place they are mapped (slurm/train_large.sh reads them).
EXIT_CODES = {Preempted: PREEMPT_EXIT_CODE, MetricsUnwritable: SAVE_FAILED_EXIT_CODE, NumericsStop: 3,
              StorageUnavailable: STORAGE_EXIT_CODE, SaveFailed: SAVE_FAILED_EXIT_CODE}


@dataclass
class Run:
    """What the loop works with, built once by `train`."""
    recipe: object
    started: Started
    loader: object
    reporter: Reporter
    live: LiveEval
    ledger: Ledger
    preempt: PreemptionFlag
    rank: int
    world: int
    schedules: Schedules
    objective: object
    meter: Throughput
    flags: AgreedFlags
    guard: NumericsGuard
    watchdog: StepWatchdog


def train(recipe, manifest: dict, resume_from, rank: int, world: int, decoder, ledger: Ledger,
          layout_note: str = "") -> int:
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
    faults.install(started.engine.module, rank, started.state.step, recipe.train.grad_accum)   # test-only: ELT_FAULT
    ledger.first_step = ledger.last_step = started.state.step
    ledger.open()
    for note in started.notes:
        reporter.say(note, error=True)
    if layout_note:
        reporter.say(f"batch layout: {layout_note}")
        if rank == 0:
            add_to_run_info(recipe.run_dir, {"batch_layout": layout_note})
    reporter.say(start_line(recipe, info, world, started.state.step, resume_from) if info else "")
    run = None
    try:
        live = LiveEval(recipe, rank, world, decoder, started.engine.device)
        live.prepare()                           # reference statistics: before step 1, split across ranks
        run = new_run(recipe, started, make_loader(recipe, rank, world, started.state.data_position), reporter,
                      live, ledger, preempt, rank, world)
        loop(run)
        return finish(run)
    except tuple(EXIT_CODES) as e:
        return ended(e, reporter, rank, recipe)
    finally:
        if run is not None:
            run.watchdog.stop()
        reporter.close()


def new_run(recipe, started, loader, reporter, live, ledger, preempt, rank: int, world: int) -> Run:
    t = recipe.train
    return Run(recipe, started, loader, reporter, live, ledger, preempt, rank, world, Schedules.of(recipe),
               build_objective(recipe), Throughput(recipe, world), AgreedFlags(started.engine.device),
               NumericsGuard(t.max_bad_steps, started.state.skipped_steps, started.state.bad_streak),
               StepWatchdog(t.watchdog_factor, t.watchdog_min_s, t.watchdog_first_s, rank,
                            excused=lambda: loader.in_outage))     # an outage has its own bound (exit 69)


def loop(run: Run) -> None:
    """The training steps from the resumed step on; an early end is raised (RunEnded, NumericsStop, ...)."""
    for step in range(run.started.state.step, run.recipe.train.steps):
        done = step + 1
        lr = set_lr(run.started.engine, run.schedules.lr(done))      # a function of the step: any layout, skips
        result = train_step(run, step)
        due = after_step(run, done, result, first=step == run.started.state.step)
        if due.log:
            log_step(run, done, result, lr)
        run.reporter.tick()
        if due.evaluate:
            with run.watchdog.paused(), run.ledger.during("eval"):      # sampling is not a slow step
                run.live.after_step(done, run.started.engine, run.started.ema, run.reporter)
        if due.save:
            with run.watchdog.paused(), run.ledger.during("save"):      # long and legitimate: not a stalled step
                save(run, done, result)
        if due.preempted:
            raise Preempted(f"preempted ({run.preempt.signal_name or 'signal on another rank'}) at step {done}; "
                            f"checkpoint saved; exiting {PREEMPT_EXIT_CODE} to be requeued")


@dataclass
class Due:
    log: bool
    evaluate: bool
    save: bool
    preempted: bool


def after_step(run: Run, done: int, result: StepResult, first: bool) -> Due:
    """The step's bookkeeping (throughput, watchdog, ledger), its flags sent (a non-blocking all-reduce), the
    flags needed now settled into the numerics guard (may raise NumericsStop) -> what this step does besides."""
    t, reporter = run.recipe.train, run.reporter
    run.meter.add(t.micro_batch * t.grad_accum * run.world)
    run.watchdog.beat(done)
    run.ledger.step_done(done)
    if first:                                    # the first step (compilation, warm-up) was start-up
        run.ledger.enter("training")
    run.flags.launch(done, result.skipped, result.bad, run.preempt.requested, reporter.write_error is not None)
    log = done % t.log_every == 0 or done == t.steps
    evaluate = run.live.due(done)
    save_due = bool(t.save_every and done % t.save_every == 0) or done == t.steps
    preempted, write_failed = settle(run.flags, run.guard, done if log or evaluate or save_due else done - 1)
    if preempted and not (log or evaluate or save_due):   # seen on some rank: this step becomes the last one
        preempted, write_failed = settle(run.flags, run.guard, done, preempted, write_failed)
    if write_failed:                             # rank 0's, agreed: every rank stops here
        raise MetricsUnwritable(metrics_failed_line(reporter, run.recipe))
    preempted = preempted and done < t.steps     # on the last step: just finish
    return Due(log or preempted, evaluate and not preempted, save_due or preempted, preempted)


def settle(flags: AgreedFlags, guard: NumericsGuard, through: int, preempted: bool = False,
           write_failed: bool = False) -> tuple[bool, bool]:
    """The agreed flags of the steps up to `through` into the numerics guard (which may raise NumericsStop)
    -> whether any of them saw a preemption signal or rank 0's failed write (or'ed into the given ones)."""
    for step, skipped, bad, p, w in flags.settle(through):
        guard.after_step(step, skipped, bad)
        preempted, write_failed = preempted or p, write_failed or w
    return preempted, write_failed


def log_step(run: Run, done: int, result: StepResult, lr: float) -> None:
    """One metrics row, the same on every rank (one all-reduce): the ledger first, so a kill between the two
    leaves no logged step uncounted."""
    row = global_row(result.sums, run.world * run.recipe.train.grad_accum, run.loader.counters())
    run.ledger.outage(run.loader.counters()["io_wait_s"])
    run.ledger.flush()
    run.reporter.log({"step": done, **row, "lambda": result.lam, "l_int": result.l_int, "lr": lr,
                      "grad_norm": as_float(run.started.engine.get_global_grad_norm()),
                      "skipped_steps": run.guard.skipped, **run.meter.read(), "world_size": run.world})


def save(run: Run, done: int, result: StepResult) -> None:
    """Collective: the train state as of step `done`, then every rank's checkpoint files."""
    s = run.started.state
    s.step, s.data_position, s.ilsd_lambda = done, run.loader.position, result.lam
    s.skipped_steps, s.bad_streak = run.guard.skipped, run.guard.streak
    ckpt.save(run.started.engine, run.recipe.run_dir / "ckpt", s, run.started.ema, run.recipe.train.keep_last)


def finish(run: Run) -> int:
    """After the last step: the closing lines, the goodput into run_info.json. Returns 0 (74 if the last
    metrics row could not be written)."""
    if run.reporter.write_error:                 # the last step's row (rank 0): the run is done otherwise
        raise MetricsUnwritable(metrics_failed_line(run.reporter, run.recipe))
    run.reporter.say(f"finished {run.recipe.train.steps} steps, {run.guard.skipped} skipped; run in "
                     f"{run.recipe.run_dir}")
    if total := run.ledger.flush():
        run.reporter.say(summary_line(total))
        add_to_run_info(run.recipe.run_dir, {"goodput": total})
    return 0


def ended(e: Exception, reporter: Reporter, rank: int, recipe) -> int:
    """An early end: its one line, and its exit code (EXIT_CODES)."""
    code = next(c for kind, c in EXIT_CODES.items() if isinstance(e, kind))
    if isinstance(e, StorageUnavailable):        # this rank's reads; the others learn it when it leaves
        print(f"elt-train: rank {rank}: {e.line()}; exiting {code}: restart the job once the storage is back, it "
              f"resumes from its last checkpoint", file=sys.stderr, flush=True)
    elif isinstance(e, NumericsStop):
        reporter.say(f"stopping: {e}", error=True)
    elif isinstance(e, SaveFailed):              # raised on every rank together
        reporter.say(f"{e}; exiting {code}", error=True)
    else:
        reporter.say(str(e), error=True)
    return code


def metrics_failed_line(reporter, recipe) -> str:
    return (f"cannot append to {reporter.write_error} ({free_space(recipe.run_dir)}); the file ends with the last "
            f"whole row; free space or raise the quota, then rerun to resume from the last checkpoint; exiting "
            f"{SAVE_FAILED_EXIT_CODE}")


def run() -> None:
    """The command's entry point (`elt-train`, `python -m elt_scale.train`): main(), then, on a launched rank,
    os._exit once everything is written and the process group destroyed. Interpreter teardown still frees
    process groups DeepSpeed holds references to, and gloo's C++ threads can abort the process there
    (SIGABRT, "terminate called without an active exception", launcher exit 250) after a finished run: rare
    since destroy_process_group() (1 of ~150 two-rank CI launches), but a finished run must exit 0.
    main() stays importable without this (tests and probes call it in-process)."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
