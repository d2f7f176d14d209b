"""An in-training evaluation that fails on one rank of two (issue 41): every rank agrees that it failed, none
waits in a collective for the other (the collective deadline here is 6 s), rank 0 says it in one line and a
metrics row, and the run trains to its last step and exits 0. Step 2 fails on rank 1 while it samples
(ELT_FAULT=eval_fails, the others' sampling goes on), step 4 on rank 0 for real while it writes the grids
(a file holds the folder's name), step 6 evaluates. One rank: tests/unit/test_eval_failures.py."""
import time

import pytest

from tests.conftest import read_metrics, run_train

pytestmark = pytest.mark.multiproc

TINY = ("model.width=32", "train.micro_batch=8", "train.warmup_steps=1", "train.log_every=1", "train.save_every=0",
        "train.collective_timeout_s=6", "data.io_retry_s=1", "data.io_timeout_s=1",
        "eval.loops=1,2", "eval.num=16", "eval.steps=4", "eval.batch_size=8")     # a batch on each rank


def test_an_evaluation_failing_on_one_rank_ends_the_evaluation_not_the_run(tmp_path, digits_shards):
    run = tmp_path / "ev"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step_0000004").write_text("a file where step 4's grids would go")
    start = time.monotonic()
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=ev",
                  *TINY, "train.steps=6", "eval.every=2", nprocs=2, env={"ELT_FAULT": "eval_fails:1:2"}, timeout=400)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    errors = {row["step"]: row["eval_error"] for row in rows if "eval_error" in row}
    assert list(errors) == [2, 4]
    assert errors[2] == "rank 1: InjectedFault: ELT_FAULT eval_fails: rank 1, step 2"
    assert errors[4].startswith("rank 0: FileExistsError") and "step_0000004" in errors[4]
    assert [(row["step"], row["eval_L"]) for row in rows if "eval_L" in row] == [(6, "1"), (6, "2")]

    lines = [line for line in r.stderr.splitlines() if " failed on rank" in line]
    assert lines == [f"elt-train: eval at step {s} failed on {errors[s]}; training goes on" for s in (2, 4)]
    assert "Traceback" not in r.stderr and "finished 6 steps" in r.stdout
    print(f"2 ranks, 6 steps, 3 evaluations (2 failed) in {took:.0f} s")
