"""What sampling writes and evaluation reads: ADM-layout .npz files (arr_0 uint8 N×H×W×3 or N×T×H×W×3,
arr_1 labels) and PNG grids (animated GIF grids for video)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

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
