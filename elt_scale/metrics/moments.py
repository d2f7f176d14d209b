"""Gaussian statistics of feature sets in float64, accumulated a batch at a time, and the Fréchet distance
between two of them as ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) computes it.

Moments keep the count, the sum and the sum of outer products in float64 on the features' device, so a
set of any size costs O(D²) memory, and the moments of disjoint parts add up (ranks, batches)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

SINGULAR_EPS = 1e-6       # ADM: added to both diagonals when sqrtm of the product is not finite
IMAGINARY_ATOL = 1e-3     # ADM: larger imaginary parts on the diagonal of the square root are an error


@dataclass
class Moments:
    count: int
    total: torch.Tensor       # (D,) float64
    outer: torch.Tensor       # (D, D) float64

    @classmethod
    def empty(cls, dim: int, device="cpu") -> "Moments":
        return cls(0, torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray, chunk: int = 4096, device="cpu") -> "Moments":
        """The moments of a whole (N, D) matrix, accumulated in row chunks in order."""
        x = torch.as_tensor(features)
        m = cls.empty(x.shape[1], device)
        for i in range(0, len(x), chunk):
            m.add(x[i:i + chunk].to(device))
        return m

    def add(self, batch: torch.Tensor) -> None:
        x = batch.to(self.total.device, torch.float64)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def merged(self, other: "Moments") -> "Moments":
        return Moments(self.count + other.count, self.total + other.total.to(self.total.device),
                       self.outer + other.outer.to(self.outer.device))

    def cpu(self) -> "Moments":
        return Moments(self.count, self.total.cpu(), self.outer.cpu())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64; sigma is the unbiased covariance (N - 1), as numpy.cov gives."""
        if self.count < 2:
            raise ValueError(f"a covariance needs >= 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with ADM's numerics: scipy's sqrtm
    of the product (set 1 = samples, set 2 = reference, in that order); when that is not finite, 1e-6 on
    both diagonals and again; a complex result is accepted when the imaginary parts of its diagonal are
    within 1e-3 of 0 (then the real part is used), else it is an error. SciPy's singular-matrix
    warnings are silenced (small in-training sample sets always trigger them); ADM lets them print."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mean {mu1.shape} vs {mu2.shape}, covariance "
                         f"{sigma1.shape} vs {sigma2.shape} (reference made with another network or layer?)")
    _require_finite(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * SINGULAR_EPS
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"Fréchet distance: the square root of the covariance product has imaginary "
                             f"components up to {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _require_finite(**stats: np.ndarray) -> None:
    """A ValueError naming the first non-finite statistic: scipy's sqrtm can run for minutes on a 2048² matrix
    holding NaN instead of raising, and the distance would be NaN anyway."""
    for name, a in stats.items():
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            which = "samples'" if name.endswith("1") else "reference's"
            raise ValueError(f"Fréchet distance: {name} (the {which} statistics) holds {bad} non-finite values "
                             "(NaN/inf); refusing to compute it")
