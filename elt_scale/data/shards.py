"""Shard format: WebDataset tars of samples {__key__, input.npy, cls} plus one manifest.json.

A shard is written under a temporary name and renamed when whole, so a killed writer never leaves a
shard that looks complete."""
from __future__ import annotations

import functools
import io
import json
import os
import random
import re
from pathlib import Path

import numpy as np

from ..seeding import derive_seed

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


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple:
    """(shape, order, dtype, items) from a .npy header, parsed by numpy's own (literal_eval) reader; object
    dtypes raise as np.load(allow_pickle=False) does. Cached: all samples of a dataset share one header, and
    parsing it is most of np.load's cost."""
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format version {version} is not supported")
    shape, fortran, dtype = readers[version](f)
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    return shape, "F" if fortran else "C", dtype, int(np.prod(shape, dtype=np.int64))


def decode_npy(data: bytes) -> np.ndarray:
    """`.npy` bytes -> array, never unpickling: an object array in a shard raises instead of executing code.
    A read-only view of `data` (no copy); the header parse is cached."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy payload")
    size_bytes = 2 if data[6] == 1 else 4
    offset = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    shape, order, dtype, count = _npy_header(bytes(data[:offset]))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"array data truncated: {len(data) - offset} bytes for shape {shape} {dtype}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape, order=order)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
    """A ustar header (mode 0444, mtime 0: the same inputs give byte-identical shards)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148] = b"%011o\0" % size, b"00000000000\0"
    h[148:156], h[156:157], h[257:265] = b" " * 8, kind, b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def tar_member(name: str, payload: bytes) -> bytes:
    """One tar member with its padding; names over 100 bytes get a GNU long-name record first."""
    raw = name.encode("utf-8")
    out = b""
    if len(raw) > 100:
        out = tar_header(b"././@LongLink", len(raw) + 1, b"L") + _pad(raw + b"\0")
        raw = raw[:100]
    return out + tar_header(raw, len(payload)) + _pad(payload)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


class ShardFile:
    """One shard, written to `{name}.tmp` and renamed when committed whole. A sidecar
    `{name}.json` (the shard's own counts and skipped inputs) is renamed into place just before the
    shard, so a shard that exists is always complete and described.

    Members are written as plain ustar records (python's tarfile spends ~100 us per member building
    headers, which capped tokenization near 3,000 samples/s; webdataset's TarWriter, built on it, wrote
    3.5-4x fewer samples/s than this on the 2-core CPU); any tar reader, webdataset included, reads them."""

    def __init__(self, out_dir: str | Path, split: str, index: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / shard_name(split, index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self.count = 0

    def write(self, key: str, array: np.ndarray, label: int, source: str | None = None) -> None:
        members = [(SAMPLE_MEMBER, encode_npy(array)), (LABEL_MEMBER, str(int(label)).encode())]
        if source is not None:
            members.append(("key.txt", source.encode("utf-8", "backslashreplace")))
        self.write_record(b"".join(tar_member(f"{key}.{ext}", payload) for ext, payload in members))

    def write_record(self, records: bytes) -> None:
        """One sample's tar records (headers + padded members), as built above or copied from another
        shard byte for byte (data_prep/reshuffle.py)."""
        self._file.write(records)
        self.count += 1

    def commit(self, sidecar: dict | None = None) -> None:
        self._file.write(b"\0" * 1024)          # end-of-archive: two zero blocks
        self._file.close()
        if sidecar is not None:                 # its size lets a rerun tell a shard truncated since apart
            write_json(sidecar_path(self.path), {**sidecar, "bytes": self.tmp.stat().st_size})
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Failed mid-shard: drop the partial file, keep every complete shard."""
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def sidecar_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name + ".json")


class ShardWriter:
    """Writes samples into fixed-size shards `{split}-{index:06d}.tar` in `out_dir`, atomically.

    `start_index` lets each rank own its own shard range; `written` lists the completed shard names."""

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int, start_index: int = 0):
        self.out_dir, self.split = Path(out_dir), split
        self.samples_per_shard, self.index = samples_per_shard, start_index
        self.written: list[str] = []
        self._shard: ShardFile | None = None

    def write(self, key: str, array: np.ndarray, label: int, source: str | None = None) -> None:
        if self._shard is None:
            self._shard = ShardFile(self.out_dir, self.split, self.index)
        self._shard.write(key, array, label, source)
        if self._shard.count == self.samples_per_shard:
            self._close()

    def _close(self):
        self._shard.commit()
        self.written.append(self._shard.path.name)
        self._shard = None
        self.index += 1

    def close(self) -> None:
        if self._shard is not None:
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._shard is not None:
            self._shard.abort()


def write_json(path: str | Path, data: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    write_json(Path(out_dir) / MANIFEST, manifest)


def write_order(n: int, seed: int) -> list[int]:
    """The order data_prep/tokenize.py writes a split's n sorted items in: a permutation drawn from (seed, n)
    only, so every rank of an array job, a rerun and --merge agree. Sorted lists run class by class; written as they are, each shard holds one
    or two classes and the loader's windows mix only a few (issue 26)."""
    order = list(range(n))
    random.Random(derive_seed(seed, "items")).shuffle(order)
    return order


def encode_class_counts(counts: dict, num_classes: int) -> str:
    """One shard's class counts for the manifest's `shard_class_counts`: `num_classes` comma-separated
    integers (label order). A string per shard keeps a 1,282-shard x 1000-class manifest near 2.6 MB;
    JSON lists with this file's indentation would put every count on its own line (~10 MB)."""
    dense = [0] * num_classes
    for label, n in counts.items():
        dense[int(label)] = int(n)
    return ",".join(map(str, dense))


def decode_class_counts(rows: list[str]) -> np.ndarray:
    """`shard_class_counts` -> (shards, classes) int64 array."""
    if not rows:
        return np.zeros((0, 0), np.int64)
    flat = np.array(",".join(rows).split(","), dtype=np.int64)
    return flat.reshape(len(rows), -1)


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
