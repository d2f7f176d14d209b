"""Every random stream of the project from one root seed: `derive_seed(seed, "purpose", i, j, ...)`.

The purpose tag keeps streams apart (the shard order of epoch 3 and the mask of step 3 never share a
seed), the indices make each draw a pure function of where it happens (step, micro-batch, epoch, window,
sampling batch), so results do not depend on world size, worker count or resumes. A keyed hash rather
than arithmetic on the parts: no two different part lists collide in practice, on any platform."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a root seed, a purpose tag and indices (ints or strings)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded by `derive_seed(*parts)`; on `device` (CPU and CUDA streams differ)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
