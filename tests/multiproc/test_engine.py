"""The distributed engine on real multi-process DeepSpeed (CPU, gloo, 2 ranks): ZeRO 1-3, EMA,
exact resume, resume on another world size, a save killed half-way, preemption, the numerics guard.

Runs are tiny (width 32, micro-batch 8, 4 steps) and shared between tests through module fixtures:
one straight 4-step run per ZeRO stage with a checkpoint after every step is the reference."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine import checkpoint as ckpt
from elt_scale.engine.guard import GuardedAdamW
from elt_scale.engine.preemption import PREEMPT_EXIT_CODE
from elt_scale.inference.weights import consolidated_ema as consolidate
from elt_scale.inference.weights import consolidated_weights
from elt_scale.models import build_model
from elt_scale.schedules import Schedules
from tests.conftest import ROOT, copy_checkpoint, ok, read_metrics, run_train, train_cmd

pytestmark = pytest.mark.multiproc

STEPS, DECAY = 4, 0.9
TINY = ("model.width=32", "train.micro_batch=8", "train.log_every=1", "train.warmup_steps=1",
        f"train.steps={STEPS}", f"train.ema_decay={DECAY}", "train.save_every=1", "train.keep_last=10")
LOSS_KEYS = ("loss", "loss_teacher", "loss_student", "loss_distill", "l_int", "lambda", "lr", "grad_norm")


def args(shards, out, name, *more):
    return (f"data.shards={shards}", f"run.out_dir={out}", f"run.name={name}", *TINY, *more)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, digits_shards):
    """4 steps straight on 2 ranks per ZeRO stage (ZeRO-3 with per-loop activation checkpointing)."""
    out = tmp_path_factory.mktemp("straight")
    runs = {}

    def get(stage: int):
        if stage not in runs:
            extra = ["train.checkpointing=loop"] if stage == 3 else []
            r = ok(run_train("digits_masked.yaml", *args(digits_shards, out, f"z{stage}", f"deepspeed.zero_stage={stage}",
                                                         *extra), nprocs=2))
            runs[stage] = (out / f"z{stage}", r)
        return runs[stage]
    return get


def weights(run_dir, step):
    return consolidated_weights(run_dir / "ckpt" / ckpt.tag_for(step))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_ema_matches_consolidated_weights(straight, stage):
    run_dir, r = straight(stage)
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss_teacher"] < rows[0]["loss_teacher"], [row["loss_teacher"] for row in rows]
    for key in ("grad_norm", "skipped_steps", "samples_per_s", "tokens_per_s", "tflops", "peak_mem_gb", "world_size"):
        assert rows[-1][key] is not None, key
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["zero_stage"], info["global_batch"]) == (2, stage, 16)
    assert info["effective_params"] > info["unique_params"] > 0
    if stage == 3:
        assert "Invalidate trace cache" not in r.stdout + r.stderr   # same module order every step
    # EMA, recomputed here from the initial weights and the consolidated fp32 weights after every step
    recipe = load_recipe(run_dir / "recipe.yaml")
    torch.manual_seed(recipe.run.seed)
    ema = {n: p.detach().clone() for n, p in build_model(recipe).named_parameters()}
    for step in range(1, STEPS + 1):
        w = weights(run_dir, step)
        ema = {n: e.lerp(w[n], 1 - DECAY) for n, e in ema.items()}
        got = consolidate(run_dir / "ckpt" / ckpt.tag_for(step))
        assert set(got) == set(ema)
        for n in ema:
            torch.testing.assert_close(got[n], ema[n], rtol=0, atol=1e-6, msg=f"stage {stage} step {step} {n}")


def same_rows(a, b):
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in LOSS_KEYS + ("step",)} == {k: rb[k] for k in LOSS_KEYS + ("step",)}


def assert_same_state(run_a, run_b, step):
    wa, wb = weights(run_a, step), weights(run_b, step)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    ea, eb = (consolidate(r / "ckpt" / ckpt.tag_for(step)) for r in (run_a, run_b))
    assert all(torch.equal(ea[n], eb[n]) for n in ea)


def test_exact_resume_zero3(straight, tmp_path, digits_shards):
    ref, _ = straight(3)
    copy_checkpoint(ref, tmp_path / "z3", 2)
    ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "z3", "deepspeed.zero_stage=3",
                                             "train.checkpointing=loop"), nprocs=2))
    same_rows(read_metrics(tmp_path / "z3"), read_metrics(ref))       # bitwise: losses, L_int, λ, lr, grad norm
    assert_same_state(ref, tmp_path / "z3", STEPS)                    # weights and EMA


def test_resume_on_another_zero_stage(straight, tmp_path, digits_shards):
    """ZeRO-2 checkpoint -> ZeRO-3 run on the same 2 ranks: fp32 weights consolidated, EMA re-sliced and Adam's
    moments loaded per parameter, so step 3's loss (the resumed weights, same batch and masks) and step 4's
    (after an update from the carried-over moments) equal the straight run's."""
    ref, _ = straight(2)
    copy_checkpoint(ref, tmp_path / "z2to3", 2)
    r = ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "z2to3", "deepspeed.zero_stage=3"), nprocs=2))
    assert "optimizer state from layout (world 2, ZeRO-2) loaded by own per-parameter load" in r.stderr
    rows, want = read_metrics(tmp_path / "z2to3"), read_metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[2]["loss"] == pytest.approx(want[2]["loss"], rel=1e-5)
    assert rows[3]["loss"] == pytest.approx(want[3]["loss"], rel=1e-5)
    assert (rows[3]["lr"], rows[3]["l_int"]) == (want[3]["lr"], want[3]["l_int"])
    consolidate(tmp_path / "z2to3" / "ckpt" / ckpt.tag_for(STEPS))


@pytest.mark.parametrize("stage,offload", [(2, ("deepspeed.offload_optimizer=true",)),
                                          (3, ("deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"))])
def test_offload_trains_and_resumes_exactly(stage, offload, tmp_path, digits_shards):
    """ZeRO-Offload (DeepSpeed's CPU Adam, params in host memory under ZeRO-3): a run stopped at step 2
    and resumed is bitwise the straight run."""
    extra = (f"deepspeed.zero_stage={stage}", *offload)
    ref = tmp_path / "straight"
    ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "straight", *extra), nprocs=2))
    copy_checkpoint(ref, tmp_path / "resumed", 2)
    ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "resumed", *extra), nprocs=2))
    same_rows(read_metrics(tmp_path / "resumed"), read_metrics(ref))
    assert_same_state(ref, tmp_path / "resumed", STEPS)


def wait_for_step(run_dir, step, proc, old_inode, timeout=300):
    """Until the resumed run (which rewrites metrics.jsonl, so a new inode) has logged `step`."""
    t0, path = time.time(), run_dir / "metrics.jsonl"
    while time.time() - t0 < timeout and proc.poll() is None:
        if path.stat().st_ino != old_inode and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged (rc={proc.poll()})")


def rank_pids(proc):
    return sorted(p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                  if "elt_scale.train" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline()))


def test_killed_save_then_preemption_then_exact_resume_zero2(straight, tmp_path, digits_shards):
    """One 4-step ZeRO-2 run, interrupted twice: (1) every rank is SIGKILLed inside the save of step 2,
    after DeepSpeed wrote its files but before 'latest' moved, and one shard is truncated besides;
    (2) SIGUSR1 to rank 1 only -> both ranks save and exit 75; (3) resume to the end. Every step is in
    metrics.jsonl exactly once and the losses, weights and EMA equal the straight run's bitwise."""
    ref, _ = straight(2)
    run = tmp_path / "z2"
    a = args(digits_shards, tmp_path, "z2", "deepspeed.zero_stage=2")
    r = run_train("digits_masked.yaml", *a, nprocs=2, env={"ELT_FAULT": "kill_in_save:2"})
    assert r.returncode not in (0, PREEMPT_EXIT_CODE)
    assert ckpt.read_pointer(run / "ckpt") == "step_00000001"
    half_written = run / "ckpt" / "step_00000002"
    victim = sorted(half_written.glob("*optim_states.pt"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    inode = (run / "metrics.jsonl").stat().st_ino
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(train_cmd("digits_masked.yaml", *a, nprocs=2), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(run, 2, proc, inode)
    pids = rank_pids(proc)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPT_EXIT_CODE, err[-3000:]
    assert "preempted" in err
    stopped = int(ckpt.read_pointer(run / "ckpt").split("_")[1])
    assert 2 <= stopped < STEPS and [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 1))
    wandb_id = ckpt.read_client(run / "ckpt" / ckpt.tag_for(stopped))["wandb_id"]

    r = ok(run_train("digits_masked.yaml", *a, nprocs=2, env={"WANDB_MODE": "offline"}))
    assert f"resumed from {run / 'ckpt' / ckpt.tag_for(stopped)}" in r.stdout + r.stderr
    same_rows(read_metrics(run), read_metrics(ref))         # steps 1..4 exactly once, equal to the straight run
    assert_same_state(ref, run, STEPS)
    assert ckpt.read_client(run / "ckpt" / ckpt.tag_for(STEPS))["wandb_id"] == wandb_id
    assert list((run / "wandb").glob(f"offline-run-*-{wandb_id}")), "resumed run continues the same wandb run"


def test_resume_on_one_rank_from_two_rank_checkpoint(straight, tmp_path, digits_shards):
    """World 2 -> 1: weights (consolidated), EMA (re-sliced), Adam's moments and step (DeepSpeed's universal
    checkpoint), LR schedule and λ continue; the data stream is the one-rank stream, so losses differ from the
    2-rank run (tests/multiproc/test_elastic_resume.py checks the moments themselves)."""
    ref, _ = straight(2)
    copy_checkpoint(ref, tmp_path / "one", 2)
    r = ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "one", "deepspeed.zero_stage=2",
                                                 "train.keep_last=2"), nprocs=1))
    rows = read_metrics(tmp_path / "one")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    ref_rows = read_metrics(ref)
    for row, want in zip(rows[2:], ref_rows[2:]):
        assert (row["lr"], row["lambda"], row["l_int"], row["world_size"]) == (want["lr"], want["lambda"], want["l_int"], 1)
    info = json.loads((tmp_path / "one" / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["global_batch"] == 8
    consolidate(tmp_path / "one" / "ckpt" / ckpt.tag_for(STEPS))      # one rank's EMA file covers everything
    assert sorted(p.name for p in (tmp_path / "one" / "ckpt").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert "resumed from" in r.stdout + r.stderr
    assert "optimizer state from layout (world 2, ZeRO-2) loaded by DeepSpeed universal checkpoint" in r.stderr


def test_nan_steps_skipped_counted_then_k_in_a_row_stop(tmp_path, digits_shards):
    """NaN in rank 0's student exit at step 2 (skipped, counted, LR held), then at 4, 5, 6 with K=3: stop."""
    r = run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "nan", "deepspeed.zero_stage=1",
                                              "train.steps=8", "train.save_every=0", "train.max_bad_steps=3"),
                  nprocs=2, env={"ELT_FAULT": "nan_steps:2,4,5,6"})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "3 consecutive bad steps" in r.stderr and "step 6: non-finite loss_student" in r.stderr
    rows = read_metrics(tmp_path / "nan")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1, 2, 3]
    assert rows[1]["loss_student"] is None and rows[1]["loss_teacher"] is not None
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml", [*TINY, "train.steps=8"])
    assert [row["lr"] for row in rows] == pytest.approx([Schedules.of(recipe).lr(k) for k in range(1, 6)])  # a skip holds no schedule
    assert rows[2]["grad_norm"] is not None


def test_guarded_adamw_skips_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], max_grad_norm=1.0, lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.data, torch.ones(3)) and not opt.state
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(5.0) and not torch.equal(p.data, torch.ones(3))


def test_the_global_batch_holds_on_any_world_size(tmp_path, digits_shards):
    """train.global_batch=32 with micro-batch 16: one rank accumulates 2 micro-batches, two ranks 1 each; the
    same samples and draws, so the same loss at every step (issue: every launch line exited 2)."""
    fixed = ("train.global_batch=32", "train.micro_batch=16", "train.steps=3", "train.save_every=0")
    runs = {}
    for world in (1, 2):
        name = f"w{world}"
        r = ok(run_train("digits_masked.yaml", *args(digits_shards, tmp_path, name), *fixed, nprocs=world))
        info = json.loads((tmp_path / name / "run_info.json").read_text())
        assert (info["micro_batch"], info["grad_accum"], info["global_batch"]) == (16, 2 // world, 32)
        assert info.get("batch_layout") == (None if world == 2 else   # the recipe's accumulation, 1, fits 2 ranks
                                            "train.grad_accum=2 (recipe: 1) keep train.global_batch=32 on 1 ranks")
        assert f"32 = 16 micro × {2 // world} accum × {world} ranks" in r.stdout + r.stderr
        runs[world] = read_metrics(tmp_path / name)
    assert [row["step"] for row in runs[1]] == [row["step"] for row in runs[2]] == [1, 2, 3]
    for one, two in zip(runs[1], runs[2]):
        for key in ("loss", "loss_teacher", "loss_student", "loss_distill"):
            assert one[key] == pytest.approx(two[key], abs=1e-4), (one["step"], key)


def test_a_world_that_cannot_split_the_global_batch_exits_2_naming_those_that_can(tmp_path, digits_shards):
    start = time.monotonic()
    r = run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "w3"), "train.global_batch=32",
                  "train.micro_batch=16", nprocs=3)
    assert r.returncode != 0 and time.monotonic() - start < 60
    lines = [ln for ln in r.stderr.splitlines() if "cannot be split" in ln]
    assert len(lines) == 1, r.stderr[-3000:]          # rank 0 says it; the others exit without repeating it
    assert lines[0].startswith("elt-train: train.global_batch=32 cannot be split over 3 ranks; world sizes that can: "
                               "1, 2, 4, 8, 16, 32"), lines
    assert not (tmp_path / "w3").exists()             # before DeepSpeed or a run directory


def test_an_override_that_contradicts_the_global_batch_is_refused(tmp_path, digits_shards):
    r = run_train("digits_masked.yaml", *args(digits_shards, tmp_path, "gb"), "train.global_batch=64",
                  "train.grad_accum=3")
    assert r.returncode == 2
    assert ("train.global_batch=64 cannot be split over 1 ranks with train.grad_accum=3 (micro-batch at most 8); world "
            "sizes that can: none") in r.stderr
