"""The sample order: which samples form global batch b, independent of world size x grad_accum.

A global batch of G samples is J = G/m micro-batches (m = micro-batch size); micro-batch j of every
global batch comes from stream j, and rank r's micro-step a is j = r * grad_accum + a. So a layout
only decides who computes stream j, never what it holds.

Epoch e lays the split's shards end to end in an order drawn from (seed, e) and gives stream j the
j-th contiguous span of E*m samples (E = batches per epoch, N // G; the last N - E*G samples of the
epoch's sequence are dropped, different ones each epoch). A span is cut into windows of S samples
(the shuffle buffer rounded up to whole micro-batches); each window is permuted by (seed, e, j, w).
Everything is arithmetic on the manifest's shard sizes: a stream reads only its own span (a rank
about 1/world of the bytes), and a resumed loader opens the shard under its position directly."""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..seeding import derive_seed


@dataclass(frozen=True)
class Order:
    sizes: tuple[int, ...]       # samples per shard, in manifest order
    seed: int
    global_batch: int            # G
    micro_batch: int             # m
    shuffle_buffer: int = 0

    def __post_init__(self):
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global batch {self.global_batch} is not a multiple of micro-batch {self.micro_batch}")
        if self.batches_per_epoch < 1:
            raise ValueError(f"the split holds {sum(self.sizes)} samples, fewer than one global batch of "
                             f"{self.global_batch}")

    @property
    def streams(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def batches_per_epoch(self) -> int:
        return sum(self.sizes) // self.global_batch

    @property
    def span(self) -> int:
        """Samples one stream takes per epoch."""
        return self.batches_per_epoch * self.micro_batch

    @property
    def window(self) -> int:
        """Samples per shuffle window: whole micro-batches, so a window is a unit of work."""
        m = self.micro_batch
        return max(1, -(-self.shuffle_buffer // m)) * m

    @property
    def batches_per_window(self) -> int:
        return self.window // self.micro_batch

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.batches_per_epoch // self.batches_per_window)

    def locate(self, batch: int) -> tuple[int, int, int]:
        """Global batch -> (epoch, window, micro-batches into that window)."""
        epoch, k = divmod(batch, self.batches_per_epoch)
        window, into = divmod(k, self.batches_per_window)
        return epoch, window, into

    @cached_property
    def _epochs(self) -> dict:
        return {}

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sizes)))
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        return order

    def _starts(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, where each shard starts in the epoch's sequence); a few epochs cached."""
        cache = self._epochs
        if epoch not in cache:
            if len(cache) > 4:
                cache.pop(next(iter(cache)))
            order = self.shard_order(epoch)
            cache[epoch] = (order, [0, *itertools.accumulate(self.sizes[s] for s in order)])
        return cache[epoch]

    def window_range(self, stream: int, window: int) -> tuple[int, int]:
        """[start, end) of a window in its epoch's sequence of samples."""
        first = stream * self.span + window * self.window
        return first, min(first + self.window, (stream + 1) * self.span)

    def pieces(self, epoch: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """Sequence positions [start, end) as (shard, first sample in it, count), in order."""
        order, starts = self._starts(epoch)
        out, pos = [], start
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            count = min(end, starts[i + 1]) - pos
            out.append((order[i], pos - starts[i], count))
            pos += count
        return out

    def permutation(self, epoch: int, stream: int, window: int, n: int) -> np.ndarray:
        if self.shuffle_buffer == 0:
            return np.arange(n)
        return np.random.default_rng(derive_seed(self.seed, "window", epoch, stream, window)).permutation(n)

    def micro_batch_samples(self, batch: int, stream: int) -> list[tuple[int, int]]:
        """(shard, sample in shard) of micro-batch `stream` of global batch `batch`: the whole contract."""
        epoch, window, into = self.locate(batch)
        start, end = self.window_range(stream, window)
        where = [(s, first + i) for s, first, count in self.pieces(epoch, start, end) for i in range(count)]
        perm = self.permutation(epoch, stream, window, len(where))
        m = self.micro_batch
        return [where[i] for i in perm[into * m:(into + 1) * m]]
