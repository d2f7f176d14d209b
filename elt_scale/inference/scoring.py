"""Scoring sample sets: the digits classifier for 8×8 digit models, FID (and IS) with a local Inception,
FVD with a local I3D. A `Scorer` keeps what does not change between sample sets (the feature networks,
the reference images): `elt-eval`, the any-time sweep and the in-training evaluation all score through it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("digits", "fid", "fvd")
LOWER_IS_BETTER = {"fd_digits": True, "class_acc": False, "fid": True, "is": False, "fvd": True}


def is_digits(images: np.ndarray, num_classes: int) -> bool:
    return images.ndim == 4 and images.shape[1:3] == (8, 8) and num_classes == 10


def choose_metric(metric: str, images: np.ndarray, num_classes: int) -> str:
    """'auto' -> digits for 8×8 digit models, fvd for video, fid otherwise."""
    if metric != "auto":
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: auto, {', '.join(METRICS)}")
        return metric
    if is_digits(images, num_classes):
        return "digits"
    return "fvd" if images.ndim == 5 else "fid"


class Scorer:
    """scorer(images, labels, metric) -> {name: value}. `reference` (an ADM .npz or a shards dir) and the
    weights files are needed for fid/fvd only, and loaded once, at first use."""

    def __init__(self, reference: str | Path | np.ndarray | None = None, inception_weights=None, i3d_weights=None,
                 inception_score: bool = False, reference_limit: int = 50_000):
        self.reference, self.reference_limit = reference, reference_limit
        self.inception_weights, self.i3d_weights, self.inception_score = inception_weights, i3d_weights, inception_score
        self._cache: dict = {}

    def __call__(self, images: np.ndarray, labels: np.ndarray | None, metric: str) -> dict[str, float]:
        if metric == "digits":
            if labels is None:
                raise ValueError("class consistency needs the samples' labels (arr_1)")
            return self._get("digits", self._digits)(images, labels)
        if metric == "fid":
            from ..metrics import frechet_distance, inception_score
            out = {"fid": frechet_distance(images, self._reference(), self._get("inception", self._inception))}
            if self.inception_score:
                out["is"] = inception_score(images, self._get("logits", self._logits))[0]
            return out
        if metric == "fvd":
            from ..metrics import fvd
            return {"fvd": fvd(images, self._reference(), self._get("i3d", self._i3d))}
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")

    def _get(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _reference(self) -> np.ndarray:
        if self.reference is None:
            raise ValueError("fid/fvd need reference images: pass --reference REF.npz or a shards dir")
        if isinstance(self.reference, np.ndarray):
            return self.reference
        from .reference import load_reference
        return self._get("reference", lambda: load_reference(self.reference, self.reference_limit))

    @staticmethod
    def _digits():
        from ..metrics.digits import DigitsScorer
        return DigitsScorer()

    def _inception(self):
        from ..metrics import load_inception
        return load_inception(self.inception_weights, "features")

    def _logits(self):
        from ..metrics import load_inception
        return load_inception(self.inception_weights, "logits")

    def _i3d(self):
        from ..metrics import load_i3d
        return load_i3d(self.i3d_weights)
