"""Tiny models for tests: a small ELT recipe and its inputs, and TorchScript feature networks standing in
for I3D (and the like) in metric tests."""
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
