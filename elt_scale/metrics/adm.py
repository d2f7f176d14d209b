"""ADM's evaluation suite (openai/guided-diffusion evaluations/evaluator.py) from Inception features:
Inception Score, FID, sFID, precision and recall. Feature extraction is elsewhere
(elt_scale/inference/features.py); this module only turns feature sets into numbers.

    FID        Fréchet distance of pool features: samples' statistics against the reference's
    sFID       the same on the spatial mixed_6/conv features
    IS         exp(mean KL(p(y|x) || p(y))) over consecutive splits of 5,000 samples, mean over splits,
               p(y|x) = softmax(pool @ W.T) without the output bias, 1008 classes
    precision  share of samples inside the k=3 manifold of the reference pool features
    recall     share of reference pool features inside the samples' manifold

Statistics are float64 (ADM: the sample mean in float32, covariances float64). IS computes logits in
float32 as TF does and the softmax and KL in float64 (ADM: float32, which gives NaN where a probability
underflows to 0; otherwise the two agree to float32 rounding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .manifold import K_NEIGHBOURS, precision_recall
from .moments import Moments, frechet_from_stats

IS_SPLIT = 5000            # ADM's split_size
METRIC_KEYS = ("is", "fid", "sfid", "precision", "recall")
SYMMETRY_RTOL, SYMMETRY_ATOL = 1e-6, 1e-12   # of max|S|: real ADM covariances are symmetric to float rounding
STAT_PAIRS = (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial"))     # file keys and the features they describe
FEATURES = {"pool": "the Inception pool features", "spatial": "the Inception spatial features (mixed_6/conv)"}


class BadReference(ValueError):
    """Reference statistics that cannot give a meaningful number (non-finite, asymmetric, of another size).
    The message is one line naming the file and the key."""


@dataclass
class FeatureSet:
    """A set's features as the suite needs them: every pool vector (precision/recall, IS) in set order,
    and only the moments of the spatial ones."""
    pool: np.ndarray                  # (N, D) float32
    spatial: Moments | None

    def pool_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return Moments.of(self.pool).mean_cov()

    def spatial_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.spatial is None else self.spatial.mean_cov()


@dataclass
class ReferenceStats:
    """What the suite compares samples with: (mu, sigma) for FID, (mu_s, sigma_s) for sFID, and reference
    pool features for precision/recall; a missing part leaves its metric out."""
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None

    @classmethod
    def of(cls, features: FeatureSet, pr_limit: int | None = None) -> "ReferenceStats":
        spatial = features.spatial_stats() or (None, None)
        return cls(*features.pool_stats(), *spatial, features.pool[:pr_limit])

    def checked(self, where, pool_dim: int | None = None, spatial_dim: int | None = None) -> "ReferenceStats":
        """self, once check_reference_arrays passes (BadReference names `where` and the file's key)."""
        check_reference_arrays({"mu": self.mu, "sigma": self.sigma, "mu_s": self.mu_s, "sigma_s": self.sigma_s,
                                "pool_features": self.pool}, where, pool_dim, spatial_dim)
        return self


# ---------------------------------------------------------------------------------------------
# reference statistics as read from a file: checked before any work, since a NaN gives "fid": NaN (and can
# keep scipy's sqrtm busy for minutes on 2048² matrices) and a wrong size fails only after all sampling

def check_reference_arrays(arrays: Mapping[str, np.ndarray | None], where, pool_dim: int | None = None,
                           spatial_dim: int | None = None) -> None:
    """Reference arrays by file key (mu, sigma, mu_s, sigma_s, pool_features; absent or None: skipped): all
    finite, each sigma square and symmetric, each mu 1-D of sigma's side, and of the feature network's
    dimensions where given (pool_dim: mu, pool_features; spatial_dim: mu_s). Raises BadReference."""
    dims = {"pool": pool_dim, "spatial": spatial_dim}
    present = {k: v for k, v in arrays.items() if v is not None}
    for mu_key, sigma_key, features in STAT_PAIRS:
        if mu_key in present or sigma_key in present:
            _check_pair(present, where, mu_key, sigma_key, dims[features], FEATURES[features])
    if "pool_features" in present:
        expected = (len(present["mu"]), "'mu' has") if "mu" in present else (pool_dim, f"{FEATURES['pool']} have")
        _check_pool_features(_real_array(present["pool_features"], where, "pool_features"), where, *expected)


def _check_pair(arrays, where, mu_key: str, sigma_key: str, dim: int | None, features: str) -> None:
    for key in (mu_key, sigma_key):
        if key not in arrays:
            other = sigma_key if key == mu_key else mu_key
            raise BadReference(f"{where}: key {other!r} without {key!r}: a Fréchet distance needs both")
    mu, sigma = _real_array(arrays[mu_key], where, mu_key), _real_array(arrays[sigma_key], where, sigma_key)
    if mu.ndim != 1:
        raise BadReference(f"{where}: key {mu_key!r} has shape {mu.shape}, expected a 1-D mean vector")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise BadReference(f"{where}: key {sigma_key!r} has shape {sigma.shape}, expected a square covariance")
    if len(mu) != len(sigma):
        raise BadReference(f"{where}: key {mu_key!r} has {len(mu)} values but {sigma_key!r} is "
                           f"{len(sigma)}×{len(sigma)}")
    if dim is not None and len(mu) != dim:
        raise BadReference(f"{where}: key {mu_key!r} has {len(mu)} values but {features} have {dim} (statistics "
                           "of another network or layer?)")
    asymmetry = float(np.max(np.abs(sigma - sigma.T), initial=0.0))
    if asymmetry > SYMMETRY_RTOL * float(np.max(np.abs(sigma), initial=0.0)) + SYMMETRY_ATOL:
        raise BadReference(f"{where}: key {sigma_key!r} is not symmetric (max |S - Sᵀ| = {asymmetry:.3g}); "
                           "not a covariance matrix")


def _check_pool_features(pool: np.ndarray, where, dim: int | None, source: str) -> None:
    if pool.ndim != 2 or pool.shape[0] <= K_NEIGHBOURS:
        raise BadReference(f"{where}: key 'pool_features' has shape {pool.shape}, expected (N, D) with "
                           f"N > {K_NEIGHBOURS} (precision/recall use k={K_NEIGHBOURS} neighbours)")
    if dim is not None and pool.shape[1] != dim:
        raise BadReference(f"{where}: key 'pool_features' has {pool.shape[1]} values per image but {source} {dim}")


def _real_array(value, where, key: str) -> np.ndarray:
    """The array if it is real numbers and all finite; else BadReference naming the key."""
    a = np.asarray(value)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise BadReference(f"{where}: key {key!r} holds {a.dtype} values, expected real numbers")
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise BadReference(f"{where}: key {key!r} holds {bad} non-finite values (NaN/inf)")
    return a


def inception_score(pool: np.ndarray, logit_weight: torch.Tensor, split_size: int = IS_SPLIT) -> float:
    weight = logit_weight.detach().float().cpu()
    scores = []
    for i in range(0, len(pool), split_size):
        logits = torch.as_tensor(np.asarray(pool[i:i + split_size], np.float32)) @ weight.T
        log_p = torch.log_softmax(logits.double(), dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def adm_metrics(samples: FeatureSet, reference: ReferenceStats, logit_weight: torch.Tensor | None,
                k: int = K_NEIGHBOURS, distances: str = "float16", device="cpu") -> dict[str, float | None]:
    """{'is', 'fid', 'sfid', 'precision', 'recall'}; None where the reference (or network) lacks the part."""
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    if logit_weight is not None:
        out["is"] = inception_score(samples.pool, logit_weight)
    if reference.mu is not None:
        out["fid"] = frechet_from_stats(*samples.pool_stats(), reference.mu, reference.sigma)
    spatial = samples.spatial_stats()
    if reference.mu_s is not None and spatial is not None:
        out["sfid"] = frechet_from_stats(*spatial, reference.mu_s, reference.sigma_s)
    if reference.pool is not None:
        out["precision"], out["recall"] = precision_recall(reference.pool, samples.pool, k, precision=distances,
                                                           device=device)
    return out
