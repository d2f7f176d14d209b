"""Loading diffusers autoencoders (local dir or hub id, via their own `from_pretrained`) and the
device/precision plumbing the learned tokenizers share."""
from __future__ import annotations

import os

import torch

from ..seeding import generator


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the device runs it natively (CUDA with bf16 support), else fp32."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision {precision!r}; allowed: auto, {', '.join(table)}")
    return table[precision]


def recorded_path(path: str) -> str:
    """What the manifest records: an absolute local directory, or the hub id as given."""
    if not path:
        raise ValueError("this tokenizer needs --tokenizer-path (a local directory or a hub id)")
    return os.path.abspath(path) if os.path.isdir(path) else path


def load_diffusers(class_name: str, path: str, subfolder: str | None, device: torch.device, dtype: torch.dtype):
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError("learned tokenizers need diffusers: pip install 'elt-scale[tokenizers]'") from e
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no class {class_name!r}")
    try:
        model = cls.from_pretrained(path, subfolder=subfolder or None, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load {class_name} from {path!r}"
                           f"{f' (subfolder {subfolder})' if subfolder else ''}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def key_noise(shape: tuple, seeds: list[int] | None, batch: int) -> torch.Tensor:
    """Standard normal noise with one generator per sample, seeded from the sample (its key), so a
    sampled latent does not depend on which rank or batch the sample landed in."""
    seeds = seeds if seeds is not None else list(range(batch))
    return torch.stack([torch.randn(shape, generator=generator(int(s), "latent")) for s in seeds])
