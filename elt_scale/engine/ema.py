"""EMA of the weights, in fp32, sharded across ranks the way the fp32 master weights are.

Each rank keeps the EMA only of the *fragment* of each parameter it owns, read straight from the
optimizer's fp32 master copy (ds_internals.fp32_fragment says which piece at each ZeRO stage), so an
update is a local lerp with no communication. A fragment is (start, numel) in the flattened parameter,
so shards from any world size consolidate into full tensors (inference.weights.consolidated_ema, for export)
and a resume on a different world size re-slices them (each rank reading only the slices it owns).
Files: one `ema_rank{r:05d}.safetensors` per rank in the checkpoint folder (no pickles)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..inference.weights import EMA_GLOB, ema_file
from .ds_internals import fp32_fragment, full_shape


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, rank: int, world: int):
        self.module, self.decay, self.rank, self.world = module, decay, rank, world
        self.shapes = {n: tuple(full_shape(p)) for n, p in module.named_parameters()}
        self.shadow: dict[str, tuple[int, torch.Tensor]] = {}
        live = []
        for name, (start, w) in self._fragments():
            if w.dtype != torch.float32:
                raise TypeError(f"EMA: parameter {name} has no fp32 master fragment (dtype {w.dtype})")
            self.shadow[name] = (start, w.detach().clone())
            live.append(w)
        # The fragments are views into the optimizer's fp32 master, which DeepSpeed updates in place:
        # resolved once (after any checkpoint load), so a step's update is one multi-tensor kernel
        # instead of a lookup and a launch per parameter.
        self._pairs = ([t for _, t in self.shadow.values()], live)

    def _fragments(self):
        for name, p in self.module.named_parameters():
            frag = fp32_fragment(p, self.rank, self.world)
            if frag is not None:
                yield name, frag

    @torch.no_grad()
    def update(self) -> None:
        """ema ← decay·ema + (1−decay)·w, on this rank's fragments only (call after an applied step)."""
        if self._pairs[0]:
            torch._foreach_lerp_(*self._pairs, 1.0 - self.decay)

    # --- persistence: one safetensors file per rank, fragment addresses in its metadata --------------
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        meta = {"shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
                "starts": json.dumps({n: s for n, (s, _) in self.shadow.items()}),
                "decay": str(self.decay)}
        tmp = folder / f".ema_rank{self.rank:05d}.tmp"
        save_file({n: t.contiguous() for n, (_, t) in self.shadow.items()}, str(tmp), metadata=meta)
        tmp.replace(folder / ema_file(self.rank))

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """This rank's fragments from the saved shards of any world size: from each file only the slices that
        overlap them, so a rank reads its share of the EMA and never builds the whole of it (every rank of a
        node did, before: a full fp32 copy of the model each)."""
        from safetensors import safe_open
        files = sorted(Path(folder).glob(EMA_GLOB))
        if not files:
            raise FileNotFoundError(f"{folder}: no EMA shards ({EMA_GLOB})")
        covered = dict.fromkeys(self.shadow, 0)
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                starts = json.loads(sf.metadata()["starts"])
                for name in set(sf.keys()) & set(self.shadow):
                    covered[name] += self._copy_overlap(name, sf.get_slice(name), starts[name])
        short = sorted(n for n, c in covered.items() if c != self.shadow[n][1].numel())
        if short:
            raise KeyError(f"{folder}: EMA shards lack (part of) parameter(s) {short[:3]}")

    def _copy_overlap(self, name: str, saved, saved_start: int) -> int:
        """Copy the part of a saved fragment [saved_start, +len) that this rank owns; returns its length."""
        start, t = self.shadow[name]
        lo, hi = max(start, saved_start), min(start + t.numel(), saved_start + saved.get_shape()[0])
        if lo >= hi:
            return 0
        t[lo - start:hi - start].copy_(saved[lo - saved_start:hi - saved_start])
        return hi - lo
