"""Precision and recall of a sample set against a reference set (Kynkäänniemi et al. 2019) with the
semantics of ADM's ManifoldEstimator (openai/guided-diffusion evaluations/evaluator.py):

  * distances are squared Euclidean, |u|² - 2 u·v + |v|², clamped at 0, computed in blocks of
    10,000 × 10,000 feature vectors;
  * ADM computes each block in float16 first and takes the float32 result for the whole block only if
    some float16 entry is not finite; `precision="float16"` (the default) reproduces this, with each
    float16 operation emulated as a float32 computation rounded to float16 (products accumulated in
    float32, as cuBLAS does for TF's float16 matmul by default); `precision="float32"` skips float16;
  * the radius of a point is the (k+1)-th smallest distance in its row of its own set's distance
    matrix, that row including the point itself at distance 0: with k = 3, the 3rd nearest other point;
    no radius is clamped (ADM's clamp_to_percentile is None);
  * a point is inside a manifold when its distance to some point of it is <= that point's radius;
    precision = share of samples inside the reference manifold, recall = share of reference points
    inside the sample manifold."""
from __future__ import annotations

import numpy as np
import torch

K_NEIGHBOURS = 3
BLOCK = 10_000                 # ADM's row_batch_size and col_batch_size
PRECISIONS = ("float16", "float32")


def _half(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to float16 (inf where float16 overflows), kept as float32."""
    return x.to(torch.float16).to(torch.float32)


def _distances(u: torch.Tensor, v: torch.Tensor, rounded) -> torch.Tensor:
    norm_u = rounded(rounded(u * u).sum(1, keepdim=True))
    norm_v = rounded(rounded(v * v).sum(1)[None, :])
    two_uv = rounded(2 * rounded(u @ v.T))
    return rounded(rounded(norm_u - two_uv) + norm_v).clamp_min(0)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, precision: str = "float16") -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared distances in float32, one ADM distance block."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    u, v = u.to(torch.float32), v.to(torch.float32)
    if precision == "float16":
        d16 = _distances(_half(u), _half(v), _half)
        if torch.isfinite(d16).all():
            return d16
    return _distances(u, v, lambda x: x)


def knn_radii(features: torch.Tensor, k: int = K_NEIGHBOURS, block: int = BLOCK,
              precision: str = "float16") -> torch.Tensor:
    """(N, D) -> (N,) squared k-NN radii (self counted at distance 0, so the k-th other point)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        best = torch.empty((len(rows), 0), device=features.device)      # the k+1 smallest so far, per row
        for c0 in range(0, n, block):
            d = pairwise_sq_distances(rows, features[c0:c0 + block], precision)
            smallest = d.topk(min(k + 1, d.shape[1]), 1, largest=False).values
            best = torch.cat([best, smallest], 1).topk(min(k + 1, best.shape[1] + smallest.shape[1]), 1,
                                                       largest=False).values
        radii[r0:r0 + block] = best[:, k]
    return radii


def manifold_membership(reference: torch.Tensor, reference_radii: torch.Tensor, samples: torch.Tensor,
                        sample_radii: torch.Tensor, block: int = BLOCK,
                        precision: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """(samples inside the reference manifold, reference points inside the sample manifold), bool masks."""
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    reference_in = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    for r0 in range(0, len(reference), block):
        ref, ref_radii = reference[r0:r0 + block], reference_radii[r0:r0 + block]
        for s0 in range(0, len(samples), block):
            d = pairwise_sq_distances(ref, samples[s0:s0 + block], precision)
            reference_in[r0:r0 + block] |= (d <= sample_radii[None, s0:s0 + block]).any(1)
            sample_in[s0:s0 + block] |= (d <= ref_radii[:, None]).any(0)
    return sample_in, reference_in


def precision_recall(reference, samples, k: int = K_NEIGHBOURS, block: int = BLOCK,
                     precision: str = "float16", device="cpu") -> tuple[float, float]:
    """ADM's improved precision and recall of `samples` against `reference` ((N, D) feature arrays)."""
    ref = torch.as_tensor(np.asarray(reference, np.float32)).to(device)
    smp = torch.as_tensor(np.asarray(samples, np.float32)).to(device)
    ref_radii = knn_radii(ref, k, block, precision)
    smp_radii = knn_radii(smp, k, block, precision)
    sample_in, reference_in = manifold_membership(ref, ref_radii, smp, smp_radii, block, precision)
    return float(sample_in.double().mean()), float(reference_in.double().mean())
