"""ADM's evaluation suite (elt-eval fid): precomputed reference statistics are used as ADM uses them, FID/sFID/
IS against closed forms computed here, precision/recall against an independent k-NN written here, the TF1
resize rule, streaming in bounded memory, and a shard set's statistics written once and reused (2 ranks = 1:
tests/multiproc/test_adm_eval_ranks.py).
The Inception is tests/tiny_models.TinyInception (NVIDIA's file in miniature), loaded through the real code."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elt_scale import evaluate
from elt_scale.inference import reference as reference_module
from elt_scale.inference.scoring import Scorer
from elt_scale.metrics.adm import inception_score
from elt_scale.metrics.detectors import load_inception
from elt_scale.metrics.inception import FidelityInception, resize_like_tf1
from elt_scale.metrics.manifold import pairwise_sq_distances, precision_recall
from tests.conftest import ROOT
from tests.tiny_models import TinyI3D, TinyInception, scripted

ADM_KEYS = {"is", "fid", "sfid", "precision", "recall", "num_samples", "reference", "reference_stats",
            "reference_pr_images", "inception_weights", "inception_sha256"}


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return scripted(TinyInception(), tmp_path_factory.mktemp("inception") / "inception-tiny.pt")


def noise(n, seed, size=16, high=256):
    """Images of 4×4 random blocks: structure the tiny network's pooled features keep apart."""
    blocks = np.random.default_rng(seed).integers(0, high, (n, 4, 4, 3), dtype=np.uint8)
    return blocks.repeat(size // 4, axis=1).repeat(size // 4, axis=2)


def own_features(weights, images):
    """Pool, spatial (TF's h, w, c order) and unbiased class probabilities through the file's own methods."""
    net = torch.jit.load(str(weights))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        pool, spatial_map, probs = net.reference_outputs(x)
    spatial = spatial_map[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
    return pool.double().numpy(), spatial.double().numpy(), probs.double().numpy()


def closed_form(features, mu, sigma):
    """Fréchet distance of the Gaussian of `features` to N(mu, sigma), through symmetric eigendecompositions."""
    m, s = features.mean(0), np.cov(features, rowvar=False)
    w, v = np.linalg.eigh(s)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ sigma @ root)
    return float(((m - mu) ** 2).sum() + np.trace(s) + np.trace(sigma) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def knn_pr(reference, samples, k=3):
    """Independent precision/recall: whole float64 distance matrices, radii from sorted rows."""
    d = lambda a, b: ((a[:, None].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)  # noqa: E731
    ref_radii, smp_radii = np.sort(d(reference, reference), 1)[:, k], np.sort(d(samples, samples), 1)[:, k]
    cross = d(reference, samples)
    return (cross <= ref_radii[:, None]).any(0).mean(), (cross <= smp_radii[None, :]).any(1).mean()


# ---------------------------------------------------------------------------------------------
# the reference batch's precomputed statistics

def test_precomputed_mu_sigma_are_used_and_fid_sfid_is_match_closed_forms(inception, tmp_path):
    samples, arr_0 = noise(100, 0), noise(90, 1)
    other_pool, other_spatial, _ = own_features(inception, noise(100, 2, high=128))     # not arr_0's statistics
    ref = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(ref, arr_0=arr_0, mu=other_pool.mean(0), sigma=np.cov(other_pool, rowvar=False),
             mu_s=other_spatial.mean(0), sigma_s=np.cov(other_spatial, rowvar=False))
    got = Scorer(str(ref), inception, device="cpu").adm(samples)

    pool, spatial, probs = own_features(inception, samples)
    assert set(got) == ADM_KEYS and got["reference_stats"] == "precomputed" and got["num_samples"] == 100
    mu, sigma = other_pool.mean(0), np.cov(other_pool, rowvar=False)
    mu_s, sigma_s = other_spatial.mean(0), np.cov(other_spatial, rowvar=False)
    assert got["fid"] == pytest.approx(closed_form(pool, mu, sigma), rel=1e-5)
    assert got["sfid"] == pytest.approx(closed_form(spatial, mu_s, sigma_s), rel=1e-5)
    arr_0_pool, _, _ = own_features(inception, arr_0)
    assert abs(got["fid"] - closed_form(pool, arr_0_pool.mean(0), np.cov(arr_0_pool, rowvar=False))) > 0.1 * got["fid"]
    # precision/recall: ADM's reference batch gives them through its arr_0 images
    assert (got["precision"], got["recall"]) == precision_recall(arr_0_pool, pool) and got["reference_pr_images"] == 90
    expected_is = np.exp((probs * (np.log(probs) - np.log(probs.mean(0)))).sum(1).mean())
    assert got["is"] - 1 == pytest.approx(expected_is - 1, rel=1e-2)        # the tiny net's IS is close to 1
    assert got["inception_sha256"] == hashlib.sha256(Path(inception).read_bytes()).hexdigest()


def test_reference_without_statistics_falls_back_to_arr_0(inception, tmp_path):
    samples, arr_0 = noise(80, 3), noise(70, 4, high=200)
    ref = tmp_path / "images_only.npz"
    np.savez_compressed(ref, arr_0=arr_0)                  # compressed: read front to back, not memory-mapped
    got = Scorer(str(ref), inception, device="cpu").adm(samples)
    (pool, spatial, _), (rpool, rspatial, _) = own_features(inception, samples), own_features(inception, arr_0)
    assert got["reference_stats"] == "from arr_0"
    assert got["fid"] == pytest.approx(closed_form(pool, rpool.mean(0), np.cov(rpool, rowvar=False)), rel=1e-5)
    assert got["sfid"] == pytest.approx(closed_form(spatial, rspatial.mean(0), np.cov(rspatial, rowvar=False)),
                                        rel=1e-5)


def test_statistics_only_reference_gives_fid_and_says_what_is_missing(inception, tmp_path, capsys):
    samples, (rpool, _, _) = tmp_path / "samples.npz", own_features(inception, noise(80, 10))
    np.savez(samples, arr_0=noise(70, 11))
    ref = tmp_path / "fid_stats_only.npz"                   # e.g. mu/sigma copied out of ADM's batch
    np.savez(ref, mu=rpool.mean(0), sigma=np.cov(rpool, rowvar=False))
    assert evaluate.main(["fid", str(samples), "--reference", str(ref), "--inception-weights", inception]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out.strip().splitlines()[-1])
    assert got["reference_stats"] == "precomputed" and got["fid"] > 0 and got["is"] >= 1
    assert got["sfid"] is None and got["precision"] is None and got["recall"] is None
    assert "sfid: not computed" in err and "precision: not computed" in err


def test_inception_score_uses_consecutive_splits_of_unbiased_softmax():
    rng = np.random.default_rng(5)
    pool, weight = rng.normal(size=(90, 16)).astype(np.float32), rng.normal(size=(10, 16)).astype(np.float32)
    logits = pool.astype(np.float64) @ weight.T.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = [np.exp((part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean())
                for part in (probs[:40], probs[40:80], probs[80:])]          # in order, the last one short
    got = inception_score(pool, torch.from_numpy(weight), split_size=40)
    assert got == pytest.approx(np.mean(expected), rel=1e-6) and got > 2
    assert inception_score(pool, torch.from_numpy(weight)) != pytest.approx(got, rel=1e-3)   # one split of 5,000


# ---------------------------------------------------------------------------------------------
# precision / recall

@pytest.mark.parametrize("distances", ["float16", "float32"])
def test_precision_recall_match_an_independent_knn(distances):
    rng = np.random.default_rng(0)      # small integers: exact in float16 too, so ties are decided alike
    a = rng.integers(0, 6, (120, 12)).astype(np.float32)
    far = a + 40
    partial = np.concatenate([a[:60] + (rng.random((60, 12)) < 0.2), rng.integers(20, 26, (50, 12))]).astype(np.float32)
    assert precision_recall(a, a.copy(), precision=distances) == (1.0, 1.0)
    assert precision_recall(a, far, precision=distances) == (0.0, 0.0)
    p, r = precision_recall(a, partial, precision=distances)
    assert (p, r) == pytest.approx(knn_pr(a, partial)) and 0 < p < 1 and 0 < r < 1
    assert precision_recall(a, partial, block=7, precision=distances) == (p, r)     # ADM's blocks, smaller


def test_float16_distances_as_adm_and_the_float32_fallback():
    rng = np.random.default_rng(1)
    u, v = torch.as_tensor(rng.random((9, 64), np.float32) * 3), torch.as_tensor(rng.random((7, 64), np.float32) * 3)
    d16, d32 = pairwise_sq_distances(u, v, "float16"), pairwise_sq_distances(u, v, "float32")
    assert torch.equal(d16, d16.half().float()) and not torch.equal(d16, d32)       # float16 values
    assert torch.allclose(d16, d32, rtol=1e-2, atol=0.5)
    big_u, big_v = u * 100, v * 100                        # |u|² > 65504: float16 overflows -> the block in float32
    assert torch.equal(pairwise_sq_distances(big_u, big_v, "float16"), pairwise_sq_distances(big_u, big_v, "float32"))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(u[:3], v)


# ---------------------------------------------------------------------------------------------
# the network: resize, layers, what fails

def test_resize_follows_tf1_rule():
    from tests.tiny_models import tf1_resize
    x = torch.randint(0, 256, (2, 3, 37, 23)).float()
    assert (resize_like_tf1(x) - tf1_resize(x, 299)).abs().max() < 0.01         # of 255: float32 grid rounding
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (half_pixel - tf1_resize(x, 299)).abs().max() > 10                       # the rule PyTorch's default is not


def test_files_that_cannot_give_mixed_6_conv_fail_in_one_line(tmp_path):
    other_layout = scripted(TinyI3D(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="inception-2015-12-05.pt.*weights-inception-2015-12-05-6726825d.pth"):
        load_inception(other_layout)
    resized_otherwise = scripted(TinyInception(half_pixel_resize=True), tmp_path / "half_pixel.pt")
    with pytest.raises(ValueError, match="does not reproduce its own pool features"):
        load_inception(resized_otherwise)(torch.from_numpy(noise(2, 0, size=8)).permute(0, 3, 1, 2))


def test_torch_fidelity_port_reads_mixed_6d_branch1x1():
    class Fake(torch.nn.Module):           # torch-fidelity's names around mixed_6/conv
        def __init__(self):
            super().__init__()
            self.Mixed_6d = torch.nn.Module()
            self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 8, 1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.Mixed_6d.branch1x1(x.float()).mean((2, 3))

    wrapper = FidelityInception(Fake())
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    pool, spatial = wrapper(x)
    raw = wrapper.net.Mixed_6d.branch1x1(x.float())
    assert pool.shape == (2, 8) and torch.equal(spatial, raw[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert wrapper.logit_weight.shape == (10, 8)


# ---------------------------------------------------------------------------------------------
# scale: streaming, ranks, the shard reference cache

def test_features_stream_in_bounded_memory(inception, tmp_path):
    """1,500 images of 64×64 (18 MB on disk; 1.6 GB once resized to 299×299 float32): the .npz is never
    read whole (numpy allocations stay under 5 MB) and one batch of resized images exists at a time."""
    npz = tmp_path / "many.npz"
    np.savez(npz, arr_0=noise(1500, 6, size=64), arr_1=np.zeros(1500, np.int64))
    script = f"""
import json, resource, tracemalloc, torch
from elt_scale.metrics import load_inception
from elt_scale.inference.features import array_batches, extract_features
from elt_scale.inference.outputs import open_npz_images
net = load_inception({str(inception)!r})
net(torch.full((2, 3, 64, 64), 9, dtype=torch.uint8))          # the first-batch check, before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
features = extract_features(array_batches(open_npz_images({str(npz)!r}), 64), net)
numpy_peak = tracemalloc.get_traced_memory()[1]
grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"n": len(features.pool), "numpy_peak": numpy_peak, "grown_mb": grown_kb / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["n"] == 1500 and got["numpy_peak"] < 5e6, got
    assert got["grown_mb"] < 800, got                              # all resized at once: > 1,600 MB


def elt_eval_fid(*args):
    r = subprocess.run([sys.executable, "-m", "elt_scale.evaluate", "fid", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_shard_reference_is_written_once_in_adm_layout_and_reused(inception, digits_shards, tmp_path, monkeypatch):
    samples = noise(40, 9, size=8)
    first = Scorer(str(digits_shards), inception, device="cpu", cache_dir=tmp_path / "cache",
                   reference_limit=100).adm(samples)
    assert first["reference_stats"] == "from shards"
    with np.load(first["reference"]) as f:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool_features"} <= set(f.files)
        assert f["sigma"].dtype == np.float64 and f["mu_s"].shape == (63,) and str(f["inception_sha256"]) == \
            first["inception_sha256"]

    def no_decoding(*a, **k):
        raise AssertionError("the shards were decoded again")
    monkeypatch.setattr(reference_module, "shard_batches", no_decoding)
    again = Scorer(str(digits_shards), inception, device="cpu", cache_dir=tmp_path / "cache",
                   reference_limit=100).adm(samples)
    assert again["reference_stats"] == "cached" and again["reference"] == first["reference"]
    assert {k: again[k] for k in ("is", "fid", "sfid", "precision", "recall")} == \
           {k: first[k] for k in ("is", "fid", "sfid", "precision", "recall")}
    monkeypatch.undo()

    # elt-eval reference writes the same file where asked; fid reads it as precomputed statistics
    out = tmp_path / "digits_ref.npz"
    assert evaluate.main(["reference", str(digits_shards), "--inception-weights", inception, "--out", str(out),
                          "--limit", "100"]) == 0
    written = Scorer(str(out), inception, device="cpu").adm(samples)
    assert written["reference_stats"] == "precomputed"
    assert written["fid"] == pytest.approx(first["fid"], rel=1e-9) and written["recall"] == first["recall"]
    torch.manual_seed(1)                                  # other weights: another sha256
    different = tmp_path / "different.pt"
    torch.jit.script(TinyInception()).save(str(different))
    with pytest.raises(ValueError, match="sha256"):
        Scorer(str(out), str(different), device="cpu").adm(samples)
