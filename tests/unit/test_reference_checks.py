"""Bad reference statistics fail before any work (issue 30): a NaN, a non-symmetric covariance or sizes that
disagree (with each other or with the Inception's features) make elt-eval exit 2 with one line naming the file
and the key, before samples are drawn or their features extracted; `check_reference` does the same checks
without a network for start-up; the Fréchet distance refuses non-finite statistics instead of calling sqrtm."""
import subprocess
import sys
import time

import numpy as np
import pytest

from elt_scale import evaluate
from elt_scale.inference import features as features_module
from elt_scale.inference.reference import check_reference
from elt_scale.metrics.adm import BadReference, check_reference_arrays
from elt_scale.metrics.moments import frechet_from_stats
from tests.conftest import ROOT
from tests.unit.test_adm_eval import noise, own_features
from tests.tiny_models import TinyInception, scripted

POOL, SPATIAL = 16, 63           # TinyInception's pool and mixed_6/conv feature sizes


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return scripted(TinyInception(), tmp_path_factory.mktemp("inception") / "inception-tiny.pt")


@pytest.fixture(scope="module")
def good_stats(inception):
    """Statistics of the tiny Inception's features as an ADM reference batch holds them."""
    pool, spatial, _ = own_features(inception, noise(60, 1))
    return {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False),
            "mu_s": spatial.mean(0), "sigma_s": np.cov(spatial, rowvar=False)}


def spoiled(stats: dict, case: str) -> dict:
    """A copy of good statistics with one thing wrong."""
    out = {k: v.copy() for k, v in stats.items()}
    rng = np.random.default_rng(0)
    if case == "nan_mu":
        out["mu"][[0, 3, 5]] = np.nan
    elif case == "asymmetric_sigma":
        out["sigma"][0, 1] += 0.5
    elif case == "short_mu":
        out["mu"] = out["mu"][:-1]
    elif case == "other_network":          # self-consistent, but not of this Inception's pool features
        x = rng.normal(size=(40, 8))
        out["mu"], out["sigma"] = x.mean(0), np.cov(x, rowvar=False)
    elif case == "other_spatial_layer":
        x = rng.normal(size=(40, 10))
        out["mu_s"], out["sigma_s"] = x.mean(0), np.cov(x, rowvar=False)
    return out


CASES = {
    "nan_mu": "key 'mu' holds 3 non-finite values (NaN/inf)",
    "asymmetric_sigma": "key 'sigma' is not symmetric (max |S - Sᵀ| = 0.5)",
    "short_mu": f"key 'mu' has {POOL - 1} values but 'sigma' is {POOL}×{POOL}",
    "other_network": f"key 'mu' has 8 values but the Inception pool features have {POOL}",
    "other_spatial_layer": f"key 'mu_s' has 10 values but the Inception spatial features (mixed_6/conv) have {SPATIAL}",
}


def samples_file(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=noise(64, 2), arr_1=np.zeros(64, np.int64))
    return path


# ---------------------------------------------------------------------------------------------
# the CLI, as a user runs it

@pytest.mark.parametrize("case", CASES)
def test_elt_eval_fid_exits_2_in_one_line_naming_file_and_key(case, inception, good_stats, tmp_path):
    ref = tmp_path / f"ref_{case}.npz"
    np.savez(ref, **spoiled(good_stats, case))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "elt_scale.evaluate", "fid", str(samples_file(tmp_path)),
                        "--reference", str(ref), "--inception-weights", inception],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"elt-eval: error: {ref}: {CASES[case]}"), r.stderr
    assert elapsed < 60, f"{elapsed:.0f} s"             # seconds, mostly Python and torch starting up


def test_no_features_are_extracted_before_the_reference_fails(inception, good_stats, tmp_path, monkeypatch, capsys):
    """The sizes against the Inception's are checked before the reference's arr_0 or the samples are run."""
    def no_extraction(*a, **k):
        raise AssertionError("features were extracted before the reference was checked")
    monkeypatch.setattr(features_module, "extract_features", no_extraction)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=noise(30, 3), **spoiled(good_stats, "other_network"))
    assert evaluate.main(["fid", str(samples_file(tmp_path)), "--reference", str(ref),
                          "--inception-weights", inception]) == 2
    assert capsys.readouterr().err == f"elt-eval: error: {ref}: {CASES['other_network']} (statistics of another " \
                                      "network or layer?)\n"


@pytest.mark.parametrize("case,weights", [("nan_mu", False), ("other_network", True)])
def test_elt_eval_anytime_checks_the_reference_before_sampling(case, weights, inception, good_stats, tmp_path,
                                                               monkeypatch, capsys):
    def no_sampling(*a, **k):
        raise AssertionError("the sweep started before the reference was checked")
    monkeypatch.setattr(evaluate, "anytime_sweep", no_sampling)
    ref = tmp_path / "ref.npz"
    np.savez(ref, **spoiled(good_stats, case))
    extra = ["--inception-weights", inception] if weights else []
    assert evaluate.main(["anytime", str(tmp_path / "run"), "--reference", str(ref), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"elt-eval: error: {ref}: {CASES[case]}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# check_reference: the start-up check, no network

def test_check_reference_accepts_good_statistics_images_and_shards(good_stats, digits_shards, tmp_path):
    stats, images = tmp_path / "stats.npz", tmp_path / "images.npz"
    np.savez(stats, **good_stats)
    np.savez(images, arr_0=noise(10, 4))
    for good in (stats, images, digits_shards, digits_shards / "manifest.json"):
        assert check_reference(good) is None
    assert check_reference(str(stats), dims=(POOL, SPATIAL)) is None


def test_check_reference_names_the_path_and_key_in_one_line(good_stats, digits_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'missing.npz'}: no such reference"):
        check_reference(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        check_reference(tmp_path)                                       # a directory, but not of shards
    bad = {
        "nan.npz": ({**good_stats, "mu": np.full(POOL, np.nan)}, f"key 'mu' holds {POOL} non-finite values"),
        "no_sigma.npz": ({"mu": good_stats["mu"]}, "key 'mu' without 'sigma'"),
        "float_images.npz": ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "key 'arr_0' is float32 of shape"),
        "grey_images.npz": ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"expected uint8 \(N, H, W, 3\)"),
        "objects.npz": ({"mu": np.array([object()] * 3)}, "key 'mu' cannot be read"),
        "nothing.npz": ({"labels": np.zeros(3)}, "neither statistics .* nor images"),
        "few_pool.npz": ({**good_stats, "pool_features": np.zeros((3, POOL))}, "key 'pool_features' has shape"),
        "pool_size.npz": ({**good_stats, "pool_features": np.zeros((9, 5))}, "has 5 values per image but 'mu' has"),
    }
    for name, (arrays, words) in bad.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(BadReference, match=f"^{path}: .*{words}") as e:
            check_reference(path, videos=False)
        assert "\n" not in str(e.value)
    good = tmp_path / "good.npz"
    np.savez(good, **good_stats)
    with pytest.raises(BadReference, match=f"good.npz: key 'mu' has {POOL} values but the Inception pool features "
                                           "have 2048"):
        check_reference(good, dims=(2048, 2023))                       # e.g. tiny statistics for the real network
    (tmp_path / "notes.txt").write_text("not a reference")
    with pytest.raises(BadReference, match="notes.txt: a reference is an .npz"):
        check_reference(tmp_path / "notes.txt")
    (tmp_path / "text.npz").write_text("mu: 1, 2, 3")
    with pytest.raises(BadReference, match="text.npz: not a readable .npz"):
        check_reference(tmp_path / "text.npz")


def test_videos_are_references_for_fvd_only(tmp_path):
    clips = tmp_path / "clips.npz"
    np.savez(clips, arr_0=np.zeros((2, 16, 8, 8, 3), np.uint8))
    assert check_reference(clips) is None and check_reference(clips, videos=True) is None
    with pytest.raises(BadReference, match=r"expected uint8 \(N, H, W, 3\)"):
        check_reference(clips, videos=False)


def test_symmetry_is_judged_relative_to_the_matrix_scale(good_stats):
    big = good_stats["sigma"] * 1e6
    rounding = big + np.triu(np.full_like(big, 1e-9 * np.abs(big).max()), 1)  # float-rounding-sized asymmetry
    check_reference_arrays({"mu": good_stats["mu"], "sigma": rounding}, "ref.npz")
    skewed = big + np.triu(np.full_like(big, 1e-4 * np.abs(big).max()), 1)
    with pytest.raises(BadReference, match="ref.npz: key 'sigma' is not symmetric"):
        check_reference_arrays({"mu": good_stats["mu"], "sigma": skewed}, "ref.npz")


# ---------------------------------------------------------------------------------------------
# the Fréchet distance itself

@pytest.mark.parametrize("bad", ["mu1", "sigma2"])
def test_frechet_distance_refuses_non_finite_statistics_before_sqrtm(bad, good_stats, monkeypatch):
    from scipy import linalg

    def no_sqrtm(*a, **k):
        raise AssertionError("sqrtm was called on non-finite statistics")
    monkeypatch.setattr(linalg, "sqrtm", no_sqrtm)
    stats = {"mu1": good_stats["mu"], "sigma1": good_stats["sigma"],
             "mu2": good_stats["mu"].copy(), "sigma2": good_stats["sigma"].copy()}
    stats[bad] = stats[bad].copy()
    stats[bad].flat[1] = np.inf
    with pytest.raises(ValueError, match=f"Fréchet distance: {bad} .* holds 1 non-finite values"):
        frechet_from_stats(stats["mu1"], stats["sigma1"], stats["mu2"], stats["sigma2"])
