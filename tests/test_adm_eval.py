"""ADM's evaluation suite, the parts that need no feature extraction: precision/recall against an independent
k-NN written here, float16 distances as ADM's DistanceBlock, IS splits, the TF1 resize rule, and what is read
from torch-fidelity's port."""
import numpy as np
import pytest
import torch

from elt_scale.metrics.adm import inception_score
from elt_scale.metrics.inception import FidelityInception, resize_like_tf1
from elt_scale.metrics.manifold import pairwise_sq_distances, precision_recall


def knn_pr(reference, samples, k=3):
    """Independent precision/recall: whole float64 distance matrices, radii from sorted rows."""
    d = lambda a, b: ((a[:, None].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)  # noqa: E731
    ref_radii, smp_radii = np.sort(d(reference, reference), 1)[:, k], np.sort(d(samples, samples), 1)[:, k]
    cross = d(reference, samples)
    return (cross <= ref_radii[:, None]).any(0).mean(), (cross <= smp_radii[None, :]).any(1).mean()


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


def test_resize_follows_tf1_rule():
    from tests.tiny_models import tf1_resize
    x = torch.randint(0, 256, (2, 3, 37, 23)).float()
    assert (resize_like_tf1(x) - tf1_resize(x, 299)).abs().max() < 0.01         # of 255: float32 grid rounding
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (half_pixel - tf1_resize(x, 299)).abs().max() > 10                       # the rule PyTorch's default is not


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
