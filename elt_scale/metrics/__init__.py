"""Sample-quality metrics: ADM's suite (IS, FID, sFID, precision, recall) from Inception features, FVD
through torchmetrics with local feature networks, and the digits classifier (class consistency + Fréchet
distance in its feature space) for CPU-sized runs.

    detectors.py  local weights files -> Inception / I3D modules (nothing is downloaded)
    inception.py  what is read from the Inception ports: pool, spatial (mixed_6/conv), logit weights
    moments.py    float64 streaming mean/covariance; the Fréchet distance as ADM computes it
    manifold.py   k-NN manifolds: precision and recall as ADM's ManifoldEstimator
    adm.py        the suite from feature sets
    frechet.py    torchmetrics Fréchet distances (FVD, FD-digits)
    digits.py     the digits classifier"""
from .adm import FeatureSet, ReferenceStats, adm_metrics, inception_score
from .detectors import MissingWeightsError, file_sha256, load_i3d, load_inception
from .digits import digits_metrics, load_classifier
from .frechet import frechet_distance, fvd
from .manifold import precision_recall
from .moments import Moments, frechet_from_stats

__all__ = ["FeatureSet", "ReferenceStats", "adm_metrics", "inception_score", "MissingWeightsError", "file_sha256",
           "load_inception", "load_i3d", "digits_metrics", "load_classifier", "frechet_distance", "fvd",
           "precision_recall", "Moments", "frechet_from_stats"]
