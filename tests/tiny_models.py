"""Tiny models for tests: a small ELT recipe and its inputs, and TorchScript feature networks standing in
for I3D (and the like) in metric tests."""
from typing import Tuple

import torch
import torch.nn as nn

from elt_scale.config import load_recipe
from tests.conftest import ROOT


def tiny(family="masked", grid=(4, 4), **kw):
    o = [f"model.family={family}", "model.width=32", "model.heads=2", "model.unique_layers=2", "model.loops=3",
         f"model.grid={list(grid)}", "model.vocab_size=9", "model.num_classes=5", "model.channels=2",
         "model.patch_size=2" if family == "diffusion" else "model.patch_size=1"]
    o += [f"{k}={v}" for k, v in kw.items()]
    return load_recipe(ROOT / "recipes" / "digits_masked.yaml", o)


def perturb(model):
    """adaLN-Zero makes a fresh diffusion model output zeros; give every matrix random weights."""
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(model, r, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, r.model.num_classes, (b,), generator=g)
    if r.model.family == "masked":
        return (torch.randint(0, r.model.vocab_size + 1, (b, *r.model.grid), generator=g), labels)
    x = torch.randn(b, r.model.channels, *r.model.grid, generator=g)
    return (x, torch.rand(b, generator=g), labels)


class TinyI3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True, return_features: bool = True):
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def scripted(module: nn.Module, path) -> str:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# NVIDIA's TorchScript inception-2015-12-05.pt in miniature: the same call signature (uint8 images,
# return_features / use_fp16 / no_output_bias), a TF1-style resize to 299 inside forward, blocks under
# `layers` with `mixed_6.conv` (the sFID layer) and an `output` linear layer of class logits.

@torch.jit.script
def tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (no half-pixel centres), written by gathers: independent of grid_sample."""
    h, w = x.shape[2], x.shape[3]
    sy = torch.arange(size, dtype=torch.float64) * (h / size)
    sx = torch.arange(size, dtype=torch.float64) * (w / size)
    y0, x0 = sy.floor().long().clamp(max=h - 1), sx.floor().long().clamp(max=w - 1)
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    fy, fx = (sy - sy.floor())[:, None].float(), (sx - sx.floor()).float()
    rows0, rows1 = x[:, :, y0], x[:, :, y1]
    top = rows0[:, :, :, x0] * (1 - fx) + rows0[:, :, :, x1] * fx
    bottom = rows1[:, :, :, x0] * (1 - fx) + rows1[:, :, :, x1] * fx
    return top * (1 - fy) + bottom * fy


class TinyMixed(nn.Module):
    """An Inception block in miniature: a 1×1 branch named `conv` (as mixed_6/conv) and a 3×3 branch."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU())
        self.tower = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class TinyInception(nn.Module):
    """pool features: 16-d; mixed_6.conv map: 8 channels of 3×3 (spatial features 7·3·3 = 63-d)."""

    def __init__(self, half_pixel_resize: bool = False):
        super().__init__()
        from collections import OrderedDict
        self.layers = nn.Sequential(OrderedDict([
            ("conv", nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())),
            ("pool0", nn.AdaptiveAvgPool2d(3)),
            ("mixed_6", TinyMixed(8, 8)),
            ("pool2", nn.AdaptiveAvgPool2d(1))]))
        self.output = nn.Linear(16, 10)
        self.half_pixel_resize = half_pixel_resize      # a different resize than TF's: for the self-check test

    def prepare(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32)
        if self.half_pixel_resize:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        else:
            x = tf1_resize(x, 299)
        return (x - 128) / 128

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False):
        features = self.layers(self.prepare(img)).reshape(-1, 16)
        if return_features:
            return features
        logits = torch.nn.functional.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return logits.softmax(1)

    @torch.jit.export
    def reference_outputs(self, img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pool features, the raw (B, 8, 3, 3) map of layers.mixed_6.conv, unbiased class probabilities) in
        one pass, for tests to compare with (and flatten the map on their own)."""
        x = self.layers.pool0(self.layers.conv(self.prepare(img)))
        spatial = self.layers.mixed_6.conv(x)
        features = self.layers.pool2(self.layers.mixed_6(x)).reshape(-1, 16)
        return features, spatial, torch.nn.functional.linear(features, self.output.weight).softmax(1)
