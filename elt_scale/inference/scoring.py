"""Scoring sample sets: the digits classifier for 8×8 digit models, ADM's suite (IS, FID, sFID, precision,
recall) with a local Inception, FVD with a local I3D. A `Scorer` keeps what does not change between sample
sets (the feature networks, the reference statistics): `elt-eval`, the any-time sweep and the in-training
evaluation all score through it, so they give the same numbers for the same images.

'fid' is ADM's whole suite (elt_scale/metrics/adm.py) on features extracted streaming
(elt_scale/inference/features.py); with world > 1 it is a collective (every rank calls it with the same
images and takes its share of the batches; rank 0 gets the numbers, the others {})."""
from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("digits", "fid", "fvd")
LOWER_IS_BETTER = {"fd_digits": True, "class_acc": False, "fid": True, "sfid": True, "is": False,
                   "precision": False, "recall": False, "fvd": True}
PAPER_SAMPLES = 50_000      # ADM's protocol: FID of 50,000 samples


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
    """scorer(images, labels, metric) -> {name: value}. `reference` (an ADM .npz, a shards dir or an array)
    and the weights files are needed for fid/fvd only, and loaded once, at first use. `reference_limit`:
    images of a shard reference; `cache_dir`: where a shard reference's statistics are kept (default
    $XDG_CACHE_HOME/elt-scale/reference)."""

    def __init__(self, reference: str | Path | np.ndarray | None = None, inception_weights=None, i3d_weights=None,
                 reference_limit: int = 50_000, rank: int = 0, world: int = 1, device=None, batch_size: int = 64,
                 pr_distances: str = "float16", cache_dir=None):
        from ..dist import local_device
        self.reference, self.reference_limit = reference, reference_limit
        self.inception_weights, self.i3d_weights = inception_weights, i3d_weights
        self.rank, self.world, self.device = rank, world, device or local_device()
        self.batch_size, self.pr_distances, self.cache_dir = batch_size, pr_distances, cache_dir
        self._cache: dict = {}

    def __call__(self, images, labels: np.ndarray | None, metric: str) -> dict[str, float]:
        if metric == "digits":
            if labels is None:
                raise ValueError("class consistency needs the samples' labels (arr_1)")
            return self._get("digits", self._digits)(images, labels)
        if metric == "fid":
            record = self.adm(images)
            return {k: record[k] for k in ("is", "fid", "sfid", "precision", "recall")
                    if record and record[k] is not None}
        if metric == "fvd":
            from ..metrics import fvd
            return {"fvd": fvd(images, self._reference_images(), self._get("i3d", self._i3d))}
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")

    def adm(self, images) -> dict | None:
        """ADM's suite with its provenance (rank 0; None on the others): {'is', 'fid', 'sfid', 'precision',
        'recall', 'num_samples', 'reference', 'reference_stats', 'reference_pr_images',
        'inception_weights', 'inception_sha256'}. `images`: uint8 (N, H, W, 3), a memory map or NpzStream,
        the same on every rank (each takes its share of the batches)."""
        from .features import array_batches

        if getattr(images, "ndim", len(getattr(images, "shape", ()))) != 4:
            raise ValueError(f"FID/IS/sFID/precision/recall are for images (N, H, W, 3), got shape "
                             f"{tuple(images.shape)}; videos are scored with fvd")
        return self.adm_of(array_batches(images, self.batch_size), len(images))

    def adm_of(self, batches, total: int) -> dict | None:
        """As `adm`, from a features.Batches source: each rank feeds the batches it holds (b ≡ rank mod world),
        e.g. the samples it generated itself, so no rank needs the others' images."""
        from .features import gather_features

        self.prepare_reference()
        features = gather_features(self.features_of(batches, total), self.rank, self.world)
        return self.adm_of_features(features) if self.rank == 0 else None

    def features_of(self, batches, total: int | None = None):
        """This rank's share of a set's Inception features (features.Share), no collective: for a caller that
        gathers them itself (features.merge_features) and scores on one rank (`adm_of_features`)."""
        from .features import local_features
        net, _ = self._inception()
        return local_features(batches, net, self.device, self.rank, self.world, total, "sample features")

    def adm_of_features(self, features) -> dict:
        """ADM's suite of a whole set's FeatureSet, with its provenance (see `adm`). No collective: the
        reference must have been prepared (`prepare_reference`, a collective the first time) already."""
        from ..metrics import adm_metrics
        if "adm_reference" not in self._cache:
            raise RuntimeError("Scorer.prepare_reference() must run on every rank before scoring on one")
        net, sha = self._inception()
        reference = self._cache["adm_reference"]
        values = adm_metrics(features, reference.stats, net.logit_weight, distances=self.pr_distances,
                             device=self.device)
        pr_images = None if reference.stats.pool is None else len(reference.stats.pool)
        return {**values, "num_samples": len(features.pool), "reference": reference.where,
                "reference_stats": reference.kind, "reference_pr_images": pr_images,
                "inception_weights": str(self.inception_weights), "inception_sha256": sha}

    def _get(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _require_reference(self):
        if self.reference is None:
            raise ValueError("fid/fvd need a reference: pass --reference REF.npz (ADM reference batch) or a shards dir")
        return self.reference

    def prepare_reference(self):
        """The reference statistics, loaded or computed (split across ranks, cached) once; collective under
        world > 1 the first time. Rank 0 gets the Reference, the others None."""
        from .reference import adm_reference
        net, sha = self._inception()
        return self._get("adm_reference", lambda: adm_reference(
            self._require_reference(), net, sha, self.device, self.rank, self.world, self.reference_limit,
            self.batch_size, self.cache_dir))

    def _reference_images(self) -> np.ndarray:
        if isinstance(self._require_reference(), np.ndarray):
            return self.reference
        from .reference import load_reference
        return self._get("reference", lambda: load_reference(self.reference, self.reference_limit))

    def _inception(self):
        def make():
            from ..metrics import file_sha256, load_inception
            net = load_inception(self.inception_weights).to(self.device)
            return net, file_sha256(self.inception_weights)
        return self._get("inception", make)

    @staticmethod
    def _digits():
        from ..metrics.digits import DigitsScorer
        return DigitsScorer()

    def _i3d(self):
        from ..metrics import load_i3d
        return load_i3d(self.i3d_weights)
