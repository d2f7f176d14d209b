"""Shard format: WebDataset tars of samples {__key__, input.npy, cls} plus one manifest.json.

A shard is written under a temporary name and renamed when whole, so a killed writer never leaves a
shard that looks complete."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
FORMAT = "elt-scale-shards/1"
SAMPLE_MEMBER = "input.npy"
LABEL_MEMBER = "cls"
ALLOWED_MEMBERS = {SAMPLE_MEMBER, LABEL_MEMBER, "key.txt"}   # key.txt: the source file the sample came from

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_key(name: str) -> str:
    """A tar-safe sample key from a file name: no '/', '.', '..', control characters or leading '-'.
    Dots are replaced too, because webdataset splits a member name at its first dot."""
    key = _UNSAFE.sub("_", name).strip("_-")
    return key or "sample"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """np.load with pickles refused: an object array in a shard raises instead of executing code."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardWriter:
    """Writes samples into fixed-size shards `{split}-{index:06d}.tar` in `out_dir`, atomically.

    `start_index` lets each rank own its own shard range; `written` lists the completed shard names."""

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int, start_index: int = 0):
        self.out_dir, self.split = Path(out_dir), split
        self.samples_per_shard, self.index = samples_per_shard, start_index
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.written: list[str] = []
        self._tar = None
        self._count = 0

    def _open(self):
        self._tmp = self.out_dir / (shard_name(self.split, self.index) + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp), encoder=False)

    def write(self, key: str, array: np.ndarray, label: int, source: str | None = None) -> None:
        if self._tar is None:
            self._open()
        sample = {"__key__": key, SAMPLE_MEMBER: encode_npy(array), LABEL_MEMBER: str(int(label)).encode()}
        if source is not None:
            sample["key.txt"] = source.encode("utf-8", "backslashreplace")
        self._tar.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self._close()

    def _close(self):
        self._tar.close()
        final = self.out_dir / shard_name(self.split, self.index)
        os.replace(self._tmp, final)
        self.written.append(final.name)
        self._tar, self._count = None, 0
        self.index += 1

    def close(self) -> None:
        if self._tar is not None:
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tar is not None:        # failed mid-shard: drop the partial file, keep complete ones
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(shards: str | Path) -> dict:
    path = Path(shards)
    path = path if path.name == MANIFEST else path / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {path.parent}: run data_prep/tokenize.py first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
