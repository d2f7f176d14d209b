"""MaskGIT's VQGAN (`--tokenizer maskgit-vq`): pixels in [0, 1] <-> 16×16 grids of 1024 codes, the tokenizer
of the paper's masked ImageNet models (google-research/maskgit `tokenizer_imagenet256_checkpoint`, rFID 2.28).

The network is written here; it loads the published PyTorch state dict (`maskgit-vqgan-imagenet-f16-256.bin`
in the hub repository fun-research/TiTok, the port open-muse and bytedance/1d-tokenizer load strictly, or a
`.safetensors` of the same keys; `data_prep/convert_maskgit_flax.py` turns Google's Flax checkpoint into it):

    encoder.conv_in  encoder.down.{0..4}.block.{0,1}  encoder.mid.{0,1}  encoder.norm_out  encoder.conv_out
    decoder.conv_in  decoder.mid.{0,1}  decoder.up.{0..4}.block.{0,1} (+ .upsample_conv for 1..4)
    decoder.norm_out  decoder.conv_out  quantize.embedding.weight (1024 × 256)

The original's quirks are kept, since the weights were trained with them:
  - no attention; down by 2×2 average pooling, up by nearest ×2 then a 3×3 conv;
  - residual convolutions have no bias, and where a block changes its width the 1×1 shortcut is applied to the
    block's *output* (h + W·h), not to its input;
  - the encoder ends in a 1×1 conv straight into the 256-d code space (no quant / post-quant convs);
  - input in [0, 1] (not [-1, 1]); the nearest code by plain L2 (no normalisation); decoded images clamped.

The architecture (base width, multipliers, blocks, codebook) is read from the weights' shapes, so tests load
tiny random models through the same code; GroupNorm keeps the original's 32 groups."""
from __future__ import annotations

import contextlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import resolve_device, resolve_precision

HUB_REPO = "fun-research/TiTok"
HUB_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class VQGANConfig:
    """Defaults: the published ImageNet-256 tokenizer (f16, 1024 codes of 256 dims)."""
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    codebook_size: int = 1024
    code_dim: int = 256
    groups: int = 32
    image_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    # Flax's "SAME" padding; for odd kernels at stride 1 that is k // 2 on every side
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)        # Flax's GroupNorm epsilon


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = norm(groups, cin), conv(cin, cout, 3, bias=False)
        self.norm2, self.conv2 = norm(groups, cout), conv(cout, cout, 3, bias=False)
        self.nin_shortcut = conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # MaskGIT's quirk: a width change is bridged by a 1x1 conv of the block's own output, the input is dropped
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class Level(nn.Module):
    """One resolution: residual blocks, then 2×2 average pooling ("down"), or nearest ×2 and a 3×3 conv ("up")."""

    def __init__(self, cin: int, cout: int, cfg: VQGANConfig, resize: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, cfg.groups)
                                   for j in range(cfg.num_res_blocks))
        self.resize = resize
        if resize == "up":
            self.upsample_conv = conv(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resize == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resize == "up":
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        ins, last = [cfg.channels] + widths[:-1], len(widths) - 1
        self.conv_in = conv(cfg.image_channels, cfg.channels, 3, bias=False)
        self.down = nn.ModuleList(Level(i, o, cfg, "down" if k < last else None)
                                  for k, (i, o) in enumerate(zip(ins, widths)))
        self.mid = nn.ModuleList(ResBlock(widths[-1], widths[-1], cfg.groups) for _ in range(cfg.num_res_blocks))
        self.norm_out = norm(cfg.groups, widths[-1])
        self.conv_out = conv(widths[-1], cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in [*self.down, *self.mid]:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = conv(cfg.code_dim, widths[-1], 3)
        self.mid = nn.ModuleList(ResBlock(widths[-1], widths[-1], cfg.groups) for _ in range(cfg.num_res_blocks))
        # up[k] is resolution k (as in the encoder), run from the coarsest (k = last) to the finest
        self.up = nn.ModuleList(Level(widths[min(k + 1, last)], widths[k], cfg, "up" if k > 0 else None)
                                for k in range(len(widths)))
        self.norm_out = norm(cfg.groups, widths[0])
        self.conv_out = conv(widths[0], cfg.image_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in [*self.mid, *reversed(self.up)]:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Quantizer(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w): the closest code in plain L2, in fp32 whatever z's dtype (in bf16 the
        search flips codes between near-equidistant entries). |z|² is the same for every code, so it is left out."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        book = self.embedding.weight.float()
        dist = book.pow(2).sum(1) - 2 * flat @ book.t()
        return dist.argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes.long()).permute(0, 3, 1, 2)


class MaskGitVQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig = VQGANConfig()):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder, self.quantize = Encoder(cfg), Decoder(cfg), Quantizer(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, H/16, W/16), int64."""
        return self.quantize.nearest(self.encoder(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, 16h, 16w) in [0, 1]."""
        z = self.quantize.lookup(codes).to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# the published weights

def resolve_weights(path: str) -> Path:
    """A weights file, a directory holding one, or a hub id (its maskgit-vqgan-imagenet-f16-256.bin)."""
    if not path:
        raise ValueError(f"--tokenizer maskgit-vq needs --tokenizer-path: {HUB_FILE}, a directory holding it, "
                         f"or the hub id {HUB_REPO}")
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        if (p / HUB_FILE).is_file():
            return (p / HUB_FILE).resolve()
        found = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        if len(found) != 1:
            raise FileNotFoundError(f"{p}: holds {len(found)} weights files ({', '.join(f.name for f in found)}"
                                    f"); expected {HUB_FILE} or exactly one {'/'.join(WEIGHT_SUFFIXES)} file")
        return found[0].resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or p.suffix in WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"--tokenizer-path {path}: no such file or directory")
    return hub_download(path)


def hub_download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo_id, HUB_FILE))
    except Exception as e:  # noqa: BLE001 - the hub's many error types become one line naming the id
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"--tokenizer-path {repo_id}: not a local path, and {HUB_FILE} could not be had "
                                f"from the hub repository of that name ({type(e).__name__}: {first})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch pickle read with weights_only=True: tensors and containers only,
    so a weights file can never run code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            other = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if other:
                raise ValueError(f"{path}: refused: it pickles {other[1]}, not only tensors (torch.load with "
                                 "weights_only=True runs no code from the file); expected a plain state dict") from None
            raise ValueError(f"{path}: not a PyTorch weights file (unpickling with weights_only=True failed)") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{path}: not a PyTorch weights file ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, expected a state dict (key -> tensor)")
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor "
                             "(expected a plain state dict: encoder.*, decoder.*, quantize.embedding.weight)")
    return sd


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def config_from_state(sd: dict[str, torch.Tensor], where: Path) -> VQGANConfig:
    """The architecture the weights' shapes describe (the published file: 128 × [1, 1, 2, 2, 4], 2 blocks)."""
    for key in ("encoder.conv_in.weight", "quantize.embedding.weight", "encoder.down.0.block.0.conv1.weight"):
        if key not in sd:
            raise ValueError(f"{where}: missing key {key!r}: not MaskGIT's VQGAN state dict layout")
    codebook, code_dim = sd["quantize.embedding.weight"].shape
    channels = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(sd, "encoder.down.{}.block.0.conv1.weight")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    if any(w % channels for w in widths) or channels % VQGANConfig.groups:
        raise ValueError(f"{where}: widths {widths} with {channels} base channels: not MaskGIT's VQGAN "
                         f"(multiples of the base width, in {VQGANConfig.groups} GroupNorm groups)")
    return VQGANConfig(channels=channels, channel_mult=tuple(w // channels for w in widths),
                       num_res_blocks=_count(sd, "encoder.down.0.block.{}.conv1.weight"),
                       codebook_size=codebook, code_dim=code_dim)


def check_layout(model: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Every key of the network in the file and nothing else, each of its shape: one line naming the first
    difference (a strict load_state_dict, with an error a user can read)."""
    want = model.state_dict()
    missing, unexpected = [k for k in want if k not in sd], [k for k in sd if k not in want]
    if missing or unexpected:
        parts = [f"{what} key {keys[0]!r}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(f"{where}: {'; '.join(parts)}: not MaskGIT's VQGAN state dict layout")
    for key, value in want.items():
        if sd[key].shape != value.shape:
            raise ValueError(f"{where}: key {key!r} has shape {list(sd[key].shape)}, the network "
                             f"({model.config}) needs {list(value.shape)}")


def load_maskgit_vqgan(path: Path) -> MaskGitVQGAN:
    sd = read_state_dict(path)
    model = MaskGitVQGAN(config_from_state(sd, path))
    check_layout(model, sd, path)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def exact_fp32(device: torch.device, dtype: torch.dtype):
    """cuDNN runs fp32 convolutions in TF32 by default (10 mantissa bits, fp16's): asked for fp32, the
    encoder gets fp32, since codes near a tie flip with the precision (as the vq tokenizer found for bf16)."""
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class MaskGitVQTokenizer:
    name = "maskgit-vq"
    kind = "codes"
    scaling_factor = 1.0
    video_native = False

    def __init__(self, path: str = "", device: str | None = None, precision: str = "auto", **_):
        weights = resolve_weights(path)
        # what the manifest records: the absolute file, or the hub id as given (resolved again when decoding)
        self.path = str(weights) if Path(path).expanduser().exists() else path
        self.device = resolve_device(device)
        # auto = fp32: the codes are the product here; bf16/fp16 (asked for) run the convolutions only,
        # the codebook and the nearest-code search stay fp32
        self.compute_dtype = resolve_precision("fp32" if precision == "auto" else precision, self.device)
        model = load_maskgit_vqgan(weights).to(self.device)
        model.encoder.to(self.compute_dtype)
        model.decoder.to(self.compute_dtype)
        self.model, self.config = model, model.config
        self.vocab_size = self.config.codebook_size
        self.dtype = np.int16 if self.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": self.path}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        f = self.config.downsample
        if channels != 3 or len(grid) != 2 or grid[0] % f or grid[1] % f:
            raise ValueError(f"{self.path}: MaskGIT's VQGAN takes RGB images with sides divisible by {f}, "
                             f"not {channels}x{'x'.join(map(str, grid))}; set --resolution")
        return [grid[0] // f, grid[1] // f]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, H/16, W/16), int16 (int32 for codebooks > 32768)."""
        self.output_shape(images.shape[1], list(images.shape[2:]))
        x = images.to(self.device, self.compute_dtype)
        with exact_fp32(self.device, self.compute_dtype):
            idx = self.model.encode(x)
        return idx.cpu().to(torch.int16 if self.dtype == np.int16 else torch.int32)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, 16h, 16w) in [0, 1]."""
        return self.model.decode(codes.to(self.device)).float().cpu()
