"""Recipes: typed dataclasses loaded from YAML, with dotted `key.sub=value` overrides.

Every value is checked before any work starts; an error names the key and what is allowed.
YAML goes through `safe_load` and overrides are parsed as YAML scalars/lists, never evaluated.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .files import atomic_write_text
from .loopspec import parse_loop_list


class RecipeError(ValueError):
    """A recipe or override is wrong; the message names the key."""


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0


@dataclass
class DataConfig:
    shards: str = ""                  # directory or http(s) URL with manifest.json, a brace pattern, or pipe:CMD
    split: str = "train"
    shuffle_buffer: int = 1000
    num_workers: int = 0
    strict: bool = False              # corrupt shard / unexpected member: fatal (True) or skipped and counted
    allow_pipe: bool = False          # let data.shards be a `pipe:` command (webdataset), e.g. for s3:// or gs://
    io_timeout_s: float = 60          # a remote read that receives no byte this long is a stall (retried)
    io_retry_s: float = 600           # transport faults of one shard are retried this long, then exit 69


@dataclass
class ModelConfig:
    family: Literal["masked", "diffusion"] = "masked"
    width: int = 64
    heads: int = 4
    unique_layers: int = 2            # N
    loops: int = 4                    # L_max
    mlp_ratio: float = 4.0
    grid: list = field(default_factory=lambda: [8, 8])   # [H, W] or [T, H, W] token/latent grid
    channels: int = 1                 # latent channels (diffusion)
    patch_size: int = 1               # spatial patch (diffusion)
    temporal_patch: int = 1           # temporal patch (diffusion video)
    vocab_size: int = 17              # codebook size (masked)
    num_classes: int = 10
    class_dropout: float = 0.1        # label drop for classifier-free guidance


@dataclass
class ObjectiveConfig:
    label_smoothing: float = 0.0      # masked CE
    noise_shift: float = 1.0          # shifted-cosine schedule: SNR scaled by 1/shift**2 (diffusion)
    sigmoid_bias: float = 0.0         # sigmoid loss weighting bias b in sigmoid(b - logSNR) (diffusion)


@dataclass
class IlsdConfig:
    enabled: bool = True
    min_loops: int = 1
    lambda_start: float = 1.0
    lambda_end: float = 0.0
    lambda_steps: int = 0             # 0 means train.steps


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch: int = 32
    grad_accum: int = 1
    global_batch: int = 0             # 0: not checked; else must equal micro_batch*grad_accum*world
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    bf16: bool = True                 # used only where the device supports it
    checkpointing: Literal["none", "loop", "layer"] = "none"
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    resume: str = "auto"              # auto | never (refuses to overwrite a checkpoint) | PATH
    ema_decay: float = 0.0
    max_bad_steps: int = 5
    compile: bool = False
    collective_timeout_s: float = 600  # a collective waiting longer for a peer fails (the job restarts); at least data.io_retry_s + io_timeout_s
    watchdog_factor: float = 20       # a step slower than this x the median step exits the rank (0 = off)
    watchdog_min_s: float = 180       # ... but never before this many seconds
    watchdog_first_s: float = 1800    # the first step's allowance (compilation, warm-up)
    heartbeat_timeout_s: float = 30   # a rank silent this long ends the job on every rank (0 = off)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict = field(default_factory=dict)   # merged verbatim into the generated DeepSpeed config


@dataclass
class LoggingConfig:
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"  # opt in; WANDB_MODE env overrides
    wandb_project: str = "elt-scale"
    peak_tflops: float = 0.0          # per device, for MFU; 0 = not reported


@dataclass
class EvalConfig:
    """In-training any-time evaluation (elt_scale/engine/live_eval.py): the same classes and seeds at every L."""
    every: int = 0                    # steps between evaluations; 0 = off
    loops: str = ""                   # loop specs as for elt-sample --loops; "" = 1..model.loops
    num: int = 16                     # samples per loop spec
    classes: list = field(default_factory=list)   # sample i gets classes[i % len]; [] = i % model.num_classes
    seed: int = 0
    cfg: float = 1.0                  # classifier-free guidance scale (1 = off)
    steps: int = 0                    # sampling steps; 0 = the sampler's default (elt-sample --steps)
    sampler: Literal["ddpm", "ddim"] = "ddim"     # diffusion only
    batch_size: int = 64
    reference: str = ""               # FID reference (ADM .npz or shards dir), with inception_weights
    inception_weights: str = ""       # local Inception file (elt-eval fid --inception-weights)


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ilsd: IlsdConfig = field(default_factory=IlsdConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------------------------------------
# loading

def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """YAML recipe (or defaults when path is None) + `a.b=value` overrides -> validated Recipe."""
    if path is None:
        return recipe_from_yaml("", overrides)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    return recipe_from_yaml(text, overrides, where=str(path))


def recipe_from_yaml(text: str, overrides: list[str] | tuple[str, ...] = (), where: str = "recipe") -> Recipe:
    """The same from YAML text (e.g. the recipe stored in an export's metadata); `where` names it in errors."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not a plain YAML recipe ({e})") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: top level must be a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    try:  # YAML scalars and flow lists only: '3', '1e-4', 'true', '[1, 2]'; anything else stays a string
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, dict):
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    """`extra` over a copy of `base`: dicts merged key by key, anything else replaced (deepspeed.extra over the
    DeepSpeed config the trainer makes)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unknown_key(key: str, where: str, allowed: list[str]) -> str:
    """'unknown key train.stpes in train (did you mean train.steps?); allowed: ...'."""
    import difflib
    section, _, name = key.rpartition(".")
    near = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean {section + '.' if section else ''}{near[0]}?)" if near else ""
    return f"unknown key {key} in {where}{hint}; allowed: {', '.join(allowed)}"


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(unknown_key(f"{prefix}{unknown[0]}", prefix.rstrip(".") or "the recipe", sorted(fields)))
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp, value, key):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{key}={value!r}: allowed values are {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecipeError(f"{key}={value!r}: expected a string")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}={value!r}: expected a list like [1, 2]")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}={value!r}: expected a mapping")
        return value
    return value


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"{key}={value!r} is out of range; allowed: {allowed}")


_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def validate(r: Recipe) -> None:
    m, t, i = r.model, r.train, r.ilsd
    _check(bool(_RUN_NAME.fullmatch(r.run.name)) and ".." not in r.run.name, "run.name", r.run.name,
           "letters, digits, '_', '-', '.' (it names a directory under run.out_dir)")
    _check(m.width > 0 and m.heads > 0 and m.width % m.heads == 0, "model.width", m.width,
           f"a positive multiple of model.heads ({m.heads})")
    _check(m.unique_layers >= 1, "model.unique_layers", m.unique_layers, ">= 1")
    _check(m.loops >= 1, "model.loops", m.loops, ">= 1")
    _check(len(m.grid) in (2, 3) and all(isinstance(g, int) and g > 0 for g in m.grid),
           "model.grid", m.grid, "[H, W] or [T, H, W] of positive integers")
    _check(m.vocab_size >= 2, "model.vocab_size", m.vocab_size, ">= 2")
    _check(m.num_classes >= 1, "model.num_classes", m.num_classes, ">= 1")
    _check(0.0 <= m.class_dropout < 1.0, "model.class_dropout", m.class_dropout, "0 <= p < 1")
    _check(m.patch_size >= 1 and all(g % m.patch_size == 0 for g in m.grid[-2:]), "model.patch_size",
           m.patch_size, f"a divisor of the spatial grid {m.grid[-2:]}")
    _check(m.temporal_patch >= 1 and (len(m.grid) == 2 or m.grid[0] % m.temporal_patch == 0),
           "model.temporal_patch", m.temporal_patch, "a divisor of the temporal grid")
    if i.enabled:
        _check(m.loops >= 2, "model.loops", m.loops, ">= 2 when ilsd.enabled (the student needs L_int < L_max)")
        _check(1 <= i.min_loops < m.loops, "ilsd.min_loops", i.min_loops, f"1 .. model.loops-1 = {m.loops - 1}")
    for key in ("lambda_start", "lambda_end"):
        v = getattr(i, key)
        _check(0.0 <= v <= 1.0, f"ilsd.{key}", v, "0 .. 1")
    _check(i.lambda_steps >= 0, "ilsd.lambda_steps", i.lambda_steps, ">= 0 (0 = train.steps)")
    _check(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _check(t.micro_batch >= 1, "train.micro_batch", t.micro_batch, ">= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _check(t.global_batch >= 0, "train.global_batch", t.global_batch, ">= 0 (0 = not checked)")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "0 .. 1")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", t.betas, "[b1, b2] in [0, 1)")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _check(t.save_every >= 0, "train.save_every", t.save_every, ">= 0 (0 = only at the end)")
    _check(t.keep_last >= 1, "train.keep_last", t.keep_last, ">= 1")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "0 (off) .. <1")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, ">= 1")
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s", t.collective_timeout_s, "> 0")
    for key in ("watchdog_factor", "watchdog_min_s", "watchdog_first_s"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), ">= 0")
    _check(t.heartbeat_timeout_s == 0 or t.heartbeat_timeout_s >= 3, "train.heartbeat_timeout_s",
           t.heartbeat_timeout_s, "0 (off) or >= 3 (ranks beat every second)")
    d = r.deepspeed
    _check(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", d.zero_stage, "0, 1, 2, 3")
    # DeepSpeed documents these for those stages only and quietly ignores them at the others
    _check(not d.offload_optimizer or d.zero_stage >= 1, "deepspeed.offload_optimizer", d.offload_optimizer,
           "false at deepspeed.zero_stage=0 (ZeRO-Offload needs stage 1, 2 or 3)")
    _check(not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params", d.offload_params,
           f"false at deepspeed.zero_stage={d.zero_stage} (parameters are partitioned, so offloadable, only at stage 3)")
    _check(r.data.shuffle_buffer >= 0, "data.shuffle_buffer", r.data.shuffle_buffer, ">= 0")
    _check(r.data.num_workers >= 0, "data.num_workers", r.data.num_workers, ">= 0")
    _check(r.data.io_timeout_s > 0, "data.io_timeout_s", r.data.io_timeout_s, "> 0")
    _check(r.data.io_retry_s >= 0, "data.io_retry_s", r.data.io_retry_s, ">= 0 (0 = no retries)")
    validate_eval(r)


def validate_eval(r: Recipe) -> None:
    e, n = r.eval, r.model.num_classes
    _check(e.every >= 0, "eval.every", e.every, ">= 0 (0 = off)")
    _check(e.num >= 1, "eval.num", e.num, ">= 1")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(e.steps >= 0, "eval.steps", e.steps, ">= 0 (0 = the sampler's default)")
    _check(e.cfg >= 0, "eval.cfg", e.cfg, ">= 0 (1 = no guidance)")
    _check(all(isinstance(c, int) and 0 <= c < n for c in e.classes), "eval.classes", e.classes,
           f"class ids in 0..{n - 1}")
    _check(bool(e.reference) == bool(e.inception_weights), "eval.reference", e.reference,
           "set together with eval.inception_weights (FID needs both), or neither")
    try:
        parse_loop_list(e.loops or f"1-{r.model.loops}", r.model.loops)
    except ValueError as err:
        raise RecipeError(f"eval.loops={e.loops!r}: {err}") from None


def recipe_to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def save_recipe(r: Recipe, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(recipe_to_dict(r), sort_keys=False))
