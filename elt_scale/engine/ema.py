"""EMA of the weights, in fp32, sharded across ranks the way the fp32 master weights are.

Each rank keeps the EMA only of the *fragment* of each parameter it owns, read straight from the
optimizer's fp32 master copy, so an update is a local lerp with no communication:

- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fp32 fragment DeepSpeed links to each parameter
  (`param._hp_mapping`: which slice of the flattened parameter this rank's partition holds);
- ZeRO-3: this rank's partition of the fp32 master (`safe_get_local_fp32_param`, the slice
  [rank·P, rank·P + P) of the flattened, padded parameter);
- stage 0 (replicated fp32 weights, no master copy): a contiguous 1/world slice of each parameter.

A fragment is (start, numel) in the flattened parameter, so shards from any world size consolidate
into full tensors (`consolidate`) and a resume on a different world size re-slices them.
Files: one `ema_rank{r:05d}.safetensors` per rank in the checkpoint folder (no pickles)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _fp32_fragment(param: torch.Tensor, rank: int, world: int) -> tuple[int, torch.Tensor] | None:
    """(start in the flattened param, live fp32 view or copy of this rank's fragment), or None if none."""
    if hasattr(param, "ds_id"):                                     # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param
        local = safe_get_local_fp32_param(param)
        start = rank * param.ds_tensor.ds_numel
        numel = max(0, min(param.ds_numel - start, local.numel()))
        return (start, local.view(-1)[:numel]) if numel else None
    mapping = getattr(param, "_hp_mapping", None)
    if hasattr(param, "_hp_mapping"):                               # ZeRO-1/2, bf16 optimizer
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)
    n = param.numel()                                               # stage 0: my 1/world slice
    chunk = -(-n // world)
    start = rank * chunk
    numel = max(0, min(chunk, n - start))
    return (start, param.detach().view(-1)[start:start + numel].float()) if numel else None


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, rank: int, world: int):
        self.module, self.decay, self.rank, self.world = module, decay, rank, world
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
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
            frag = _fp32_fragment(p, self.rank, self.world)
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
        tmp.replace(folder / f"ema_rank{self.rank:05d}.safetensors")

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Take this rank's fragments out of the consolidated EMA (works for any saved world size)."""
        full = consolidate(folder)
        missing = sorted(set(self.shadow) - set(full))
        if missing:
            raise KeyError(f"{folder}: EMA shards lack parameter(s) {missing[:3]}")
        for name, (start, t) in self.shadow.items():
            t.copy_(full[name].view(-1)[start:start + t.numel()])


def consolidate(folder: str | Path) -> dict[str, torch.Tensor]:
    """All ranks' EMA shards in a checkpoint folder -> full fp32 tensors by parameter name."""
    from safetensors import safe_open
    files = sorted(Path(folder).glob("ema_rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no EMA shards (ema_rank*.safetensors); was train.ema_decay > 0?")
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
            shapes, starts = json.loads(meta["shapes"]), json.loads(meta["starts"])
            for name, shape in shapes.items():
                full.setdefault(name, torch.zeros(shape, dtype=torch.float32))
                covered.setdefault(name, 0)
            for name in sf.keys():
                t = sf.get_tensor(name)
                full[name].view(-1)[starts[name]:starts[name] + t.numel()] = t
                covered[name] += t.numel()
    short = [n for n, c in covered.items() if c != full[n].numel()]
    if short:
        raise ValueError(f"{folder}: EMA shards cover only part of {short[:3]} (a rank's file is missing?)")
    return full
