"""Shards through the webdataset library: where they are (directory, brace pattern, URL, `pipe:`),
how a shard's samples are read, and how a sample is decoded safely.

`data.shards` is one of
  /data/in256                                a directory (shard names from its manifest.json)
  http://host/in256                          the same over http(s) (curl)
  /data/in256/train-{000000..001281}.tar     a brace pattern (local or URL): exactly these shards
  pipe:aws s3 cp s3://b/train-{0..9}.tar -   a shell command per shard; only with data.allow_pipe=true
and the manifest is read from beside the shards over the same scheme.

Only a sample's own members are read (ALLOWED_MEMBERS); `.npy` is parsed with pickles refused. A read that
fails for a transport reason (transport.py) is retried and continues at the sample where it broke."""
from __future__ import annotations

import contextlib
import json
import re

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ..config import RecipeError
from .shards import ALLOWED_MEMBERS, FORMAT, LABEL_MEMBER, MANIFEST, SAMPLE_MEMBER, decode_npy, read_manifest
from .transport import IoPolicy, IoStats, Outage, ShardStream, TransientError, fetch


class ShardError(RuntimeError):
    """A shard or a sample in it is unreadable or holds something it must not; names shard and key."""


_SHARD_NAME = re.compile(r"[^/\s]+\.tar(?=[^/]*$)")   # the last path component ending in .tar


def is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def check_spec(spec: str, allow_pipe: bool) -> None:
    if spec.startswith("pipe:") and not allow_pipe:
        raise RecipeError(f"data.shards={spec!r} is a pipe: spec, which runs a shell command per shard; "
                          f"set data.allow_pipe=true in the recipe to allow it")
    if spec.startswith("pipe:") and "{" not in spec:
        raise RecipeError(f"data.shards={spec!r}: a pipe: spec must name its shards with a brace pattern, "
                          f"e.g. 'pipe:aws s3 cp s3://bucket/train-{{000000..000009}}.tar -'")


def manifest_url(spec: str) -> str:
    if "{" in spec:
        first = next(iter(braceexpand(spec)))
        if not _SHARD_NAME.search(first):
            raise RecipeError(f"data.shards={spec!r}: a brace pattern must name .tar shards")
        return _SHARD_NAME.sub(MANIFEST, first)
    return spec.rstrip("/") + "/" + MANIFEST


def load_manifest(spec: str, allow_pipe: bool, io: IoPolicy | None = None) -> dict:
    """The manifest beside the shards, read locally or over the spec's scheme, retried like a shard
    (StorageUnavailable past the budget); a manifest that is not there is FileNotFoundError."""
    check_spec(spec, allow_pipe)
    url = manifest_url(spec)
    if not is_remote(url):
        return read_manifest(url)
    try:
        text = fetch(url, io or IoPolicy())
    except OSError as e:       # HTTP 404 and the like: the storage answered, and there is no manifest
        raise FileNotFoundError(f"cannot read {url} ({e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_urls(spec: str, split: str, manifest: dict) -> tuple[list[str], list[int]]:
    """(shard URLs or paths, samples in each) for one split."""
    entry = manifest["splits"].get(split, {})
    names = entry.get("shards", [])
    if not names:
        raise FileNotFoundError(f"{spec}: manifest lists no shards for split {split!r} "
                                f"(splits: {', '.join(manifest['splits']) or 'none'})")
    sizes = entry.get("shard_sizes")
    if sizes is None and len(names) == 1:
        sizes = [entry["num_samples"]]
    if sizes is None or len(sizes) != len(names):
        raise ValueError(f"{spec}: manifest has no shard_sizes for split {split!r} (needed to place every "
                         f"sample without reading); rerun data_prep/tokenize.py --merge")
    size_of = dict(zip(names, sizes))
    if "{" not in spec:
        base = spec.rstrip("/")
        return [f"{base}/{n}" for n in names], list(sizes)
    urls = list(braceexpand(spec))
    unknown = [u for u in urls if _SHARD_NAME.search(u) is None or _SHARD_NAME.search(u).group() not in size_of]
    if unknown:
        raise ValueError(f"data.shards={spec!r}: {len(unknown)} shard(s) not in the manifest's split {split!r}, "
                         f"e.g. {unknown[0]}")
    return urls, [size_of[_SHARD_NAME.search(u).group()] for u in urls]


def read_shard(url: str, timeout_s: float, stats: IoStats | None = None):
    """One pass over a shard: (key, {extension: bytes}) of every sample, in order, streamed through
    webdataset's tar iterator; members of one key are consecutive (webdataset's grouping rule). A broken
    tar raises its error; a transport fault raises TransientError, also when it shows as a broken tar
    (bytes that stopped coming) or as a clean end (curl cut off at a member boundary)."""
    stream = ShardStream(url, timeout_s, stats)
    key, members = None, {}
    try:
        try:
            for member in tar_file_iterator(stream, skip_meta=None):
                k, ext = base_plus_ext(member["fname"])
                if k is None:
                    continue
                if k != key and members:
                    yield key, members
                    members = {}
                key = k
                members[ext] = member["data"]
        except TransientError:
            raise
        except Exception:
            stream.check()         # the transport's failure, if any, is the cause
            raise
        stream.check()             # before the last sample: it may be cut short
        if members:
            yield key, members
    finally:
        stream.close()


def shard_samples(url: str, start: int = 0, io: IoPolicy | None = None, stats: IoStats | None = None):
    """Samples start, start+1, ... of a shard, each exactly once: after a transport fault the shard is
    reopened and read past the samples already delivered (transport.Outage: backoff, budget, then
    StorageUnavailable). Only delivering a new sample counts as progress (resets the budget's clock)."""
    io = io or IoPolicy()
    done, outage = start, None
    try:
        while True:
            try:
                with contextlib.closing(read_shard(url, io.timeout_s, stats)) as samples:
                    for i, sample in enumerate(samples):
                        if i >= done:
                            done += 1
                            if outage is not None:
                                outage = outage.over()
                            yield sample
                return
            except TransientError as e:
                outage = outage or Outage(url, io, stats)
                outage.wait(e)
    finally:
        if outage is not None:
            outage.over()


def decode_sample(key: str, members: dict, url: str) -> tuple[np.ndarray, int]:
    """A sample's (array, label); anything else in it is refused, never decoded."""
    unexpected = set(members) - ALLOWED_MEMBERS
    try:
        if unexpected or SAMPLE_MEMBER not in members or LABEL_MEMBER not in members:
            what = f"unexpected member(s) {sorted(unexpected)}" if unexpected else f"members {sorted(members)}"
            raise ShardError(f"{what}; only {sorted(ALLOWED_MEMBERS)} are read (nothing else is ever decoded)")
        try:
            x = decode_npy(members[SAMPLE_MEMBER])
        except ValueError as e:
            raise ShardError(f"{SAMPLE_MEMBER} refused ({e})") from e
        try:
            label = int(members[LABEL_MEMBER])
        except ValueError as e:
            raise ShardError(f"{LABEL_MEMBER} is not an integer") from e
    except ShardError as e:
        raise ShardError(f"shard {url}, sample {key!r}: {e}") from None
    return x, label


def split_samples(spec: str, split: str, allow_pipe: bool = False, limit: int | None = None,
                  io: IoPolicy | None = None):
    """(key, array, label) of a split's samples in manifest order, at most `limit`: for readers that want a
    split as it is stored (reference images, held-out losses), not the training order. Refused samples raise;
    transport faults are retried as in training (default budget)."""
    manifest = load_manifest(spec, allow_pipe, io)
    urls, _ = shard_urls(spec, split, manifest)
    count = 0
    for url in urls:
        for key, members in shard_samples(url, io=io):
            if limit is not None and count >= limit:
                return
            yield (key, *decode_sample(key, members, url))
            count += 1
