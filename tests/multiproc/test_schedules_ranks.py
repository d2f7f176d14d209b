"""The logged learning rate and λ of a real 2-rank run equal the closed forms, also after a resume on another
layout (2 ranks -> 1 rank × accum 2). The closed forms themselves and a skipped step:
tests/unit/test_schedules.py (whose recipe and checks this file uses)."""
import pytest

from tests.conftest import copy_checkpoint, ok, read_metrics, run_train
from tests.unit.test_schedules import RUN, STEPS, assert_logged_closed_forms


@pytest.mark.multiproc
def test_logged_lr_and_lambda_follow_closed_forms_across_a_layout_change(tmp_path, digits_shards):
    common = (f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", *RUN)
    two = tmp_path / "two"
    ok(run_train("digits_masked.yaml", *common, "run.name=two", "deepspeed.zero_stage=2", nprocs=2))
    rows = read_metrics(two)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_logged_closed_forms(rows, range(1, STEPS + 1))

    # the 2-rank run's step-10 checkpoint, resumed on 1 rank × accum 2 (same global batch, another layout)
    copy_checkpoint(two, tmp_path / "one", 10)
    r = ok(run_train("digits_masked.yaml", *common, "run.name=one", "deepspeed.zero_stage=2", "train.grad_accum=2"))
    assert "optimizer state from layout (world 2, ZeRO-2)" in r.stderr
    rows = read_metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_logged_closed_forms(rows, range(11, STEPS + 1))
