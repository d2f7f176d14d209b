"""What sampling writes and evaluation reads: ADM-layout .npz files (arr_0 uint8 N×H×W×3 or N×T×H×W×3,
arr_1 labels), read whole or lazily (50,000 ImageNet samples are 9.8 GB), and PNG grids (animated GIF
grids for video)."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, path)
    return path


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """ADM-style .npz -> (arr_0 uint8 images/videos, arr_1 labels or None)."""
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, IsADirectoryError, zipfile.BadZipFile) as e:
        # numpy's own message for a file that is no .npy/.npz is about pickles and names no file
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}); expected an ADM-style .npz "
                         "(arr_0 uint8 N×H×W×3 images, arr_1 labels) such as elt-sample writes") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one .npy array; expected an ADM-style .npz with arr_0 (and arr_1)")
    with f:
        if "arr_0" not in f:
            raise ValueError(f"{path}: no arr_0 (expected an ADM-style .npz with uint8 N×H×W×3 images)")
        return f["arr_0"], (f["arr_1"] if "arr_1" in f else None)


class NpzStream:
    """A compressed member of an .npz (np.savez_compressed), read front to back a batch at a time."""

    def __init__(self, path: Path, member: str, shape: tuple, dtype: np.dtype):
        self.path, self.member, self.shape, self.dtype = path, member, shape, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, keep: Callable[[int], bool]) -> Iterator[tuple[int, np.ndarray]]:
        """(b, rows b·batch_size …) for the batches b that `keep` wants; the others are read and dropped."""
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            _npy_header(f)
            for b, start in enumerate(range(0, len(self), batch_size)):
                n = min(batch_size, len(self) - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{self.path}: {self.member} ends after {start} of {len(self)} rows")
                if keep(b):
                    yield b, np.frombuffer(data, self.dtype).reshape(n, *self.shape[1:])


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def open_npz_images(path: str | Path, member: str = "arr_0") -> np.ndarray | NpzStream:
    """arr_0 of an .npz without reading it: a read-only memory map of the file when the member is stored
    uncompressed (np.savez, what elt-sample and ADM write), else an NpzStream."""
    path, name = Path(path), f"{member}.npy"
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(name)
            with z.open(info) as f:
                shape, fortran, dtype = _npy_header(f)
                header_len = f.tell()
    except (zipfile.BadZipFile, IsADirectoryError, FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}); expected an ADM-style .npz "
                         "(arr_0 uint8 N×H×W×3 images, arr_1 labels) such as elt-sample writes") from None
    except KeyError:
        raise ValueError(f"{path}: no {member} (expected an ADM-style .npz with uint8 N×H×W×3 images)") from None
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {member} is {'Fortran-ordered' if fortran else 'an object array'}; expected "
                         "a C-ordered uint8 array as np.savez writes")
    if info.compress_type != zipfile.ZIP_STORED:
        return NpzStream(path, name, shape, dtype)
    with open(path, "rb") as raw:                      # the member's data start: after its local header
        raw.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", raw.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(path, dtype, "r", offset=offset, shape=shape)


def save_grid(path: Path, images: np.ndarray, max_images: int = 64, min_side: int = 64) -> Path:
    """PNG grid of images (or an animated GIF grid for videos), upscaled so tiny images stay visible.
    `path` has no suffix; the returned path has .png or .gif."""
    from PIL import Image

    x = images[:max_images]
    if x.ndim == 4:
        x = x[:, None]                                      # one frame
    n, t, h, w, _ = x.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.zeros((t, rows * (h + 1) + 1, cols * (w + 1) + 1, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[i]
    scale = max(1, int(np.ceil(min_side / max(h, w))))
    frames = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in canvas]
    if t == 1:
        path = path.parent / f"{path.name}.png"          # not with_suffix: names like grid_Lauto0.1
        frames[0].save(path)
    else:
        path = path.parent / f"{path.name}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return path
