"""Consolidate a run's checkpoint (any ZeRO stage, any world size) into one safetensors file, and load
models for sampling.

    elt-export RUN_DIR [--ema] [--tag step_00001000] --out model.safetensors

The recipe travels inside the safetensors metadata, so `load_model(model.safetensors)` needs nothing
else: no DeepSpeed, no pickles. With --ema the parameters are the fp32 EMA (consolidated from every
rank's EMA shard); buffers come from the raw weights. DeepSpeed checkpoints themselves are pickles and
are trusted-only: they are read only from a run's own directory or an explicit train.resume=PATH."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from ..config import load_recipe, recipe_from_yaml, recipe_to_dict
from ..models import build_model
from . import checkpoint as ckpt
from .ema import consolidate as consolidate_ema


def latest_tag(ckpt_dir: Path) -> str:
    tag = ckpt.read_pointer(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no 'latest' checkpoint pointer (has this run saved a checkpoint?)")
    return tag


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights (or EMA weights) of a run's checkpoint `tag` (default: the latest complete one)."""
    ckpt_dir = Path(run_dir) / "ckpt"
    folder = ckpt_dir / (tag or latest_tag(ckpt_dir))
    if not folder.is_dir():
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        raise FileNotFoundError(f"{folder}: no such checkpoint; tags in {ckpt_dir}: {', '.join(tags) or 'none'}")
    state = ckpt.consolidated_weights(folder)
    if ema:
        averaged = consolidate_ema(folder)
        missing = sorted(set(averaged) - set(state))
        if missing:
            raise KeyError(f"{folder}: EMA names {missing[:3]} are not parameters of the checkpoint")
        state.update(averaged)
    return state


def export(run_dir: str | Path, out: str | Path, ema: bool = False, tag: str | None = None) -> Path:
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir():                      # replace() would fail only after the work, leaving OUT.tmp behind
        raise ValueError(f"--out {out}: is a directory; give a file name such as {out / 'model.safetensors'}")
    recipe = load_recipe(run_dir / "recipe.yaml")
    state = consolidated_state_dict(run_dir, tag, ema)
    meta = {"recipe": yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), "ema": str(ema).lower(),
            "tag": tag or latest_tag(run_dir / "ckpt")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(out)                      # an interrupted export never leaves a half file under the name
    return out


HF_WEIGHTS = "model.safetensors"          # a save_pretrained folder: config.json + this (an elt-export file)


def has_ema(run_dir: Path, tag: str | None = None) -> bool:
    ckpt_dir = Path(run_dir) / "ckpt"
    return any((ckpt_dir / (tag or latest_tag(ckpt_dir))).glob("ema_rank*.safetensors"))


def load_model(path: str | Path, ema: bool | None = False, device: str | torch.device = "cpu", tag: str | None = None):
    """A safetensors export, a run directory (checkpoint `tag`, default the latest) or a save_pretrained
    folder -> (model in eval mode, recipe). No DeepSpeed engine. `ema` selects the EMA weights of a run
    directory (None: the EMA when the checkpoint has one); an export holds whichever it was written with."""
    path = Path(path)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
        state = consolidated_state_dict(path, tag, ema=has_ema(path, tag) if ema is None else ema)
    elif path.is_dir() and (path / HF_WEIGHTS).is_file():
        return load_model(path / HF_WEIGHTS, ema, device)
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: neither a run directory (recipe.yaml + ckpt/) nor a save_pretrained "
                                f"folder (config.json + {HF_WEIGHTS})")
    else:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory or .safetensors file (or save_pretrained folder)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as e:      # e.g. a .npz or a checkpoint .pt passed by mistake
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        if "recipe" not in meta:
            raise ValueError(f"{path}: no recipe in the safetensors metadata (not written by elt-export?)")
        if ema and meta.get("ema") != "true":
            raise ValueError(f"{path}: exported without --ema; it holds the raw weights")
        recipe = recipe_from_yaml(meta["recipe"], where=f"{path} (recipe metadata)")
        state = load_file(str(path))
    model = build_model(recipe)
    model.load_state_dict(state)
    return model.to(device).eval(), recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elt-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml and ckpt/)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (needs train.ema_decay > 0)")
    p.add_argument("--tag", default=None, help="checkpoint folder under ckpt/ (default: the latest complete one)")
    args = p.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.ema, args.tag)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"elt-export: {e}", file=sys.stderr)
        return 2
    print(f"elt-export: wrote {out} ({'EMA' if args.ema else 'raw'} weights of {args.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
