"""Stream shards into training batches: deterministic, split by rank and worker, resumable.

Each (rank, worker) slot reads an infinite stream: epoch e visits the shards in an order drawn from
(seed, e); with at least as many shards as slots each slot owns whole shards, otherwise every slot
reads all shards and keeps every slots-th sample. A seeded shuffle buffer follows. The stream is a pure
function of (seed, rank, world, workers), so the data position saved in a checkpoint is just the number
of batches consumed; resuming fast-forwards each worker's stream past its share of those batches
(reading, not decoding or batching, what it skips) and lands on exactly the next batch.

Only the members in ALLOWED_MEMBERS are ever looked at, `.npy` is parsed with pickles refused, and
a refused sample or a corrupt shard is fatal with data.strict=true, else skipped with a warning and
counted (`Loader.bad_samples`, `Loader.bad_shards`)."""
from __future__ import annotations

import logging
import multiprocessing as mp
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .reader import CorruptShard, NpyDecoder
from .reader import samples as shard_samples
from .shards import ALLOWED_MEMBERS, LABEL_MEMBER, SAMPLE_MEMBER, read_manifest

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard or a sample in it is unreadable or holds something it must not; names shard and key."""


def shard_paths(shards: str, split: str, manifest: dict) -> list[str]:
    names = manifest["splits"].get(split, {}).get("shards", [])
    if not names:
        raise FileNotFoundError(f"{shards}: manifest lists no shards for split {split!r} "
                                f"(splits: {', '.join(manifest['splits']) or 'none'})")
    return [str(Path(shards) / n) for n in names]


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
    if manifest.get("num_classes", 0) > m.num_classes:
        problems.append(f"shards have {manifest['num_classes']} classes > model.num_classes {m.num_classes}")
    if problems:
        raise ValueError(f"{where}: manifest does not fit the recipe: " + "; ".join(problems))


class ShardStream(IterableDataset):
    """Infinite stream of ready micro-batches (inputs, labels) for one (rank, worker) slot.

    Batches are built inside the worker (one np.stack per batch instead of a collate per sample), and
    `skip_batches` fast-forwards a resumed stream: what it skips is read but never batched or shipped."""

    def __init__(self, paths: list[str], seed: int, rank: int, world: int, shuffle_buffer: int,
                 kind: str, strict: bool, batch_size: int = 1, skip_batches: int = 0):
        self.paths, self.seed, self.rank, self.world = paths, seed, rank, world
        self.shuffle_buffer, self.kind, self.strict = shuffle_buffer, kind, strict
        self.batch_size, self.skip_batches = batch_size, skip_batches
        # shared with worker processes, so the main process sees what they skipped
        self._bad_shards, self._bad_samples = mp.Value("l", 0), mp.Value("l", 0)

    @property
    def bad_shards(self) -> int:
        return self._bad_shards.value

    @property
    def bad_samples(self) -> int:
        return self._bad_samples.value

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _records(self, path: str):
        """(key, members) of every sample in a shard; a broken shard ends early with a warning."""
        try:
            with open(path, "rb") as f:
                buf = f.read()
            yield from shard_samples(buf)
        except (CorruptShard, OSError) as e:
            if self.strict:
                raise ShardError(f"shard {path}: {e} (data.strict=true)") from e
            with self._bad_shards.get_lock():
                self._bad_shards.value += 1
            log.warning("skipping the rest of unreadable shard %s (%s); %d shard(s) skipped so far",
                        path, e, self.bad_shards)

    def _decode(self, key: str, members: dict, path: str, npy: NpyDecoder):
        """A sample's (array, label), or None when refused and data.strict is off."""
        try:
            names = set(members)
            unexpected = names - ALLOWED_MEMBERS
            if unexpected or SAMPLE_MEMBER not in names or LABEL_MEMBER not in names:
                what = f"unexpected member(s) {sorted(unexpected)}" if unexpected else f"members {sorted(names)}"
                raise ShardError(f"{what}; only {sorted(ALLOWED_MEMBERS)} are read (nothing else is ever decoded)")
            try:
                x = npy(members[SAMPLE_MEMBER]).copy()
            except ValueError as e:
                raise ShardError(f"{SAMPLE_MEMBER} refused ({e})") from e
            try:
                label = int(bytes(members[LABEL_MEMBER]))
            except ValueError as e:
                raise ShardError(f"{LABEL_MEMBER} is not an integer") from e
            return x, label
        except ShardError as e:
            msg = f"shard {path}, sample {key!r}: {e}"
            if self.strict:
                raise ShardError(msg) from None
            with self._bad_samples.get_lock():
                self._bad_samples.value += 1
            log.warning("skipping %s; %d sample(s) skipped so far", msg, self.bad_samples)
            return None

    def samples(self, slot: int, slots: int):
        """The slot's infinite, deterministic sample stream (after the shuffle buffer)."""
        buffer, epoch, npy = [], 0, NpyDecoder()
        rng = random.Random(f"{self.seed}/{slot}")
        while True:
            order = list(self.paths)
            random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
            whole_shards = len(order) >= slots
            mine = order[slot::slots] if whole_shards else order
            n = got = 0
            for path in mine:
                for key, members in self._records(path):
                    n += 1
                    if not whole_shards and (n - 1) % slots != slot:
                        continue
                    item = self._decode(key, members, path, npy)
                    if item is None:
                        continue
                    got += 1
                    if self.shuffle_buffer == 0:
                        yield item
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], item = item, buffer[i]
                    yield item
            if got == 0:    # nothing readable this epoch: fail rather than spin forever on an empty stream
                raise ShardError(f"no readable samples in {len(mine)} shard(s) for slot {slot} "
                                 f"(first: {mine[0] if mine else 'none'})")
            epoch += 1      # the shuffle buffer carries over, so the stream stays continuous

    def __iter__(self):
        wid, workers = self._worker()
        # DataLoader starts its round robin at worker 0, and resumed global batch P belongs to logical
        # worker P % workers: rotate, so every worker keeps the slot (and stream) it had before
        wid = (wid + self.skip_batches) % workers
        stream = self.samples(self.rank * workers + wid, self.world * workers)
        # DataLoader takes batch k from worker k % workers: this worker's share of the skipped batches
        for _ in range(max(0, self.skip_batches - wid + workers - 1) // workers * self.batch_size):
            next(stream)
        as_type = np.int64 if self.kind == "codes" else np.float32
        while True:
            items = [next(stream) for _ in range(self.batch_size)]
            x = torch.from_numpy(np.stack([a for a, _ in items]).astype(as_type))
            yield x, torch.tensor([label for _, label in items])


class Loader:
    """Iterator of (inputs, labels) micro-batches that knows its position for exact resume."""

    def __init__(self, dataset: ShardStream, batch_size: int, num_workers: int, position: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        dataset.batch_size, dataset.skip_batches = batch_size, position   # the stream skips, nothing replays here
        self.position = position
        self._it = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                   pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                                   persistent_workers=num_workers > 0))

    @property
    def bad_shards(self) -> int:
        return self.dataset.bad_shards

    @property
    def bad_samples(self) -> int:
        return self.dataset.bad_samples

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self.position += 1
        return batch


def check_data(recipe) -> tuple[dict, list[str]]:
    """The recipe's shards exist, fit its model and list its split -> (manifest, shard paths)."""
    d = recipe.data
    try:
        manifest = read_manifest(d.shards)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.shards={d.shards}: {e}") from None
    check_manifest(manifest, recipe, d.shards)
    return manifest, shard_paths(d.shards, d.split, manifest)


def make_loader(recipe, rank: int = 0, world: int = 1, position: int = 0) -> Loader:
    d = recipe.data
    manifest, paths = check_data(recipe)
    ds = ShardStream(paths, recipe.run.seed, rank, world, d.shuffle_buffer, manifest["sample"]["kind"], d.strict,
                     recipe.train.micro_batch)
    return Loader(ds, recipe.train.micro_batch, d.num_workers, position)
