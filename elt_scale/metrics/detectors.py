"""Feature networks for FID/IS/FVD, loaded from local files only: elt-eval never downloads weights.

Inception (IS, FID, sFID, precision/recall), either of the two ports of the TF FID graph
(elt_scale/metrics/inception.py says what is read from each):
  * NVIDIA's TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA/3 metrics), run block by block;
  * torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` state dict, through torchmetrics'
    NoTrainInceptionV3 (needs `pip install torch-fidelity`, which pulls torchvision).
I3D (FVD, the StyleGAN-V protocol): the TorchScript `i3d_torchscript.pt`, called on float videos
(B, 3, T, H, W) in [-1, 1] with rescale=False, resize=True, return_features=True -> 400-d features.

Any TorchScript file with the same call signature works, which is how the tests use tiny networks."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

INCEPTION_HELP = ("pass --inception-weights PATH to a local file: NVIDIA's TorchScript inception-2015-12-05.pt "
                  "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth. elt-eval never downloads "
                  "weights, so this is required offline")
I3D_HELP = ("pass --i3d-weights PATH to a local copy of StyleGAN-V's i3d_torchscript.pt. elt-eval never "
            "downloads weights, so this is required offline")


class MissingWeightsError(FileNotFoundError):
    """A metric needs a feature network whose weights were not given as a local file."""


def _local_file(path, what: str, help_text: str) -> Path:
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{what} needs network weights: {help_text}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{what}: weights file {path} does not exist; {help_text}")
    return path


def _torchscript(path: Path) -> nn.Module | None:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError:             # not a TorchScript archive
        return None


def load_inception(path) -> nn.Module:
    """Local Inception weights -> module mapping uint8 (B, 3, H, W) to (pool (B, 2048), spatial (B, 2023)),
    with `.logit_weight` for the Inception Score (elt_scale/metrics/inception.py)."""
    from .inception import FidelityInception, ScriptedInception

    path = _local_file(path, "FID/IS", INCEPTION_HELP)
    scripted = _torchscript(path)
    module = ScriptedInception(scripted, path) if scripted is not None else FidelityInception.from_file(path)
    return module.eval().requires_grad_(False)


def file_sha256(path) -> str:
    """sha256 of a weights file (reported with every FID, and part of cache keys)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ScriptedI3D(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """videos uint8 (B, T, H, W, 3) -> (B, 400) features (StyleGAN-V FVD protocol)."""
        x = videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        return self.net(x, rescale=False, resize=True, return_features=True).float()


def load_i3d(path) -> nn.Module:
    path = _local_file(path, "FVD", I3D_HELP)
    scripted = _torchscript(path)
    if scripted is None:
        raise ValueError(f"{path}: not a TorchScript archive; FVD expects StyleGAN-V's i3d_torchscript.pt")
    return ScriptedI3D(scripted).eval()
