"""Consolidate a run's DeepSpeed checkpoint into one safetensors file, and load models for sampling.

    elt-export RUN_DIR [--ema] --out model.safetensors

The recipe travels inside the safetensors metadata, so `load_model(model.safetensors)` needs nothing
else: no DeepSpeed, no pickles. DeepSpeed checkpoints themselves are pickles and are trusted-only:
they are read only from a run's own directory or an explicit train.resume=PATH."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from ..config import Recipe, load_recipe, recipe_to_dict
from ..models import build_model


def latest_tag(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no 'latest' checkpoint pointer (has this run saved a checkpoint?)")
    return latest.read_text().strip()


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (trusted input: full unpickling)."""
    ckpt_dir = Path(run_dir) / "ckpt"
    tag = tag or latest_tag(ckpt_dir)
    folder = ckpt_dir / tag
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export(run_dir: str | Path, out: str | Path, ema: bool = False) -> Path:
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    if ema:
        raise NotImplementedError("EMA export arrives with the EMA engine")
    state = consolidated_state_dict(run_dir)
    meta = {"recipe": yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), "ema": str(ema).lower()}
    out = Path(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    return out


def load_model(path: str | Path, ema: bool = False, device: str | torch.device = "cpu"):
    """A safetensors export or a run directory -> (model in eval mode, recipe). No DeepSpeed engine."""
    path = Path(path)
    if path.is_dir():
        recipe = load_recipe(path / "recipe.yaml")
        state = consolidated_state_dict(path)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "recipe" not in meta:
            raise ValueError(f"{path}: no recipe in the safetensors metadata (not written by elt-export?)")
        recipe = recipe_from_text(meta["recipe"])
        state = load_file(str(path))
    model = build_model(recipe)
    model.load_state_dict(state)
    return model.to(device).eval(), recipe


def recipe_from_text(text: str) -> Recipe:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_recipe(f.name)
    finally:
        Path(f.name).unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elt-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    args = p.parse_args(argv)
    out = export(args.run_dir, args.out, args.ema)
    print(f"elt-export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
