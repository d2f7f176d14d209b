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


@pytest.fixture(scope="module")
def own_inception(tmp_path_factory):
    """A tiny Inception (pool 16-d, spatial 63-d) with weights of its own, so its sha256 (part of a shard
    reference's cache key) is no other test's."""
    import torch

    from tests.tiny_models import TinyInception, scripted
    torch.manual_seed(41)
    return scripted(TinyInception(), tmp_path_factory.mktemp("inception") / "inception-41.pt")


@pytest.mark.parametrize("case", ["pool_dim", "spatial_dim", "other_inception", "not_inception", "too_few_images",
                                  "corrupt_cache"])
def test_reference_against_the_inception_exits_2_before_deepspeed(tmp_path, digits_shards, own_inception, case):
    """What `LiveEval.prepare` found only after DeepSpeed's start and resume (exit 1, retried by
    slurm/train_large.sh) is refused before: exit 2, one line naming the file, no run directory."""
    import time

    from elt_scale.inference.reference import reference_key
    from elt_scale.metrics import file_sha256
    weights, env = own_inception, {"XDG_CACHE_HOME": str(tmp_path / "cache")}     # nothing else is cached there
    good = {"mu": np.zeros(16), "sigma": np.eye(16)}
    if case == "not_inception":
        weights = tmp_path / "inception.pt"
        weights.write_bytes(b"not an Inception network")
    cached = tmp_path / "cache" / "elt-scale" / "reference" / f"{reference_key(digits_shards, file_sha256(weights), 50_000)}.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 cut short by a full disk")
    ref = {"pool_dim": bad_stats(tmp_path / "dim.npz", mu=np.zeros(15), sigma=np.eye(15)),
           "spatial_dim": bad_stats(tmp_path / "sdim.npz", mu_s=np.zeros(10), sigma_s=np.eye(10)),
           "other_inception": bad_stats(tmp_path / "other.npz", pool_features=np.ones((8, 16)),
                                        inception_sha256=np.array("0" * 64)),
           "not_inception": bad_stats(tmp_path / "ok.npz"),
           "too_few_images": tmp_path / "few.npz",
           "corrupt_cache": digits_shards}[case]
    if case == "too_few_images":
        np.savez(ref, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    t0 = time.monotonic()
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=pf",
                  "train.steps=3", "eval.every=2", f"eval.reference={ref}", f"eval.inception_weights={weights}",
                  env=env, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    want = {"pool_dim": f"{ref}: key 'mu' has 15 values but the Inception pool features have 16",
            "spatial_dim": f"{ref}: key 'mu_s' has 10 values but the Inception spatial features (mixed_6/conv) have 63",
            "other_inception": f"{ref}: made with the Inception file of sha256 000000000000",
            "not_inception": f"eval.inception_weights={weights}: not a usable Inception network",
            "too_few_images": f"{ref}: key 'arr_0' holds 3 images",
            "corrupt_cache": f"{cached}: not a readable .npz"}[case]
    assert line.startswith("elt-train: eval.") and want in line, line
    assert not (tmp_path / "pf").exists()           # DeepSpeed never started: no ledger, no run directory
    assert took < 60, took
