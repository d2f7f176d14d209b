"""Decoders: one input reference -> pixels in [0, 1], float32, (C, H, W) or (C, T, H, W).

They are small picklable objects (not closures) so DataLoader workers can run them; each raises on an
unreadable input and the caller lists it in the manifest's `skipped`."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion): halve with a box filter while the short side is >= 2x the
    target, bicubic-resize the short side to `size`, then crop the centre square."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def open_rgb(path: str) -> Image.Image:
    """Any image PIL can read, whatever its extension claims (PNG named .JPEG), as RGB.

    `load()` runs here so a truncated file raises now; CMYK, greyscale, palette and alpha images are
    converted (alpha is dropped, as ImageNet pipelines do)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class ImageDecoder:
    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, path: str, flip: bool = False) -> torch.Tensor:
        arr = center_crop_arr(open_rgb(path), self.resolution)
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


class VideoDecoder:
    """A clip of `frames` frames, `stride` apart, centred in the video; short side resized to
    `resolution` (antialiased bilinear) and centre-cropped. decord opens its own reader per call, so
    every DataLoader worker has its own reader and nothing is shared across a fork."""

    def __init__(self, resolution: int, frames: int, stride: int):
        self.resolution, self.frames, self.stride = resolution, frames, stride

    def frame_indices(self, total: int) -> list[int]:
        span = (self.frames - 1) * self.stride + 1
        if total < span:
            raise ValueError(f"only {total} frames; --frames {self.frames} --frame-stride {self.stride} "
                             f"needs {span}")
        start = (total - span) // 2
        return list(range(start, start + span, self.stride))

    def __call__(self, path: str, flip: bool = False) -> torch.Tensor:
        try:
            import decord
        except ImportError as e:
            raise RuntimeError("video sources need decord: pip install 'elt-scale[tokenizers]'") from e
        reader = decord.VideoReader(path, num_threads=1)
        clip = reader.get_batch(self.frame_indices(len(reader))).asnumpy()      # (T, H, W, 3) uint8
        x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0          # (T, 3, H, W)
        x = resize_center_crop(x, self.resolution)
        if flip:
            x = x.flip(-1)
        return x.permute(1, 0, 2, 3).contiguous()                              # (3, T, H, W)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): short side to `size`, then the centre square."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, math.floor(h * scale + 0.5)), max(size, math.floor(w * scale + 0.5))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return x[..., y0:y0 + size, x0:x0 + size].clamp(0, 1)


class ArrayDecoder:
    """In-memory images (the built-in digits): reference = row index."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, index: int, flip: bool = False) -> torch.Tensor:
        x = torch.from_numpy(self.images[index])[None]
        return x.flip(-1) if flip else x
