"""Fail before step 1 (issue 30): every path a run will need later is checked at start-up - one line on
stderr, exit 2, no training row written - and a save error that is not a failed write is a crash, not 74."""
import numpy as np
import pytest

from elt_scale.files import is_write_error
from tests.conftest import run_train


def start(tmp_path, shards, *overrides):
    r = run_train("digits_masked.yaml", f"data.shards={shards}", f"run.out_dir={tmp_path}", "run.name=pf",
                  "model.width=32", "train.micro_batch=8", "train.steps=3", "eval.every=2", *overrides, timeout=120)
    assert not (tmp_path / "pf" / "metrics.jsonl").exists()            # nothing trained, nothing logged
    return r


def bad_stats(path, **change):
    arrays = {"mu": np.zeros(16), "sigma": np.eye(16)}
    arrays.update(change)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["missing", "nan_mu", "asymmetric", "wrong_dim", "no_inception", "no_weights_file"])
def test_bad_eval_paths_exit_2_before_any_step(tmp_path, digits_shards, case):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"not read before the reference is checked")
    sigma = np.eye(16)
    sigma[0, 1] = 0.5
    ref = {"missing": tmp_path / "absent.npz",
           "nan_mu": bad_stats(tmp_path / "nan.npz", mu=np.r_[np.nan, np.zeros(15)]),
           "asymmetric": bad_stats(tmp_path / "asym.npz", sigma=sigma),
           "wrong_dim": bad_stats(tmp_path / "dim.npz", mu=np.zeros(15)),
           "no_inception": bad_stats(tmp_path / "ok.npz"),
           "no_weights_file": bad_stats(tmp_path / "ok.npz")}[case]
    extra = {"no_inception": [], "no_weights_file": [f"eval.inception_weights={tmp_path / 'absent.pt'}"]}.get(
        case, [f"eval.inception_weights={weights}"])
    r = start(tmp_path, digits_shards, f"eval.reference={ref}", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("elt-train: eval.")
    want = {"missing": "absent.npz", "nan_mu": "'mu'", "asymmetric": "'sigma'", "wrong_dim": "'mu'",
            "no_inception": "eval.inception_weights", "no_weights_file": "absent.pt"}[case]
    assert want in line, line


def test_missing_resume_source_exits_2(tmp_path, digits_shards):
    r = start(tmp_path, digits_shards, f"train.resume={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and "train.resume=" in r.stderr.strip().splitlines()[-1]


def test_only_write_failures_count_as_write_failures():
    assert is_write_error(OSError(28, "No space left on device"))
    assert is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    assert is_write_error(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    try:
        try:
            raise OSError(5, "Input/output error")
        except OSError as e:
            raise RuntimeError("saving the optimizer state") from e
    except RuntimeError as e:
        assert is_write_error(e)
    assert not is_write_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_write_error(KeyError("exp_avg"))
