"""The Inception-v3 of the TF FID graph (inception-2015-12-05), as the two PyTorch files that port it,
wrapped to give what ADM's evaluator reads from the TF graph, for uint8 (B, 3, H, W) images of any size:

    pool      (B, 2048)  `pool_3:0`                       FID, precision/recall, IS
    spatial   (B, 2023)  `mixed_6/conv:0`[..., :7]         sFID: the first 7 channels of the 17×17 map of
                         the 1×1 branch of the 7th mixed block, flattened in TF's (h, w, c) order
    logit_weight (1008, 2048)  `softmax/logits/MatMul`'s weight: IS = softmax(pool @ W.T), no bias

Resizing: the TF graph resizes to 299×299 with ResizeBilinear (align_corners=False, no half-pixel
centres: source = target × in/out, clamped at the border) and maps x to (x - 128) / 128. NVIDIA's
TorchScript file does the same with affine_grid/grid_sample; `resize_like_tf1` here is that
construction. torch-fidelity's port has its own TF1-exact bilinear function; torchmetrics wraps it
with antialias=True by default (PyTorch's half-pixel bilinear, not TF's), which is turned off here."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
SPATIAL_BLOCK = "mixed_6"              # NVIDIA's layer names are the TF graph's (layers.mixed_6.conv)
FIDELITY_SPATIAL = "Mixed_6d.branch1x1"  # torch-fidelity's (torchvision) name for mixed_6/conv
SFID_HELP = ("sFID reads mixed_6/conv: pass --inception-weights NVIDIA's TorchScript inception-2015-12-05.pt "
             "(its layers.mixed_6.conv) or torch-fidelity's weights-inception-2015-12-05-6726825d.pth")


def resize_like_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size, size) by TF1 ResizeBilinear's rule: sample the source at
    target_index × in/out (no half-pixel offset), bilinear, clamped to the border pixels."""
    b, _, h, w = images.shape
    theta = torch.eye(2, 3, device=images.device)          # float32 arithmetic, as in NVIDIA's file
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size    # shifts grid_sample's half-pixel centres onto TF's grid
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(images.dtype)[None].repeat(b, 1, 1)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def spatial_hwc(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h·w·7): the first 7 channels in TF's NHWC flattening (what ADM's mu_s expects)."""
    x = feature_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(len(x), -1).float()


class ScriptedInception(nn.Module):
    """NVIDIA's TorchScript inception-2015-12-05.pt, run block by block through its `layers` so that the
    output of layers.mixed_6.conv is seen. The first batch is also run through the file's own forward
    and the pool features must agree: a file laid out otherwise fails instead of giving other numbers."""

    def __init__(self, net: nn.Module, path: Path | str = "the TorchScript file"):
        super().__init__()
        self.net, self.path, self.checked = net, str(path), False
        names = dict(net.named_children())
        if "layers" not in names or "output" not in names:
            raise ValueError(f"{path}: a TorchScript file without `layers` and `output` submodules is not "
                             f"NVIDIA's inception-2015-12-05.pt; {SFID_HELP}")
        self.blocks = list(net.layers.named_children())
        block = dict(self.blocks).get(SPATIAL_BLOCK)
        if block is None or "conv" not in dict(block.named_children()):
            raise ValueError(f"{path}: no layers.{SPATIAL_BLOCK}.conv; {SFID_HELP}")

    @property
    def logit_weight(self) -> torch.Tensor:
        return self.net.output.weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (pool (B, 2048), spatial (B, 2023)), float32."""
        x = (resize_like_tf1(images.to(torch.float32)) - 128) / 128
        spatial = None
        for name, block in self.blocks:
            if name == SPATIAL_BLOCK:
                spatial = spatial_hwc(block.conv(x))
            x = block(x)
        pool = x.reshape(len(x), -1).float()
        if not self.checked:
            self._check(images, pool)
        return pool, spatial

    def _check(self, images: torch.Tensor, pool: torch.Tensor) -> None:
        own = self.net(images, return_features=True).float()
        if own.shape != pool.shape or not torch.allclose(own, pool, rtol=1e-4, atol=1e-4):
            raise ValueError(f"{self.path}: running its layers one by one does not reproduce its own pool "
                             f"features (max difference {float((own - pool).abs().max()):.3g}): not laid out as "
                             f"NVIDIA's inception-2015-12-05.pt; {SFID_HELP}")
        self.checked = True


class FidelityInception(nn.Module):
    """torch-fidelity's state dict through torchmetrics' NoTrainInceptionV3 (needs torch-fidelity), with
    TF1 resizing (antialias off) and a hook on Mixed_6d.branch1x1 (conv + BN + ReLU) for mixed_6/conv."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self._spatial = net, None
        net.get_submodule(FIDELITY_SPATIAL).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = spatial_hwc(output)

    @classmethod
    def from_file(cls, path: Path) -> "FidelityInception":
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            kw = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(path), **kw)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"{path} is not TorchScript, so it is read as torch-fidelity's state dict, "
                                      f"which needs torch-fidelity; or pass NVIDIA's TorchScript "
                                      f"inception-2015-12-05.pt instead ({e})") from None
        return cls(net)

    @property
    def logit_weight(self) -> torch.Tensor:
        return self.net.fc.weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._spatial = None
        pool = self.net(images).float()
        return pool.reshape(len(pool), -1), self._spatial
