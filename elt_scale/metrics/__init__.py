"""Sample-quality metrics: FID/IS/FVD through torchmetrics with local feature networks, and the
digits classifier (class consistency + Fréchet distance in its feature space) for CPU-sized runs."""
from .detectors import MissingWeightsError, load_i3d, load_inception
from .digits import digits_metrics, load_classifier
from .frechet import frechet_distance, fvd, inception_score

__all__ = ["MissingWeightsError", "load_inception", "load_i3d", "digits_metrics", "load_classifier",
           "frechet_distance", "fvd", "inception_score"]
