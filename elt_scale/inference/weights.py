"""Weights without a DeepSpeed engine: read a run's checkpoints (any ZeRO stage, any world size, raw or EMA),
and the one safetensors format every export uses.

    <run>/ckpt/latest                       -> "step_00001000" (moved only once a save is complete)
    <run>/ckpt/step_00001000/               DeepSpeed's files, client_state.json, ema_rank*.safetensors

engine/checkpoint.py writes these folders; everything that reads weights for sampling reads them here.
An export (`save_weights`) is one safetensors file whose metadata carries the recipe, the tokenizer that
decodes samples and whether the weights are the EMA: no pickles, no DeepSpeed needed to load it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

POINTER = "latest"
CLIENT_STATE = "client_state.json"
EMA_GLOB = "ema_rank*.safetensors"


def ema_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.safetensors"


def read_pointer(ckpt_dir: str | Path) -> str | None:
    p = Path(ckpt_dir) / POINTER
    return p.read_text().strip() if p.exists() else None


def latest_tag(ckpt_dir: Path) -> str:
    tag = read_pointer(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no '{POINTER}' checkpoint pointer (has this run saved a checkpoint?)")
    return tag


def checkpoint_folder(run_dir: str | Path, tag: str | None = None) -> Path:
    """ckpt/<tag> of a run (default: the latest complete checkpoint), checked to exist."""
    ckpt_dir = Path(run_dir) / "ckpt"
    folder = ckpt_dir / (tag or latest_tag(ckpt_dir))
    if not folder.is_dir():
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        raise FileNotFoundError(f"{folder}: no such checkpoint; tags in {ckpt_dir}: {', '.join(tags) or 'none'}")
    return folder


def read_client(folder: Path) -> dict:
    return json.loads((Path(folder) / CLIENT_STATE).read_text())


def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint folder of any ZeRO stage and world size (trusted input: unpickles)."""
    folder = Path(folder)
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from ..dist import quiet_deepspeed
        quiet_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # memory-mapped: a stage-0 file also holds the optimizer's moments, which nobody here reads
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    return {k: v.float() for k, v in states["module"].items()}


def consolidated_ema(folder: str | Path) -> dict[str, torch.Tensor]:
    """All ranks' EMA shards of a checkpoint folder -> full fp32 tensors by parameter name. Each shard holds
    (start, values) fragments of flattened parameters (engine/ema.py), so any saved world size consolidates."""
    from safetensors import safe_open
    files = sorted(Path(folder).glob(EMA_GLOB))
    if not files:
        raise FileNotFoundError(f"{folder}: no EMA shards ({EMA_GLOB}); was train.ema_decay > 0?")
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


def has_ema(run_dir: Path, tag: str | None = None) -> bool:
    return any(checkpoint_folder(run_dir, tag).glob(EMA_GLOB))


def run_state_dict(run_dir: str | Path, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights (or EMA weights; buffers from the raw weights) of a run's checkpoint `tag`."""
    folder = checkpoint_folder(run_dir, tag)
    state = consolidated_weights(folder)
    if ema:
        averaged = consolidated_ema(folder)
        if missing := sorted(set(averaged) - set(state)):
            raise KeyError(f"{folder}: EMA names {missing[:3]} are not parameters of the checkpoint")
        state.update(averaged)
    return state


def save_weights(path: str | Path, state: dict[str, torch.Tensor], recipe_yaml: str, ema: bool,
                 tokenizer: dict | None = None, **meta: str) -> Path:
    """One safetensors file with the recipe, the decoding tokenizer and the EMA flag in its metadata; written
    under a temporary name, so an interrupted write never leaves a half file under `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"recipe": recipe_yaml, "ema": str(bool(ema)).lower(), **meta}
    if tokenizer is not None:
        meta["tokenizer"] = json.dumps(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a file written by `save_weights`; anything else is a clear error."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:          # e.g. a .npz or a checkpoint .pt passed by mistake
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if "recipe" not in meta:
        raise ValueError(f"{path}: no recipe in the safetensors metadata (not written by elt-export?)")
    return load_file(str(path)), meta
