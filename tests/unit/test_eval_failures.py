"""An in-training evaluation that fails ends that evaluation, not the run (issue 41): one line on stderr and
one metrics row naming the error, training goes on; eval.max_failures failures in a row switch evaluation
off, said once. Faults: the test-only ELT_FAULT=eval_fails (an error while sampling) and a real one (the
step's grid folder cannot be made: a file holds its name). Two ranks, the error on one of them:
tests/multiproc/test_eval_failures_ranks.py."""
from tests.conftest import read_metrics, run_train

TINY = ("model.width=32", "train.micro_batch=8", "train.warmup_steps=1", "train.log_every=1", "train.save_every=0",
        "eval.loops=2", "eval.num=8", "eval.steps=4", "eval.batch_size=8")


def test_failed_evaluations_are_rows_and_max_failures_in_a_row_switch_it_off(tmp_path, digits_shards):
    run = tmp_path / "ev"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step_0000003").write_text("a file where step 3's grids would go")    # a real failure
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=ev",
                  *TINY, "train.steps=6", "eval.every=1", "eval.max_failures=2",
                  env={"ELT_FAULT": "eval_fails:0:1,4"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    # 1 fails, 2 succeeds (the count starts over), 3 and 4 fail: two in a row, so 5 and 6 do not evaluate
    errors = {row["step"]: row["eval_error"] for row in rows if "eval_error" in row}
    assert list(errors) == [1, 3, 4]
    assert errors[1] == errors[4].replace("step 4", "step 1") and "InjectedFault: ELT_FAULT eval_fails" in errors[1]
    assert errors[3].startswith("rank 0: FileExistsError") and "step_0000003" in errors[3]
    assert [row["step"] for row in rows if "eval_L" in row] == [2]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002", "step_0000003"]

    lines = [line for line in r.stderr.splitlines() if "eval at step" in line]
    assert [line.split(" failed on ")[0] for line in lines] == [f"elt-train: eval at step {s}" for s in (1, 3, 4)]
    assert all(errors[s] in line for s, line in zip((1, 3, 4), lines))
    assert [("evaluation is off" in line) for line in lines] == [False, False, True]
    assert "eval.max_failures=2" in lines[-1] and r.stderr.count("evaluation is off") == 1
    assert "Traceback" not in r.stderr and "finished 6 steps" in r.stdout
