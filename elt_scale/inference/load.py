"""A trained model from any of its sources, ready to sample, and the tokenizer that decodes its samples.

    run directory       runs/NAME (recipe.yaml, tokenizer.json, ckpt/latest): checkpoint `tag`, raw or EMA
    export              model.safetensors written by elt-export (recipe and tokenizer in its metadata)
    saved folder        config.json + model.safetensors (ELT.save_pretrained)
    Hub id              owner/name of a saved folder on the Hugging Face Hub

A run records its tokenizer (tokenizer.json, from the shards' manifest at the start of training), so
sampling needs neither the shards nor the working directory the run was started from."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import load_recipe, recipe_from_yaml, recipe_to_dict
from ..data.shards import read_manifest
from ..models import build_model
from ..tokenizers import tokenizer_from_manifest
from .weights import has_ema, latest_tag, read_weights_file, run_state_dict

HF_WEIGHTS = "model.safetensors"     # a saved folder: config.json + this (an elt-export file)
HF_CONFIG = "config.json"
RUN_TOKENIZER = "tokenizer.json"     # in a run directory: the manifest's tokenizer entry
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class Loaded:
    model: torch.nn.Module           # eval mode, on the requested device
    recipe: object
    tokenizer: dict | None           # the manifest entry that rebuilds the decoder, if the source recorded one
    ema: bool                        # whether the weights are the EMA

    def tokenizer_entry(self, shards: str | Path | None = None) -> dict:
        """The manifest entry of the tokenizer that decodes samples: from `shards`' manifest if given, else the
        one the source recorded, else (runs that predate the record) the manifest of the recipe's data.shards."""
        if shards is not None:
            return read_manifest(shards)["tokenizer"]
        if self.tokenizer is not None:
            return self.tokenizer
        try:
            return read_manifest(self.recipe.data.shards)["tokenizer"]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; this model records no tokenizer, and decoding needs the manifest.json "
                                    f"of its shards (recipe data.shards={self.recipe.data.shards!r}): pass the "
                                    f"shards directory (elt-sample --shards DIR)") from None

    def decoder(self, shards: str | Path | None = None):
        return tokenizer_from_manifest({"tokenizer": self.tokenizer_entry(shards)})


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """A local path as given; a Hub id (owner/name that is not a local path) downloaded to the HF cache."""
    where = Path(source)
    if not where.exists() and HUB_ID.fullmatch(str(source)):
        from huggingface_hub import snapshot_download
        where = Path(snapshot_download(str(source), revision=revision))
    return where


def load(source: str | Path, ema: bool | None = False, device: str | torch.device = "cpu", tag: str | None = None,
         revision: str | None = None) -> Loaded:
    """A run directory (checkpoint `tag`, default the latest; `ema` None = the EMA when the checkpoint keeps
    one), an export, a saved folder or a Hub id -> Loaded. No DeepSpeed engine is built."""
    path = resolve(source, revision)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
        use_ema = has_ema(path, tag) if ema is None else ema
        state = run_state_dict(path, tag, ema=use_ema)
        tokenizer = _json(path / RUN_TOKENIZER)
    elif path.is_dir() and (path / HF_WEIGHTS).is_file():
        loaded = load(path / HF_WEIGHTS, ema, device)
        loaded.tokenizer = loaded.tokenizer or (_json(path / HF_CONFIG) or {}).get("tokenizer")
        return loaded
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: neither a run directory (recipe.yaml + ckpt/) nor a saved folder "
                                f"({HF_CONFIG} + {HF_WEIGHTS})")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or .safetensors file (or save_pretrained folder)")
    else:
        state, meta = read_weights_file(path)
        use_ema = meta.get("ema") == "true"
        if ema and not use_ema:
            raise ValueError(f"{path}: exported without --ema; it holds the raw weights")
        recipe = recipe_from_yaml(meta["recipe"], where=f"{path} (recipe metadata)")
        tokenizer = json.loads(meta["tokenizer"]) if "tokenizer" in meta else None
    model = build_model(recipe)
    model.load_state_dict(state)
    return Loaded(model.to(device).eval(), recipe, tokenizer, bool(use_ema))


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def recipe_yaml(recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def export_run(run_dir: str | Path, out: str | Path, ema: bool = False, tag: str | None = None) -> Path:
    """A run's checkpoint as one safetensors file (recipe and tokenizer inside): what elt-export writes."""
    from .weights import save_weights

    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir():                      # replace() would fail only after the work, leaving OUT.tmp behind
        raise ValueError(f"--out {out}: is a directory; give a file name such as {out / HF_WEIGHTS}")
    recipe = load_recipe(run_dir / "recipe.yaml")
    tag = tag or latest_tag(run_dir / "ckpt")
    state = run_state_dict(run_dir, tag, ema)
    return save_weights(out, state, recipe_yaml(recipe), ema, _json(run_dir / RUN_TOKENIZER), tag=tag)
