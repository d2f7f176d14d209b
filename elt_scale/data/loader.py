"""Stream shards into training micro-batches: the same global batches for any layout, resumable in O(1).

`order.Order` says which samples form micro-batch j of global batch b; this module reads them. A rank
owns streams j = rank * grad_accum + a and reads whole shuffle windows of them (the unit of work, also
across DataLoader workers: window-item i goes to worker i % workers), only the shards under its own
spans. A resumed loader at global batch P opens the shard under P's window directly: time to the first
batch does not grow with P.

A refused sample or an unreadable shard is fatal with data.strict=true, else skipped with a warning and
counted (`Loader.bad_samples`, `Loader.bad_shards`); its place in the window is taken by another readable
sample of the same window (or, when the whole window is unreadable, of the same stream's span), so
every batch stays full and the order of all other samples is unchanged. That is for content faults only:
a read that fails for a transport reason is retried inside `webds.shard_samples` and continues at the
sample where it broke, so the batches are exactly those of an undisturbed run, or the storage stays away
for data.io_retry_s and StorageUnavailable ends the run (transport.py)."""
from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import tarfile

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .mix import check_mix
from .order import Order
from .transport import IoPolicy, IoStats, io_policy
from .webds import ShardError, decode_sample, load_manifest, shard_samples, shard_urls

log = logging.getLogger(__name__)

UNREADABLE = (tarfile.TarError, OSError, EOFError, ValueError)   # what a broken or missing shard raises


def check_manifest(manifest: dict, recipe, where: str) -> None:
    """Shapes in the shards must match the recipe's model before any training starts."""
    s, m = manifest["sample"], recipe.model
    if m.family == "masked":
        expect_kind, expect_shape = "codes", list(m.grid)
    else:
        expect_kind, expect_shape = "latents", [m.channels] + list(m.grid)
    problems = []
    if s["kind"] != expect_kind:
        problems.append(f"shards hold {s['kind']} but model.family={m.family} needs {expect_kind}")
    if list(s["shape"]) != expect_shape:
        problems.append(f"shards' sample shape {s['shape']} != recipe's {expect_shape} "
                        f"(model.grid{'' if m.family == 'masked' else ' with model.channels first'})")
    if expect_kind == "codes" and s.get("vocab_size", 0) > m.vocab_size:
        problems.append(f"shards' vocab_size {s['vocab_size']} > model.vocab_size {m.vocab_size}")
    if s["kind"] == expect_kind:
        problems += dtype_problems(s.get("dtype"), expect_kind, s.get("vocab_size"), m.family)
    if manifest.get("num_classes", 0) > m.num_classes:
        problems.append(f"shards have {manifest['num_classes']} classes > model.num_classes {m.num_classes}")
    if problems:
        raise ValueError(f"{where}: manifest does not fit the recipe: " + "; ".join(problems))


def dtype_problems(dtype: str | None, kind: str, vocab_size: int | None, family: str) -> list[str]:
    """Codes are integers wide enough for every code of the shards' vocabulary, latents are floats."""
    if dtype is None:                     # manifests always record it; nothing to compare otherwise
        return []
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return [f"shards' dtype {dtype!r} is not a numpy dtype"]
    if kind == "codes":
        if dt.kind not in "iu":
            return [f"shards' dtype {dtype} is not an integer type; model.family={family} needs integer codes"]
        if vocab_size and np.iinfo(dt).max < vocab_size - 1:
            return [f"shards' dtype {dtype} cannot hold their codes 0..{vocab_size - 1} (vocab_size {vocab_size})"]
    elif dt.kind != "f":
        return [f"shards' dtype {dtype} is not a float type; model.family={family} needs latents"]
    return []


class ShardCursors:
    """Open shard streams of one worker, kept at their next sample so consecutive windows continue
    a shard instead of reopening it."""

    def __init__(self, dataset: "WindowStream", keep: int):
        self.ds, self.keep = dataset, keep
        self.open: collections.OrderedDict = collections.OrderedDict()   # shard -> (samples iterator, next index)

    def read(self, shard: int, first: int, count: int) -> list:
        """Decoded samples first..first+count-1 of a shard; None where unreadable or refused."""
        it, at = self.open.pop(shard, (None, -1))
        url, out = self.ds.urls[shard], []
        if at != first:
            if it is not None:
                it.close()
            it = shard_samples(url, first, self.ds.io, self.ds.io_stats)     # reads past the samples before
        try:
            for _ in range(count):
                out.append(self._decode(*next(it), url))
        except StopIteration:                          # fewer samples than the manifest says
            self._bad_shard(url, f"ends after {first + len(out)} samples")
            it = None
        except UNREADABLE as e:
            self._bad_shard(url, e)
            it = None
        if it is not None:
            self.open[shard] = (it, first + count)
            while len(self.open) > self.keep:
                self.open.popitem(last=False)[1][0].close()
        return out + [None] * (count - len(out))

    def _decode(self, key: str, members: dict, url: str):
        try:
            return decode_sample(key, members, url)
        except ShardError as e:
            if self.ds.strict:
                raise
            with self.ds._bad_samples.get_lock():
                self.ds._bad_samples.value += 1
            log.warning("skipping %s; %d sample(s) skipped so far", e, self.ds.bad_samples)
            return None

    def _bad_shard(self, url: str, why) -> None:
        if self.ds.strict:
            raise ShardError(f"shard {url}: {why} (data.strict=true)")
        with self.ds._bad_shards.get_lock():
            self.ds._bad_shards.value += 1
        log.warning("skipping the rest of unreadable shard %s (%s); %d shard(s) skipped so far",
                    url, why, self.ds.bad_shards)


class WindowStream(IterableDataset):
    """The rank's shuffle windows in delivery order, as (inputs, labels) of shape (batches, m, ...):
    for every window index from the start position on, one window of each of the rank's streams."""

    def __init__(self, urls: list[str], order: Order, streams: list[int], kind: str, strict: bool,
                 start_batch: int = 0, io: IoPolicy | None = None):
        self.urls, self.order, self.streams, self.kind, self.strict = urls, order, streams, kind, strict
        self.start_batch, self.io = start_batch, io or IoPolicy()
        # shared with worker processes, so the main process sees what they skipped, read and retried
        self._bad_shards, self._bad_samples, self.io_stats = mp.Value("l", 0), mp.Value("l", 0), IoStats()

    bad_shards = property(lambda self: self._bad_shards.value)
    bad_samples = property(lambda self: self._bad_samples.value)
    bytes_read = property(lambda self: self.io_stats.bytes_read)

    def items(self):
        """(epoch, window, stream) of every window-item, from the start position on, forever."""
        o = self.order
        epoch, window, _ = o.locate(self.start_batch)
        while True:
            for w in range(window, o.windows_per_epoch):
                for j in self.streams:
                    yield epoch, w, j
            epoch, window = epoch + 1, 0

    def read_window(self, epoch: int, window: int, stream: int, cursors: ShardCursors):
        o = self.order
        start, end = o.window_range(stream, window)
        samples = self._read(epoch, start, end, cursors)
        if any(s is None for s in samples):
            samples = self._fill_holes(samples, epoch, stream, end, cursors)
        samples = [samples[i] for i in o.permutation(epoch, stream, window, len(samples))]
        x = np.stack([a for a, _ in samples]).astype(np.int64 if self.kind == "codes" else np.float32)
        m = o.micro_batch
        return (torch.from_numpy(x).view(-1, m, *x.shape[1:]),
                torch.tensor([label for _, label in samples]).view(-1, m))

    def _read(self, epoch: int, start: int, end: int, cursors: ShardCursors) -> list:
        return [s for shard, first, count in self.order.pieces(epoch, start, end)
                for s in cursors.read(shard, first, count)]

    def _fill_holes(self, samples: list, epoch: int, stream: int, end: int, cursors: ShardCursors) -> list:
        """Each unreadable place takes a readable sample of the window, in turn; a wholly unreadable window
        borrows from the rest of the stream's span. Deterministic, so resume and layouts still agree."""
        readable = [s for s in samples if s is not None]
        if not readable:
            first, last = stream * self.order.span, (stream + 1) * self.order.span
            for a, b in ((end, last), (first, end - len(samples))):
                readable = readable or [s for s in self._read(epoch, a, b, cursors) if s is not None]
        if not readable:
            shards = sorted({self.urls[s] for s, _, _ in self.order.pieces(epoch, stream * self.order.span,
                                                                             (stream + 1) * self.order.span)})
            raise ShardError(f"no readable samples in stream {stream}'s {len(shards)} shard(s) of epoch {epoch} "
                             f"(first: {shards[0]})")
        fill = iter(readable * len(samples))
        return [s if s is not None else next(fill) for s in samples]

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        cursors = ShardCursors(self, keep=2 * len(self.streams) + 2)
        for i, (epoch, window, stream) in enumerate(self.items()):
            if i % workers == wid:
                yield self.read_window(epoch, window, stream, cursors)


class Loader:
    """Iterator of (inputs, labels) micro-batches of one rank, in (global batch, micro-step) order;
    `position` is the number of global batches fully handed out (what a checkpoint saves)."""

    def __init__(self, dataset: WindowStream, num_workers: int, position: int = 0):
        self.dataset, self.num_workers, self.position = dataset, num_workers, position
        self._skip = dataset.order.locate(position)[2]     # resumed mid-window: its first batches are done
        self._pending: collections.deque = collections.deque()
        self._handed = 0
        self._it = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                   pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                                   persistent_workers=num_workers > 0))

    bad_shards = property(lambda self: self.dataset.bad_shards)
    bad_samples = property(lambda self: self.dataset.bad_samples)
    bytes_read = property(lambda self: self.dataset.bytes_read)

    @property
    def in_outage(self) -> bool:
        """A read of this rank (any worker) is waiting out a storage outage right now: a logged wait bounded
        by data.io_retry_s, which the step watchdog does not count as a stall."""
        return self.dataset.io_stats.in_outage

    def counters(self) -> dict:
        """What this rank's reading cost since the process started (all workers): for metrics.jsonl."""
        s = self.dataset.io_stats
        return {"io_retries": s.retries, "io_wait_s": s.wait_s, "bad_shards": self.bad_shards,
                "bad_samples": self.bad_samples}

    def _fill(self) -> None:
        windows = [next(self._it) for _ in self.dataset.streams]      # one per micro-step of this rank
        for k in range(self._skip, windows[0][0].shape[0]):
            self._pending.extend((x[k], y[k]) for x, y in windows)
        self._skip = 0

    def __iter__(self):
        return self

    def __next__(self):
        while not self._pending:
            self._fill()
        self._handed += 1
        if self._handed % len(self.dataset.streams) == 0:
            self.position += 1
        return self._pending.popleft()


def open_data(recipe) -> tuple[dict, list[str], list[int]]:
    """The recipe's shards exist, fit its model and list its split -> (manifest, shard URLs or paths, sizes)."""
    d = recipe.data
    try:
        manifest = load_manifest(d.shards, d.allow_pipe, io_policy(d))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.shards={d.shards}: {e}") from None
    check_manifest(manifest, recipe, d.shards)
    urls, sizes = shard_urls(d.shards, d.split, manifest)
    return manifest, urls, sizes


def check_data(recipe) -> tuple[dict, list[str]]:
    """The trainer's start-up check: `open_data`, and (rank 0, once) a warning naming the figure when the
    batches would mix far fewer classes than an i.i.d. draw (mix.py) -> (manifest, shard URLs or paths)."""
    manifest, urls, sizes = open_data(recipe)
    check_mix(recipe, manifest, urls, sizes)
    return manifest, urls


def make_loader(recipe, rank: int = 0, world: int = 1, position: int = 0) -> Loader:
    """Rank `rank`'s loader, at global batch `position`."""
    d, t = recipe.data, recipe.train
    manifest, urls, sizes = open_data(recipe)
    order = Order(tuple(sizes), recipe.run.seed, t.micro_batch * t.grad_accum * world, t.micro_batch,
                  d.shuffle_buffer)
    streams = list(range(rank * t.grad_accum, (rank + 1) * t.grad_accum))
    ds = WindowStream(urls, order, streams, manifest["sample"]["kind"], d.strict, position, io_policy(d))
    return Loader(ds, d.num_workers, position)
