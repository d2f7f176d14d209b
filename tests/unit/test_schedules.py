"""The schedules a recipe promises are the ones a run trains with: the logged learning rate and λ of real
runs equal the closed forms (linear warm-up, then cosine to min_lr_ratio; λ linear 1 → 0), also across a
step skipped for non-finite values (after a resume on another layout, 2 ranks -> 1 rank × accum 2:
tests/multiproc/test_schedules_ranks.py)."""
import math

import pytest

from elt_scale.config import load_recipe
from elt_scale.schedules import MEAN_MASK_RATIO, Schedules, mask_ratio
from tests.conftest import ROOT, ok, read_metrics, run_train

STEPS, WARMUP, LR, MIN_RATIO = 30, 20, 1e-3, 0.1
RUN = ("model.width=32", "train.micro_batch=8", "train.log_every=1", f"train.steps={STEPS}",
       f"train.warmup_steps={WARMUP}", f"train.lr={LR}", f"train.min_lr_ratio={MIN_RATIO}", "train.save_every=10", "train.keep_last=5")


def closed_lr(step: int, total: int = STEPS, warmup: int = WARMUP) -> float:
    """Written out independently of schedules.py: what the recipes' comments promise."""
    if step <= warmup:
        return LR * step / warmup
    progress = (step - warmup) / (total - warmup)
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def closed_lambda(step: int, total: int = STEPS) -> float:
    return 1.0 - (step - 1) / total


def schedules(*overrides):
    return Schedules.of(load_recipe(ROOT / "recipes" / "digits_masked.yaml", [*RUN, *overrides]))


def test_closed_forms():
    s = schedules()
    assert [s.lr(k) for k in range(1, STEPS + 1)] == pytest.approx([closed_lr(k) for k in range(1, STEPS + 1)])
    assert s.lr(5) == pytest.approx(LR * 5 / 20)               # linear: DeepSpeed's log ramp gave ~0.54 × peak
    assert s.lr(WARMUP) == pytest.approx(LR) and s.lr(STEPS) == pytest.approx(LR * MIN_RATIO)
    assert s.lam(1) == 1.0 and s.lam(STEPS + 1) == 0.0 and s.lam(16) == pytest.approx(0.5)
    assert s.l_int_range() == (1, 3)                            # digits_masked: L_max 4, min_loops 1
    assert schedules("ilsd.enabled=false").l_int_range() == (4, 4)
    assert schedules("ilsd.enabled=false").lam(7) == 1.0
    assert schedules("train.warmup_steps=0").lr(1) == pytest.approx(closed_lr(1, warmup=0))
    assert mask_ratio(0.0) == 1.0 and mask_ratio(1.0) == pytest.approx(0.0, abs=1e-12)
    assert MEAN_MASK_RATIO == pytest.approx(sum(mask_ratio((i + 0.5) / 1000) for i in range(1000)) / 1000, abs=1e-6)


def assert_logged_closed_forms(rows, steps, total: int = STEPS):
    by_step = {r["step"]: r for r in rows}
    for k in steps:
        assert by_step[k]["lr"] == pytest.approx(closed_lr(k, total), rel=1e-6), k
        assert by_step[k]["lambda"] == pytest.approx(closed_lambda(k, total), rel=1e-9), k
        assert 1 <= by_step[k]["l_int"] <= 3


def test_a_skipped_step_does_not_shift_the_schedule(tmp_path, digits_shards):
    """Step 3 is skipped (NaN student exit): the lr of every step, the skipped one included, is the closed form
    of its step number (DeepSpeed's scheduler would have held still and lagged one step behind ever after)."""
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=skip",
                  *RUN, "train.steps=25", "train.save_every=0", env={"ELT_FAULT": "nan_steps:3"})
    ok(r)
    rows = read_metrics(tmp_path / "skip")
    assert [row["skipped_steps"] for row in rows][1:4] == [0, 1, 1]
    assert rows[2]["loss_student"] is None
    assert_logged_closed_forms(rows, range(1, 26), total=25)
