"""Sample sets: `num` class-conditional samples at one loop schedule, decoded to uint8 images or videos,
split across ranks and gathered back in global order.

Sample i gets class i mod num_classes (or classes[i mod len], or one class), and batch b of `batch_size`
samples draws its randomness from (seed, b) alone: the images do not depend on the number of ranks, and
`elt-sample`, `elt-eval anytime`, the in-training evaluation and `ELT.generate` give the same images for
the same seed, loops, cfg and batch size."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..sampling import LoopSchedule, generate
from ..seeding import generator


@dataclass
class SampleSet:
    images: np.ndarray        # uint8 (N, H, W, 3) or (N, T, H, W, 3)
    labels: np.ndarray        # int64 (N,)
    gflops_per_sample: float  # mean over samples: every pass and loop actually run, CFG included
    loops_per_step: float     # mean loops per forward pass (differs from L only for auto)
    wall_s: float
    index: np.ndarray         # global sample ids


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [0, 1], (B, C, H, W) or (B, C, T, H, W) -> uint8 channels-last with 3 channels."""
    x = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.movedim(1, -1)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.contiguous().numpy()


def class_labels(indices: range, num_classes: int, class_id: int | None = None,
                 classes: list[int] | None = None) -> torch.Tensor:
    """Balanced labels: sample i gets class i mod num_classes (or always `class_id`, or classes[i mod len])."""
    if class_id is not None:
        return torch.full((len(indices),), class_id, dtype=torch.long)
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def empty_set(wall_s: float = 0.0) -> SampleSet:
    return SampleSet(np.zeros((0,), np.uint8), np.zeros((0,), np.int64), 0.0, 0.0, wall_s, np.zeros(0, np.int64))


def sample_set(model, recipe, schedule: LoopSchedule, num: int, decoder, cfg: float = 1.0,
               steps: int | None = None, sampler: str = "ddpm", seed: int = 0, batch_size: int = 64,
               class_id: int | None = None, rank: int = 0, world: int = 1, progress: bool = True,
               temperature: float = 1.0, classes: list[int] | None = None) -> SampleSet:
    """This rank's share (batches b with b % world == rank) of `num` samples, decoded."""
    num_batches = (num + batch_size - 1) // batch_size
    mine = range(rank, num_batches, world)
    images, labels, flops, loops = [], [], [], []
    start = time.perf_counter()
    device = next(model.parameters()).device
    for b in tqdm(mine, desc=f"sampling L={schedule.spec}", disable=not progress or rank != 0, leave=False):
        idx = range(b * batch_size, min(num, (b + 1) * batch_size))
        y = class_labels(idx, recipe.model.num_classes, class_id, classes).to(device)
        z, cost = generate(model, recipe, y, schedule, cfg, steps, sampler, generator(seed, "sample", b), temperature)
        images.append(to_uint8(decoder.decode(z).cpu()))
        labels.append(y.cpu().numpy())
        flops.append(cost.flops_per_sample(recipe.model))
        loops.append(torch.full((len(idx),), cost.loops_per_step()))
    wall = time.perf_counter() - start
    if not images:
        return empty_set(wall)
    index = np.concatenate([np.arange(b * batch_size, min(num, (b + 1) * batch_size)) for b in mine])
    return SampleSet(np.concatenate(images), np.concatenate(labels), float(torch.cat(flops).mean()) / 1e9,
                     float(torch.cat(loops).mean()), wall, index)


def merge_sets(sets: list[SampleSet]) -> SampleSet:
    """Every rank's share, back in global sample order (a rank may have had no batch)."""
    sets = [s for s in sets if len(s.labels)] or sets[:1]
    index = np.concatenate([s.index for s in sets])
    order = np.argsort(index, kind="stable")
    n = max(sum(len(s.labels) for s in sets), 1)
    mean = lambda k: sum(getattr(s, k) * len(s.labels) for s in sets) / n   # noqa: E731
    return SampleSet(np.concatenate([s.images for s in sets])[order], np.concatenate([s.labels for s in sets])[order],
                     mean("gflops_per_sample"), mean("loops_per_step"), max(s.wall_s for s in sets), index[order])


def gather_set(mine: SampleSet, rank: int, world: int) -> SampleSet | None:
    """Collective: rank 0 gets the whole set in global order, the other ranks None. Through the process
    group (no shared file system needed); rank 0 holds every sample, as the ADM .npz it writes does."""
    if world == 1:
        return mine
    shares = [None] * world if rank == 0 else None
    dist.gather_object(mine, shares, dst=0)
    return merge_sets(shares) if rank == 0 else None
