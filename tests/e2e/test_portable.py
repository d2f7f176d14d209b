"""A run directory is all sampling needs: from another working directory, with the shards it was trained on
moved away, ELT.from_pretrained + generate and elt-sample give the images they gave before the move."""
import os
import shutil
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT, run_tokenize

ARGS = dict(loops=2, cfg=2.0, steps=4, seed=5)


def sample_cli(run_dir, out, cwd):
    r = subprocess.run([sys.executable, "-m", "elt_scale.sample", str(run_dir), "--loops", "2", "-n", "10",
                        "--cfg", "2.0", "--steps", "4", "--seed", "5", "--out", str(out)], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out / "samples_L2.npz")["arr_0"]


def test_run_dir_samples_the_same_from_elsewhere_after_the_shards_moved(tmp_path, monkeypatch):
    from elt_scale import ELT

    work = tmp_path / "work"                    # a user's project folder: relative shards and runs paths
    work.mkdir()
    assert run_tokenize("--source", "digits", "--out", str(work / "shards" / "digits")).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "elt_scale.train", str(ROOT / "recipes" / "digits_masked.yaml"),
                        "data.shards=shards/digits", "run.out_dir=runs", "model.width=32", "train.steps=3",
                        "train.warmup_steps=1", "train.save_every=0"], cwd=work, capture_output=True, text=True,
                       timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = work / "runs" / "digits_masked"

    monkeypatch.chdir(work)
    before_api = ELT.from_pretrained(run_dir).generate(list(range(10)), **ARGS)
    before_cli = sample_cli(run_dir, tmp_path / "before", cwd=work)

    shutil.move(work / "shards", tmp_path / "moved")          # the shards are gone from where training saw them
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert np.array_equal(ELT.from_pretrained(run_dir).generate(list(range(10)), **ARGS), before_api)
    assert np.array_equal(sample_cli(run_dir, tmp_path / "after", cwd=elsewhere), before_cli)
    assert np.array_equal(before_api, before_cli)               # and the API samples what the CLI samples
