"""Stream shards into training batches: deterministic, split by rank and worker, resumable.

Each (rank, worker) slot reads an infinite stream: epoch e visits the shards in an order drawn from
(seed, e); with at least as many shards as slots each slot owns whole shards, otherwise every slot
reads all shards and keeps every slots-th sample. A seeded shuffle buffer follows. The stream is a pure
function of (seed, rank, world, workers), so the data position saved in a checkpoint is just the number
of batches consumed, and resuming replays to exactly the next batch."""
from __future__ import annotations

import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .shards import ALLOWED_MEMBERS, LABEL_MEMBER, SAMPLE_MEMBER, decode_npy, read_manifest

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
    def __init__(self, paths: list[str], seed: int, rank: int, world: int, shuffle_buffer: int,
                 kind: str, strict: bool):
        self.paths, self.seed, self.rank, self.world = paths, seed, rank, world
        self.shuffle_buffer, self.kind, self.strict = shuffle_buffer, kind, strict
        self.bad_shards = 0

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + wid, self.world * workers

    def _read(self, path: str):
        try:
            with open(path, "rb") as f:
                for sample in group_by_keys(tar_file_expander([{"url": path, "stream": f}])):
                    yield self._decode(sample, path)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if self.strict or isinstance(e, ShardError):
                raise ShardError(f"{path}: {e}") from e
            self.bad_shards += 1
            log.warning("skipping unreadable shard %s (%s); %d skipped so far", path, e, self.bad_shards)

    def _decode(self, sample: dict, path: str):
        key = sample.get("__key__")
        members = {k for k in sample if not k.startswith("__")}
        unexpected = members - ALLOWED_MEMBERS
        if unexpected or SAMPLE_MEMBER not in members or LABEL_MEMBER not in members:
            what = f"unexpected member(s) {sorted(unexpected)}" if unexpected else f"members {sorted(members)}"
            raise ShardError(f"shard {path}, sample {key!r}: {what}; only {sorted(ALLOWED_MEMBERS)} are read "
                             "(nothing else is ever decoded)")
        try:
            x = decode_npy(sample[SAMPLE_MEMBER])
        except ValueError as e:
            raise ShardError(f"shard {path}, sample {key!r}: {SAMPLE_MEMBER} refused ({e})") from e
        x = torch.from_numpy(x.astype(np.int64 if self.kind == "codes" else np.float32))
        return x, int(sample[LABEL_MEMBER])

    def __iter__(self):
        slot, slots = self._slot()
        buffer, epoch = [], 0
        rng = random.Random(f"{self.seed}/{slot}")
        while True:
            order = list(self.paths)
            random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
            whole_shards = len(order) >= slots
            mine = order[slot::slots] if whole_shards else order
            n = 0
            for path in mine:
                for item in self._read(path):
                    n += 1
                    if not whole_shards and (n - 1) % slots != slot:
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], item = item, buffer[i]
                    yield item
            if n == 0 and not buffer:
                raise ShardError(f"no readable samples in {len(mine)} shard(s) for slot {slot}")
            epoch += 1      # the shuffle buffer carries over, so the stream stays continuous


class Loader:
    """Iterator of (inputs, labels) micro-batches that knows its position for exact resume."""

    def __init__(self, dataset: ShardStream, batch_size: int, num_workers: int, position: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.position = 0
        self._it = iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                   pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                                   persistent_workers=num_workers > 0))
        for _ in range(position):        # replay: the stream is deterministic, so this lands on the next batch
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self.position += 1
        return batch


def make_loader(recipe, rank: int = 0, world: int = 1, position: int = 0) -> Loader:
    d = recipe.data
    manifest = read_manifest(d.shards)
    check_manifest(manifest, recipe, d.shards)
    paths = shard_paths(d.shards, d.split, manifest)
    ds = ShardStream(paths, recipe.run.seed, rank, world, d.shuffle_buffer, manifest["sample"]["kind"], d.strict)
    return Loader(ds, recipe.train.micro_batch, d.num_workers, position)
