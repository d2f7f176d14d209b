"""In-training any-time evaluation (eval.every): grids at the right steps, the same images after a
resume, per-L metric rows, and the same files from 2 ranks (ZeRO-3) as from 1."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_metrics, run_train

TINY = ("model.width=32", "train.micro_batch=8", "train.warmup_steps=1", "train.ema_decay=0.5",
        "eval.loops=1,4", "eval.num=10", "eval.steps=4", "eval.batch_size=4")


def train(tmp_path, shards, name, *overrides, nprocs=1, rc=0, env=None):
    r = run_train("digits_masked.yaml", f"data.shards={shards}", f"run.out_dir={tmp_path}", f"run.name={name}",
                  *TINY, *overrides, nprocs=nprocs, env=env)
    assert r.returncode == rc, r.stderr[-3000:]
    return tmp_path / name


def grids(run_dir, step) -> dict[str, np.ndarray]:
    folder = run_dir / "samples" / f"step_{step:07d}"
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("grid_*.png"))}


def test_grids_at_eval_steps_same_after_resume_and_metric_rows(tmp_path, digits_shards):
    same = ("train.steps=4", "train.save_every=1", "eval.every=2")
    straight = train(tmp_path, digits_shards, "straight", *same)
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["step_0000002", "step_0000004"]
    assert list(grids(straight, 4)) == ["grid_L1.png", "grid_L4.png"]

    rows = [r for r in read_metrics(straight) if "eval_L" in r]
    assert [(r["step"], r["eval_L"]) for r in rows] == [(2, "1"), (2, "4"), (4, "1"), (4, "4")]
    for r in rows:
        assert 0.0 <= r["class_acc"] <= 1.0 and r["fd_digits"] > 0 and r["eval_s"] > 0
    assert rows[1]["gflops_per_sample"] > rows[0]["gflops_per_sample"]       # L=4 costs more than L=1

    # killed (-9) while saving step 3, so the rerun resumes from step 2 (after that step's evaluation)
    train(tmp_path, digits_shards, "resumed", *same, rc=-9, env={"ELT_FAULT": "kill_in_save:3"})
    resumed = train(tmp_path, digits_shards, "resumed", *same)
    for step in (2, 4):
        a, b = grids(straight, step), grids(resumed, step)
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a), step
    assert not all(np.array_equal(x, y) for x, y in zip(grids(straight, 2).values(), grids(straight, 4).values()))
    assert len([r for r in read_metrics(resumed) if "eval_L" in r]) == 4      # no row lost or doubled


@pytest.mark.multiproc
def test_two_ranks_zero3_write_the_same_files_as_one(tmp_path, digits_shards):
    # 1 and 2 ranks reduce gradients in a different order, so their trained weights differ in the last bits
    # and a discrete sampler may turn that into another token: a vanishing lr keeps the weights equal, so
    # what is compared is the evaluation itself (the split of batches across ranks and the gather).
    same = ("train.steps=2", "eval.every=2", "train.lr=1e-12", "eval.num=10")
    one = train(tmp_path, digits_shards, "one", *same)
    two = train(tmp_path, digits_shards, "two", *same, "deepspeed.zero_stage=3", nprocs=2)
    a, b = grids(one, 2), grids(two, 2)
    assert list(a) == ["grid_L1.png", "grid_L4.png"] and list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    metric = lambda run: [(r["eval_L"], r["class_acc"], r["fd_digits"]) for r in read_metrics(run) if "eval_L" in r]
    assert metric(one) == metric(two)


def test_fid_rows_are_adm_suite_through_the_scorer(tmp_path, digits_shards):
    """With eval.reference and eval.inception_weights the rows carry ADM's suite, from the Scorer elt-eval uses."""
    from elt_scale.inference.reference import default_cache_dir, reference_key
    from elt_scale.metrics import file_sha256
    from tests.tiny_models import TinyInception, scripted
    weights = scripted(TinyInception(), tmp_path / "inception-tiny.pt")
    # the shard reference's statistics land in the user's cache (XDG_CACHE_HOME would move DeepSpeed's op
    # builds too): this test's own file is removed afterwards
    cached = default_cache_dir() / f"{reference_key(digits_shards, file_sha256(weights), 50_000)}.npz"
    try:
        # 11 classes: not the digits model, so its images are scored by the suite, not the digits classifier
        run = train(tmp_path, digits_shards, "fid", "train.steps=2", "eval.every=2", "eval.loops=2",
                    "model.num_classes=11", f"eval.reference={digits_shards}", f"eval.inception_weights={weights}")
        assert cached.is_file()
    finally:
        cached.unlink(missing_ok=True)
    rows = [r for r in read_metrics(run) if "eval_L" in r]
    assert len(rows) == 1 and "class_acc" not in rows[0]
    assert {"is", "fid", "sfid", "precision", "recall"} <= set(rows[0])
    assert rows[0]["fid"] > 0 and 0 <= rows[0]["precision"] <= 1 and 0 <= rows[0]["recall"] <= 1
