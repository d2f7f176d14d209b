"""Tokenizer registry: raw pixels in [0, 1] (B, C, [T,] H, W) <-> what the shards store.

`pixels` needs no weights (tests and the demo); the learned tokenizers load through their owning
library's `from_pretrained` and are imported only when asked for."""
from __future__ import annotations

from .pixels import PixelTokenizer

REGISTRY = {"pixels": PixelTokenizer}


def build_tokenizer(name: str, **kwargs):
    if name not in REGISTRY:
        raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**kwargs)


def tokenizer_from_manifest(manifest: dict, **overrides):
    info = dict(manifest["tokenizer"])
    name = info.pop("name")
    return build_tokenizer(name, **{**info, **overrides})
