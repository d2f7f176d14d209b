"""A trained ELT from Python, in three lines:

    from elt_scale import ELT
    model = ELT.from_pretrained("runs/digits_masked")          # or model.safetensors, a saved folder, a hub id
    images = model.generate(classes=[1, 7], loops=2, cfg=2.0, steps=12, seed=0)   # uint8 (2, H, W, 3)

`generate` goes through the same samplers, loop specs (`4`, `6>2`, `auto:0.02`, ...) and per-batch seeding
as `elt-sample` (elt_scale.inference), so the same seed, loops and cfg give the same images (with the same
batch size). `save_pretrained(folder)` writes the Hugging Face Hub layout through huggingface_hub's
ModelHubMixin: config.json (the recipe and the tokenizer that decodes samples) and model.safetensors (an
elt-export file), so `push_to_hub` and hub ids work as for any Hub model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

from .config import recipe_to_dict
from .inference.load import HF_CONFIG, HF_WEIGHTS, Loaded, load, recipe_yaml
from .inference.samples import sample_set
from .inference.weights import save_weights
from .sampling import parse_loops


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ELT(ModelHubMixin, library_name="elt-scale", tags=["elt", "looped-transformer", "image-generation"]):
    def __init__(self, loaded: Loaded, dtype: torch.dtype | None = None):
        self.loaded, self.model, self.recipe = loaded, loaded.model, loaded.recipe
        self.device = next(self.model.parameters()).device
        # bf16 on GPUs by default; the weights stay fp32 and autocast runs the matmuls in `dtype`
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._decoder = None

    @property
    def ema(self) -> bool:
        return self.loaded.ema

    # --- loading and saving --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, ckpt: str | None = None, ema: bool | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        revision: str | None = None) -> "ELT":
        """An elt-export .safetensors file, a run directory (checkpoint `ckpt`, default the latest; `ema`
        None = the EMA weights when the run keeps them), a save_pretrained folder, or a Hub id of one."""
        return cls(load(path, ema=ema, device=device or default_device(), tag=ckpt, revision=revision), dtype)

    def _save_pretrained(self, save_directory: Path) -> None:
        try:
            tokenizer = self.loaded.tokenizer_entry()
        except FileNotFoundError:             # nothing recorded and no shards: the folder cannot decode alone
            tokenizer = None
        save_weights(save_directory / HF_WEIGHTS, self.model.state_dict(), recipe_yaml(self.recipe), self.ema, tokenizer)
        config = {"recipe": recipe_to_dict(self.recipe), "tokenizer": tokenizer}
        (save_directory / HF_CONFIG).write_text(json.dumps(config, indent=2))

    # --- sampling ------------------------------------------------------------------------------------------
    def decoder(self):
        if self._decoder is None:
            self._decoder = self.loaded.decoder()
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


def to_pil(images: np.ndarray) -> list:
    from PIL import Image
    if images.ndim == 4:
        return [Image.fromarray(x) for x in images]
    return [[Image.fromarray(f) for f in video] for video in images]
