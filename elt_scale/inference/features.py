"""Inception features of an image set, streamed: batches of uint8 images (from an array, a lazily read
.npz or a shard set) go through the network one at a time, and only what the suite needs is kept: each
pool vector, and the float64 moments of the spatial vectors. Memory: one batch of resized images, N×2048
pool floats, two 2023² matrices.

Under torchrun rank r takes batches b ≡ r (mod world) and rank 0 gathers the pool vectors (put back in
set order, so IS splits and statistics are those of one process) and sums the spatial moments."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..metrics.adm import FeatureSet
from ..metrics.frechet import to_nchw
from ..metrics.moments import Moments
from .outputs import NpzStream

BATCH = 64                       # ADM's evaluator feeds 64 images at a time

Keep = Callable[[int], bool]
Batches = Callable[[Keep], Iterator[tuple[int, np.ndarray]]]   # keep -> (batch index, uint8 images)
Share = tuple[dict[int, np.ndarray], Moments | None]           # one rank's pool vectors by batch, spatial moments


def array_batches(images, batch_size: int = BATCH) -> Batches:
    """An array (or memory map, or NpzStream) of uint8 (N, H, W, 3) images as batches."""
    if isinstance(images, NpzStream):
        return lambda keep: images.batches(batch_size, keep)

    def batches(keep: Keep):
        for b, start in enumerate(range(0, len(images), batch_size)):
            if keep(b):
                yield b, np.asarray(images[start:start + batch_size])
    return batches


@torch.no_grad()
def extract_features(batches: Batches, net, device="cpu", rank: int = 0, world: int = 1,
                     total: int | None = None, desc: str = "inception features") -> FeatureSet | None:
    """This rank's share of the batches through `net`; collective under world > 1. Rank 0 gets the set's
    FeatureSet, the other ranks None."""
    return gather_features(local_features(batches, net, device, rank, world, total, desc), rank, world)


@torch.no_grad()
def local_features(batches: Batches, net, device="cpu", rank: int = 0, world: int = 1,
                   total: int | None = None, desc: str = "inception features") -> Share:
    """This rank's share (batches b ≡ rank mod world) through `net`, no collective: (pool vectors by batch,
    spatial moments on the CPU), what gather_features / merge_features put together."""
    pools: dict[int, np.ndarray] = {}
    spatial: Moments | None = None
    bar = tqdm(total=total, desc=desc, leave=False, unit="img", disable=rank != 0 or (total or 0) <= 4 * BATCH)
    for b, images in batches(lambda b: b % world == rank):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"Inception features need uint8 images (N, H, W, 3), got {images.shape} {images.dtype}")
        pool, spat = net(to_nchw(np.array(images)).to(device))      # a writable copy of one batch
        pools[b] = pool.cpu().numpy()
        if spat is not None:
            spatial = spatial or Moments.empty(spat.shape[1], device)
            spatial.add(spat)
        bar.update(min(len(images) * world, (total or bar.n + len(images) * world) - bar.n))
    bar.close()
    return pools, None if spatial is None else spatial.cpu()


def extractor(net, device="cpu", rank: int = 0, world: int = 1):
    """extract(batches, total, desc) -> FeatureSet | None, with this network on this rank layout."""
    return lambda batches, total=None, desc="inception features": extract_features(batches, net, device, rank,
                                                                                   world, total, desc)


def gather_features(share: Share, rank: int, world: int) -> FeatureSet | None:
    """Collective under world > 1: every rank's share to rank 0, merged there (the others get None)."""
    if world == 1:
        return merge_features([share])
    shares = [None] * world if rank == 0 else None
    dist.gather_object(share, shares, dst=0)
    return merge_features(shares) if rank == 0 else None


def merge_features(shares: list[Share]) -> FeatureSet:
    """Every rank's share as one FeatureSet: pool vectors in set order, spatial moments summed."""
    merged = {b: p for rank_pools, _ in shares for b, p in rank_pools.items()}
    if not merged:
        raise ValueError("no images to compute features of")
    moments = [m for _, m in shares if m is not None]
    total = moments[0] if moments else None
    for m in moments[1:]:
        total = total.merged(m)
    return FeatureSet(np.concatenate([merged[b] for b in sorted(merged)]), total)
