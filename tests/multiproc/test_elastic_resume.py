"""Universal resume: a checkpoint resumed on another world size or ZeRO stage keeps Adam's moments and step
counts (real DeepSpeed runs, CPU, gloo). tests/resume_probe.py records Adam's state by parameter name right
after each save and right after the cross-layout load, through DeepSpeed's public getters.

One chain of runs, shared through a module fixture (each launch costs ~20-90 s on 2 busy cores):
    A  2 ranks ZeRO-2, steps 1-3                   (the reference)
    B  A@2 -> 1 rank ZeRO-2, step 3                (DeepSpeed's universal load)
    C  A@2 -> 2 ranks ZeRO-3, step 3               (own per-parameter load; same data as A, so step 3 = A's)
    D  B@3 -> 2 ranks ZeRO-2, step 4               (1 -> 2 ranks, DeepSpeed's universal load)
    E  C@3 -> 1 rank ZeRO-1, step 4                (ZeRO-3 -> ZeRO-1, own per-parameter load)
    F  B@3 -> 1 rank stage 0, step 4               (own load into our unwrapped torch optimizer)"""
import os
import subprocess
import sys

import pytest
import torch

from elt_scale.dist import free_port
from elt_scale.engine import checkpoint as ckpt
from elt_scale.engine import universal
from tests.conftest import ROOT, copy_checkpoint, ok

pytestmark = pytest.mark.multiproc

TINY = ("model.width=32", "train.micro_batch=8", "train.log_every=1", "train.warmup_steps=1", "train.ema_decay=0.9",
        "train.save_every=1", "train.keep_last=10")


def probe(shards, run_dir, probe_dir, nprocs, *overrides):
    """elt-train through the probe; returns the finished process."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    script = [str(ROOT / "tests" / "resume_probe.py"), str(ROOT / "recipes" / "digits_masked.yaml"),
              f"data.shards={shards}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *TINY, *overrides]
    cmd = ([sys.executable, *script] if nprocs == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), *script])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(ELT_PROBE_DIR=str(probe_dir), PYTHONPATH=str(ROOT))
    return ok(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))


CHAIN = {"A": (2, 2, 3, None, None), "B": (1, 2, 3, "A", 2), "C": (2, 3, 3, "A", 2), "D": (2, 2, 4, "B", 3),
         "E": (1, 1, 4, "C", 3), "F": (1, 0, 4, "B", 3)}     # name: (ranks, ZeRO stage, train.steps, resumed from run, at step)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_shards):
    """chain(name) -> (its probe folder, its finished process), running the runs it resumes from first."""
    root = tmp_path_factory.mktemp("elastic")
    done = {}

    def get(name):
        if name not in done:
            nprocs, stage, steps, source, at = CHAIN[name]
            if source:
                get(source)
                copy_checkpoint(root / source, root / name, at)
            done[name] = probe(digits_shards, root / name, root / f"probe_{name}", nprocs,
                               f"deepspeed.zero_stage={stage}", f"train.steps={steps}")
        return root / f"probe_{name}", done[name]
    get.root = root
    return get


def load(path):
    return torch.load(path, weights_only=False)


def assert_same_adam(got, want, tol=None):
    """Equal Adam state by name: bitwise unless `tol` gives {key: dict(rtol=, atol=)}."""
    assert got["step"] == want["step"] and len(got["step"]) == 1, (got["step"], want["step"])
    names = [n for n in want if n != "step"]
    assert sorted(n for n in got if n != "step") == sorted(names)
    for n in names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[n][key].view(-1), want[n][key].view(-1), msg=f"{n} {key}",
                                       **(tol or {}).get(key, {"rtol": 0, "atol": 0}))


@pytest.mark.parametrize("name,source,at,world,stage,how", [
    ("B", "A", 2, 2, 2, universal.DEEPSPEED_LOAD),
    ("C", "A", 2, 2, 2, universal.OWN_LOAD),
    ("D", "B", 3, 1, 2, universal.DEEPSPEED_LOAD),
    ("E", "C", 3, 2, 3, universal.OWN_LOAD),
    ("F", "B", 3, 1, 2, universal.OWN_LOAD),
])
def test_resume_on_another_layout_keeps_adam_state(chain, name, source, at, world, stage, how):
    """Right after the load: fp32 master weights, exp_avg, exp_avg_sq and Adam's step equal the saved ones
    (bitwise, by name, all ranks' partitions together), and stderr says which path loaded them."""
    probe_dir, r = chain(name)
    loaded = load(probe_dir / "loaded.pt")
    assert loaded["step"] == [float(at)]
    assert_same_adam(loaded, load(chain.root / f"probe_{source}" / f"saved_{at}.pt"))
    assert f"optimizer state from layout (world {world}, ZeRO-{stage}) loaded by {how}" in r.stderr
    assert (chain.root / name / "ckpt" / ckpt.tag_for(at) / universal.UNIVERSAL / "zero").is_dir()   # cached


def test_first_step_after_zero_stage_change_continues_adam(chain):
    """ZeRO-2 -> ZeRO-3 on the same 2 ranks sees the same batches, so step 3's update from the carried-over
    moments equals the straight ZeRO-2 run's (up to reduction order); with moments reset it would not.
    Weights get a looser bound: the attention key bias has an exactly-zero gradient, so its Adam update is
    reduction-order noise divided by its own square root (~1e-6 here, against ~2e-3 for every real update)."""
    probe_c, _ = chain("C")
    straight = load(chain.root / "probe_A" / "saved_3.pt")
    moments = dict(rtol=1e-5, atol=1e-8)
    assert_same_adam(load(probe_c / "saved_3.pt"), straight,
                     {"fp32": dict(rtol=0, atol=1e-5), "exp_avg": moments, "exp_avg_sq": moments})
    before = load(chain.root / "probe_A" / "saved_2.pt")
    assert any(not torch.allclose(straight[n]["exp_avg"], before[n]["exp_avg"]) for n in before if n != "step")


def test_loss_curve_continues_on_another_world_size(tmp_path, digits_shards):
    """20 steps on 2 ranks vs 10 on 2 ranks then 11-20 on 1 rank × grad_accum 2 (same global batch): every
    step's loss agrees within 1e-4 relative (the data order, the random draws and the logged global-batch mean
    are layout-free, and Adam's state is carried over)."""
    from tests.conftest import read_metrics, run_train
    common = (f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "model.width=32", "train.micro_batch=8",
              "train.log_every=1", "train.warmup_steps=1", "train.steps=20", "train.save_every=10",
              "deepspeed.zero_stage=2")
    ok(run_train("digits_masked.yaml", *common, "run.name=straight", nprocs=2))
    copy_checkpoint(tmp_path / "straight", tmp_path / "elastic", 10)
    ok(run_train("digits_masked.yaml", *common, "run.name=elastic", "train.grad_accum=2", nprocs=1))
    got, want = read_metrics(tmp_path / "elastic"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 21))
    for g, w in zip(got[10:], want[10:]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
