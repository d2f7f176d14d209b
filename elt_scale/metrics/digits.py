"""A small digits classifier for quality on a CPU in seconds: class consistency (does a sample look like
the class it was conditioned on) and a Fréchet distance in the classifier's hidden feature space
against the real digits ("FD-digits", an FID stand-in for 8×8 grey images).

Trained once on scikit-learn's digits (train split: every image not divisible by 10) and cached as a
plain .npz of weights (no pickles) under ~/.cache/elt-scale; the held-out accuracy is stored with it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

CACHE_NAME = "digits_classifier_v1.npz"
HIDDEN = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "elt-scale"


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float images (N, 8, 8) in [0, 1] and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def train_classifier(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.neural_network import MLPClassifier

    images, labels = real_digits()
    val = np.arange(len(labels)) % 10 == 0
    x = images.reshape(len(images), -1)
    clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, max_iter=600, random_state=seed)
    clf.fit(x[~val], labels[~val])
    return {"w1": clf.coefs_[0], "b1": clf.intercepts_[0], "w2": clf.coefs_[1], "b2": clf.intercepts_[1],
            "val_accuracy": np.array(clf.score(x[val], labels[val]))}


class DigitsClassifier(nn.Module):
    """uint8 (B, 3, 8, 8) (grey repeated, as in the .npz) or float (B, 1, 8, 8) in [0, 1] -> logits;
    `features` gives the hidden layer (the space of FD-digits)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, HIDDEN), nn.Linear(HIDDEN, 10)
        with torch.no_grad():
            for layer, w, b in ((self.hidden, "w1", "b1"), (self.out, "w2", "b2")):
                layer.weight.copy_(torch.as_tensor(weights[w]).T.float())
                layer.bias.copy_(torch.as_tensor(weights[b]).float())
        self.val_accuracy = float(weights["val_accuracy"])
        self.num_features = HIDDEN

    @staticmethod
    def _grey(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != (8, 8):
            raise ValueError(f"the digits classifier reads 8×8 images, got {tuple(x.shape[-2:])}")
        return x.mean(1).flatten(1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(self._grey(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


class DigitsFeatures(nn.Module):
    """The classifier's hidden layer as a torchmetrics feature extractor."""

    def __init__(self, clf: DigitsClassifier):
        super().__init__()
        self.clf, self.num_features = clf, HIDDEN

    def forward(self, images):
        return self.clf.features(images)


def load_classifier(cache_dir: str | Path | None = None) -> DigitsClassifier:
    """Load the cached classifier, training and caching it first if needed (~2 s)."""
    path = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            weights = dict(f)
    else:
        weights = train_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **weights)
        os.replace(tmp, path)                 # atomic: concurrent processes never read half a file
    return DigitsClassifier(weights).eval()


def real_digits_uint8() -> np.ndarray:
    images, _ = real_digits()
    u8 = np.round(images * 255).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=-1)


class DigitsScorer:
    """Class consistency and FD-digits of sample sets against the real digits, whose features are computed
    once per scorer (reused across every L of every evaluation)."""

    def __init__(self, clf: DigitsClassifier | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        from .frechet import to_nchw
        self.clf, self.to_nchw = clf or load_classifier(), to_nchw
        self.fd = FrechetInceptionDistance(feature=DigitsFeatures(self.clf), reset_real_features=False,
                                           sync_on_compute=False)     # one process computes it
        with torch.no_grad():
            self.fd.update(to_nchw(real_digits_uint8()), real=True)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """samples uint8 (N, 8, 8, 3), labels (N,) -> {'class_acc', 'fd_digits'} (acc in [0, 1])."""
        x = self.to_nchw(samples)
        self.fd.reset()                                        # keeps the real features
        self.fd.update(x, real=False)
        acc = float((self.clf(x).argmax(-1).numpy() == np.asarray(labels)).mean())
        return {"class_acc": acc, "fd_digits": float(self.fd.compute())}


def digits_metrics(samples: np.ndarray, labels: np.ndarray, clf: DigitsClassifier | None = None) -> dict:
    """One sample set's {'class_acc', 'fd_digits'} (a scorer built for it)."""
    return DigitsScorer(clf)(samples, labels)
