"""Tiny random tokenizers with a chosen compression, saved in the format the real loaders read, and tiny
ImageNet-/UCF-101-shaped trees to feed them. Shared by the jit tokenizer tests and the recipe data
contract (tests/unit/test_recipe_data.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from tests.datasets import save_image, write_avi

# ---------------------------------------------------------------------------------------------
# a discrete video tokenizer in the Cosmos DV convention, as TorchScript

class TinyVideoEncoder(nn.Module):
    """(B, 3, T, H, W) in [-1, 1] -> (indices (B, T', H/s, W/s), codes): causal time pooling (the first
    frame alone, then groups of t, so T' = 1 + (T - 1)/t), s×s average pooling, a random colour mix, and
    each of the three channels rounded to `levels[c]` values; the index is the mixed-radix number of the
    three digits (an FSQ codebook of prod(levels) codes)."""

    def __init__(self, temporal: int, spatial: int, levels: list[int]):
        super().__init__()
        self.t, self.s, self.levels = temporal, spatial, list(levels)
        self.mix = nn.Parameter(torch.eye(3) + 0.2 * torch.randn(3, 3))

    def forward(self, x: torch.Tensor):
        b, c, frames, h, w = x.shape
        rest = x[:, :, 1:].reshape(b, c, (frames - 1) // self.t, self.t, h, w).mean(3)
        x = torch.cat([x[:, :, :1], rest], 2)                  # s×s means by reshape: also in bf16 on CPU
        x = x.reshape(b, c, x.shape[2], h // self.s, self.s, w // self.s, self.s).mean([4, 6])
        z = torch.tanh(torch.einsum("ij,bjthw->bithw", self.mix.to(x.dtype), x))
        idx = torch.zeros_like(z[:, 0], dtype=torch.long)
        for i, n in enumerate(self.levels):
            digit = torch.round((z[:, i].float() + 1) / 2 * (n - 1)).long()
            idx = idx * n + digit
        return idx, z


class TinyVideoDecoder(nn.Module):
    """indices (B, T', h, w) -> video (B, 3, 1 + (T' - 1)·t, h·s, w·s) in [-1, 1]."""

    def __init__(self, temporal: int, spatial: int, levels: list[int]):
        super().__init__()
        self.t, self.s, self.levels = temporal, spatial, list(levels)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.long()
        digits = []
        for n in self.levels[::-1]:
            digits.append((idx % n).float() / max(n - 1, 1) * 2 - 1)
            idx = idx // n
        z = torch.stack(digits[::-1], 1)
        z = z.repeat_interleave(self.s, 3).repeat_interleave(self.s, 4)
        return torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(self.t, 2)], 2)


def write_jit_tokenizer(directory: Path, temporal: int = 4, spatial: int = 8, levels=(4, 4, 4),
                        config: bool = True, **extra_config) -> Path:
    """encoder.jit + decoder.jit (+ config.json with vocab_size and compression) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(TinyVideoEncoder(temporal, spatial, list(levels))).save(str(directory / "encoder.jit"))
    torch.jit.script(TinyVideoDecoder(temporal, spatial, list(levels))).save(str(directory / "decoder.jit"))
    if config:
        cfg = {"vocab_size": math.prod(levels), "compression": [temporal, spatial, spatial], **extra_config}
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


# ---------------------------------------------------------------------------------------------
# diffusers stand-ins: the same class and compression as the public model, random and tiny

def _blocks(spatial: int) -> int:
    """Down blocks of a diffusers 2D autoencoder with `spatial`× downsampling (each block but the last halves)."""
    n = int(math.log2(spatial)) + 1
    assert 2 ** (n - 1) == spatial, f"spatial compression {spatial} is not a power of two"
    return n


def write_diffusers_tokenizer(name: str, directory: Path, temporal: int, spatial: int, vocab: int | None,
                              channels: int | None) -> Path:
    import diffusers

    torch.manual_seed(0)
    if name == "video-vae":        # AutoencoderKLWan: 2^(len(dim_mult)-1) spatial, 2^(temporal flags) in time
        steps = _blocks(spatial) - 1
        flags = [False] * steps
        for i in range(int(math.log2(temporal))):
            flags[steps - 1 - i] = True          # Wan downsamples time in its last blocks
        diffusers.AutoencoderKLWan(base_dim=4, z_dim=channels, dim_mult=[1] * (steps + 1), num_res_blocks=1,
                                   temperal_downsample=flags).save_pretrained(directory)
        return directory
    if name == "maskgit-vq":       # not a diffusers model: a state dict file in `directory`
        directory.mkdir(parents=True, exist_ok=True)
        write_maskgit_vq(directory, spatial, vocab)
        return directory
    n = _blocks(spatial)
    small = dict(block_out_channels=[4] * n, down_block_types=["DownEncoderBlock2D"] * n,
                 up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=1, norm_num_groups=2)
    if name == "sd-vae":
        diffusers.AutoencoderKL(latent_channels=channels, **small).save_pretrained(directory)
    elif name == "vq":
        diffusers.VQModel(latent_channels=4, num_vq_embeddings=vocab, **small).save_pretrained(directory)
    else:
        raise ValueError(f"no tiny stand-in for tokenizer {name!r}")
    return directory


# ---------------------------------------------------------------------------------------------
# MaskGIT's VQGAN: the project's own network, random and tiny, saved as the published state dict is

def write_maskgit_vq(where: Path, spatial: int = 16, vocab: int = 1024, channels: int = 32, code_dim: int = 8,
                     blocks: int = 1, seed: int = 0) -> Path:
    """A random MaskGitVQGAN with `spatial`× downsampling (log2(spatial) + 1 levels, the last at twice the
    width, so width-changing blocks and their shortcuts are there) saved with torch.save as a plain state
    dict: to `where` if it names a .bin/.safetensors file, else to where/maskgit-vqgan-imagenet-f16-256.bin."""
    from safetensors.torch import save_file

    from elt_scale.tokenizers.maskgit_vq import HUB_FILE, MaskGitVQGAN, VQGANConfig

    levels = _blocks(spatial)
    torch.manual_seed(seed)
    cfg = VQGANConfig(channels=channels, channel_mult=(1,) * (levels - 1) + (2,), num_res_blocks=blocks,
                      codebook_size=vocab, code_dim=code_dim)
    sd = MaskGitVQGAN(cfg).state_dict()
    path = where if where.suffix in (".bin", ".safetensors") else where / HUB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------
# trees

UCF_CLASSES = ["ApplyEyeMakeup", "BandMarching", "YoYo"]


def make_ucf_tree(root: Path, frames: int = 20, clips_per_class: int = 2, size=(32, 24)) -> tuple[Path, Path]:
    """UCF-101 layout: ROOT/UCF-101/<Class>/v_<Class>_gXX_c01.avi, all but the last group of each class in
    trainlist01, the last in testlist01; ROOT/ucfTrainTestlist/classInd.txt. Returns (videos, annotations)."""
    videos, ann = root / "UCF-101", root / "ucfTrainTestlist"
    ann.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for c, cls in enumerate(UCF_CLASSES):
        for g in range(1, clips_per_class + 2):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            write_avi(videos / rel, frames=frames, size=size, seed=10 * c + g)
            (train if g <= clips_per_class else test).append(f"{rel} {c + 1}")
    (ann / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    (ann / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (ann / "testlist01.txt").write_text("\n".join(r.split()[0] for r in test) + "\n")
    return videos, ann


def make_imagenet_tree(root: Path, per_class: int = 2) -> Path:
    """ROOT/nXXXXXXXX/*.JPEG, two synsets."""
    for c, syn in enumerate(["n01440764", "n01443537"]):
        for i in range(per_class):
            save_image(root / syn / f"{syn}_{i}.JPEG", size=(48 + 8 * i, 40), seed=10 * c + i)
    return root
