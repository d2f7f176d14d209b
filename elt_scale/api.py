"""A trained ELT from Python, in three lines:

    from elt_scale import ELT
    model = ELT.from_pretrained("runs/digits_masked")          # or model.safetensors, a saved folder, a hub id
    images = model.generate(classes=[1, 7], loops=2, cfg=2.0, steps=12, seed=0)   # uint8 (2, H, W, 3)

`generate` goes through the same samplers, loop specs (`4`, `6>2`, `auto:0.02`, ...) and per-batch seeding
as `elt-sample`, so the same seed, loops and cfg give the same images (with the same batch size).
`save_pretrained(folder)` writes the Hugging Face Hub layout through huggingface_hub's ModelHubMixin:
config.json (the recipe and the tokenizer that decodes samples) and model.safetensors (an elt-export
file), so `push_to_hub` and hub ids work as for any Hub model."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

from .config import recipe_to_dict
from .engine.export import HF_WEIGHTS, load_model
from .sampling import parse_loops

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ELT(ModelHubMixin, library_name="elt-scale", tags=["elt", "looped-transformer", "image-generation"]):
    def __init__(self, model: torch.nn.Module, recipe, tokenizer: dict | None = None, dtype: torch.dtype | None = None,
                 ema: bool = False):
        self.model, self.recipe, self.tokenizer, self.ema = model, recipe, tokenizer, ema
        self.device = next(model.parameters()).device
        # bf16 on GPUs by default; the weights stay fp32 and autocast runs the matmuls in `dtype`
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._decoder = None

    # --- loading and saving --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, ckpt: str | None = None, ema: bool | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        revision: str | None = None) -> "ELT":
        """An elt-export .safetensors file, a run directory (checkpoint `ckpt`, default the latest; `ema`
        None = the EMA weights when the run keeps them), a save_pretrained folder, or a Hub id of one."""
        where = Path(path)
        if not where.exists() and HUB_ID.fullmatch(str(path)):
            from huggingface_hub import snapshot_download
            where = Path(snapshot_download(str(path), revision=revision))
        model, recipe = load_model(where, ema=ema, device=device or default_device(), tag=ckpt)
        config = where / "config.json"
        tokenizer = json.loads(config.read_text()).get("tokenizer") if where.is_dir() and config.is_file() else None
        return cls(model, recipe, tokenizer, dtype, ema=bool(ema) if ema is not None else holds_ema(where, ckpt))

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file
        import yaml

        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = {"recipe": yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False), "ema": str(self.ema).lower()}
        save_file(state, str(save_directory / HF_WEIGHTS), metadata=meta)
        config = {"recipe": recipe_to_dict(self.recipe), "tokenizer": self._tokenizer_info()}
        (save_directory / "config.json").write_text(json.dumps(config, indent=2))

    def _tokenizer_info(self) -> dict | None:
        """The manifest entry naming the tokenizer, so a saved folder decodes samples without the shards."""
        if self.tokenizer is None:
            from .data.shards import read_manifest
            try:
                self.tokenizer = read_manifest(self.recipe.data.shards)["tokenizer"]
            except (FileNotFoundError, ValueError, KeyError):
                return None
        return self.tokenizer

    # --- sampling ------------------------------------------------------------------------------------------
    def decoder(self):
        if self._decoder is None:
            from .sample import load_decoder
            from .tokenizers import tokenizer_from_manifest
            self._decoder = (tokenizer_from_manifest({"tokenizer": self.tokenizer}) if self.tokenizer
                             else load_decoder(self.recipe))
        return self._decoder

    def generate(self, classes: Sequence[int], loops: int | str | None = None, cfg: float = 1.0,
                 steps: int | None = None, seed: int = 0, sampler: str = "ddpm", temperature: float = 1.0,
                 batch_size: int = 64, output: str = "uint8"):
        """One sample per entry of `classes` -> uint8 (N, H, W, 3) (video: (N, T, H, W, 3)), or PIL images
        (video: lists of frames) with output="pil". loops: an int or an elt-sample loop spec (default L_max)."""
        m = self.recipe.model
        schedule = self._schedule(loops)
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes: give at least one class id")
        if bad := [c for c in classes if not 0 <= c < m.num_classes]:
            raise ValueError(f"classes {bad}: the model has classes 0..{m.num_classes - 1}")
        if cfg < 0:
            raise ValueError(f"cfg={cfg}: must be >= 0 (1 = no guidance)")
        if output not in ("uint8", "pil"):
            raise ValueError(f"output={output!r}: 'uint8' or 'pil'")
        from .sample import sample_set
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            s = sample_set(self.model, self.recipe, schedule, len(classes), self.decoder(), cfg, steps, sampler, seed,
                           batch_size, progress=False, temperature=temperature, classes=classes)
        return s.images if output == "uint8" else to_pil(s.images)

    def _schedule(self, loops):
        if loops is None:
            loops = self.recipe.model.loops
        if isinstance(loops, int) and loops < 1:
            raise ValueError(f"loops={loops}: must be >= 1")
        return parse_loops(loops, self.recipe.model.loops)


def holds_ema(path: Path, tag: str | None) -> bool:
    """Whether a run directory's checkpoint keeps an EMA, or an export / saved folder holds EMA weights."""
    from safetensors import safe_open
    from .engine.export import has_ema
    if (path / "recipe.yaml").is_file():
        return has_ema(path, tag)
    with safe_open(str(path / HF_WEIGHTS if path.is_dir() else path), framework="pt") as f:
        return (f.metadata() or {}).get("ema") == "true"


def to_pil(images: np.ndarray) -> list:
    from PIL import Image
    if images.ndim == 4:
        return [Image.fromarray(x) for x in images]
    return [[Image.fromarray(f) for f in video] for video in images]
