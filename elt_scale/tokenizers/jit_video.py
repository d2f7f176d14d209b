"""A discrete video tokenizer exported to TorchScript (`--tokenizer jit`), in the convention of NVIDIA's
Cosmos discrete video tokenizers (nvidia/Cosmos-0.1-Tokenizer-DV4x8x8 ships `encoder.jit` / `decoder.jit`):

    encoder(video (B, 3, T, H, W) in [-1, 1]) -> indices (B, T', H', W'), or a tuple that starts with them
                                                 (Cosmos DV returns (indices, codes, ...))
    decoder(indices (B, T', H', W'))          -> video (B, 3, T, H, W) in [-1, 1] (or a tuple starting with it)

with causal temporal compression t and spatial compression s: T' = 1 + (T - 1) / t, H' = H / s, W' = W / s.
A MAGVIT-style tokenizer exported to TorchScript can follow the same convention.

TorchScript archives say nothing about their codebook or compression, so they come from `config.json`
beside the two files or from flags (which win):

    {"vocab_size": 64000, "compression": [4, 8, 8], "precision": "bf16"}
    ("levels": [8, 8, 8, 5, 5, 5] instead of vocab_size: an FSQ codebook of their product; "compression"
     may also be written "4x8x8"; "precision" is optional: auto | fp32 | bf16 | fp16)

`path` is a local directory (torch.jit.load reads files; download a hub snapshot first, e.g.
`huggingface-cli download nvidia/Cosmos-0.1-Tokenizer-DV4x8x8 --local-dir DIR`). The encoder is loaded only
to encode and the decoder only to decode, so sampling never reads encoder.jit."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .common import resolve_device, resolve_precision

CONFIG = "config.json"
ENCODER, DECODER = "encoder.jit", "decoder.jit"
INDEX_DTYPES = {"int32": torch.int32, "int64": torch.int64}


def parse_compression(value, where: str) -> tuple[int, int]:
    """[t, s, s] or "txsxs" (Cosmos names itself DV4x8x8) -> (temporal, spatial)."""
    parts = value.lower().split("x") if isinstance(value, str) else value
    try:
        t, h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: compression {value!r}; expected TxSxS such as 4x8x8 "
                         "(time x height x width)") from None
    if h != w or min(t, h) < 1:
        raise ValueError(f"{where}: compression {value!r}; expected positive TxSxS with equal spatial factors")
    return t, h


def read_config(directory: Path) -> dict:
    """The keys this module reads, from config.json if there is one. A config.json written for another
    loader (Cosmos' hub folders hold a small one) is not an error: flags can give what it lacks."""
    path = directory / CONFIG
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def config_vocab(cfg: dict, where: Path) -> int | None:
    try:
        if "vocab_size" in cfg:
            return int(cfg["vocab_size"])
        if "levels" in cfg:                              # FSQ: every combination of levels is a code
            return int(math.prod(int(v) for v in cfg["levels"]))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: vocab_size must be an integer, levels a list of integers") from None
    return None


def allowed_lengths(temporal: int, near: int, count: int = 6) -> list[int]:
    """Clip lengths 1 + k·t around `near` (the ones a causal tokenizer takes)."""
    k = max(0, (near - 1) // temporal - count // 2)
    return [1 + (k + i) * temporal for i in range(count)]


def load_jit(path: Path, device: torch.device, dtype: torch.dtype):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; --tokenizer jit needs {ENCODER} and {DECODER} in "
                                f"--tokenizer-path")
    with warnings.catch_warnings():     # torch >= 2.9 marks torch.jit deprecated; TorchScript is the format
        warnings.simplefilter("ignore", DeprecationWarning)      # the public weights ship in
        try:
            model = torch.jit.load(str(path), map_location=device)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a TorchScript archive ({str(e).splitlines()[0]})") from None
    return model.to(dtype).eval()


def first_tensor(out, what: str) -> torch.Tensor:
    """The module's output, or the first item of the tuple it returns (Cosmos: (indices, codes, ...))."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{what} returned {type(out).__name__}; expected a tensor or a tuple starting with one")
    return out


class JitVideoTokenizer:
    name = "jit"
    kind = "codes"
    scaling_factor = 1.0
    video_native = True

    def __init__(self, path: str = "", vocab_size: int | None = None, compression=None,
                 device: str | None = None, precision: str = "auto", index_dtype: str | None = None, **_):
        if not path:
            raise ValueError("--tokenizer jit needs --tokenizer-path DIR (a directory with encoder.jit, decoder.jit)")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--tokenizer-path {path}: not a local directory; --tokenizer jit loads "
                                    f"{ENCODER}/{DECODER} from disk (download a hub snapshot first)")
        self.dir = Path(path).resolve()
        self.path = str(self.dir)
        cfg = read_config(self.dir)
        where = self.dir / CONFIG
        vocab = vocab_size or config_vocab(cfg, where)
        if not vocab:
            raise ValueError(f"{self.dir}: no codebook size (vocab_size or FSQ levels in {CONFIG}); pass "
                             "--vocab-size N (Cosmos DV: 64000 = FSQ levels 8,8,8,5,5,5)")
        comp = compression or cfg.get("compression")
        if comp is None:
            raise ValueError(f"{self.dir}: no compression (in {CONFIG}); pass --compression TxSxS "
                             "(Cosmos DV4x8x8: 4x8x8)")
        self.vocab_size = int(vocab)
        self.temporal, self.spatial = parse_compression(comp, "--compression" if compression else str(where))
        # int16 holds a 1024-code book; Cosmos' 64,000 FSQ codes need int32
        self.dtype = np.int16 if self.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32
        self.device = resolve_device(device)
        wanted = cfg.get("precision", "auto") if precision == "auto" else precision
        self.compute_dtype = resolve_precision(wanted, self.device)
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute_dtype]
        if index_dtype is not None and index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype {index_dtype!r}; allowed: {', '.join(INDEX_DTYPES)}")
        self.index_dtype = index_dtype          # what the encoder emits, fed back to the decoder as such
        self._encoder = self._decoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_jit(self.dir / ENCODER, self.device, self.compute_dtype)
        return self._encoder

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = load_jit(self.dir / DECODER, self.device, self.compute_dtype)
        return self._decoder

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": self.path, "vocab_size": self.vocab_size,
                "compression": [self.temporal, self.spatial, self.spatial], "precision": self.precision,
                "index_dtype": self.index_dtype or "int64"}

    def latent_grid(self, grid: list[int]) -> list[int]:
        """[T, H, W] of a clip -> [T', H', W'] of its codes; a clip the tokenizer cannot take is an error
        naming the lengths (or sides) it can."""
        if len(grid) != 3:
            raise ValueError(f"--tokenizer jit is a video tokenizer; the source gives images {grid} "
                             "(use --source ucf101)")
        t, h, w = grid
        tc, s = self.temporal, self.spatial
        if (t - 1) % tc:
            raise ValueError(f"{self.path} (compression {tc}x{s}x{s}) takes clips of 1 + {tc}k frames "
                             f"({', '.join(map(str, allowed_lengths(tc, t)))}, ...), not {t}; set --frames")
        if h % s or w % s:
            raise ValueError(f"{self.path} (compression {tc}x{s}x{s}) needs sides divisible by {s}, "
                             f"not {h}x{w}; set --resolution")
        return [1 + (t - 1) // tc, h // s, w // s]

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        """Encodes one blank clip: checks the length and that the encoder's output matches the stated
        compression, and learns the index dtype the decoder is fed later."""
        expect = self.latent_grid(grid)
        got = list(self.encode(torch.zeros(1, channels, *grid)).shape[1:])
        if got != expect:
            raise ValueError(f"{self.dir / ENCODER} turned a {grid[0]}x{grid[1]}x{grid[2]} clip into {got} codes, "
                             f"but compression {self.temporal}x{self.spatial}x{self.spatial} means {expect}: "
                             f"fix --compression or {CONFIG}")
        return got

    @torch.no_grad()
    def encode(self, videos: torch.Tensor, seeds=None) -> torch.Tensor:
        """(B, 3, T, H, W) in [0, 1] -> codes (B, T', H', W'), int16 (int32 for codebooks > 32768)."""
        if videos.ndim != 5:
            raise ValueError(f"--tokenizer jit encodes videos (B, 3, T, H, W), got shape {tuple(videos.shape)}")
        self.latent_grid(list(videos.shape[2:]))
        x = videos.to(self.device, self.compute_dtype) * 2 - 1
        idx = first_tensor(self.encoder(x), str(self.dir / ENCODER))
        if idx.is_floating_point() or idx.ndim != 4:
            raise ValueError(f"{self.dir / ENCODER} returned {idx.dtype} {tuple(idx.shape)}; expected integer "
                             "indices (B, T', H', W') first (the Cosmos discrete video convention)")
        self.index_dtype = self.index_dtype or str(idx.dtype).removeprefix("torch.")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{self.dir / ENCODER} emitted code {hi if hi >= self.vocab_size else lo}, outside "
                             f"0..{self.vocab_size - 1}: vocab_size {self.vocab_size} is wrong "
                             f"(--vocab-size or {CONFIG})")
        return idx.cpu().to(torch.int16 if self.dtype == np.int16 else torch.int32)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T', H', W') -> videos (B, 3, T, H, W) in [0, 1]."""
        idx = codes.to(self.device, INDEX_DTYPES.get(self.index_dtype or "int64", torch.int64))
        x = first_tensor(self.decoder(idx), str(self.dir / DECODER)).float()
        return ((x + 1) / 2).clamp(0, 1).cpu()
