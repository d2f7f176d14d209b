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

import numpy as np
import torch

from .manifold import K_NEIGHBOURS, precision_recall
from .moments import Moments, frechet_from_stats

IS_SPLIT = 5000            # ADM's split_size
METRIC_KEYS = ("is", "fid", "sfid", "precision", "recall")


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
