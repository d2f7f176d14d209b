"""Recipes: pydantic models loaded from YAML, with dotted `key.sub=value` overrides.

Every value is checked before any work starts; an error is one line naming the file, the key, the value and
what is allowed. YAML goes through `safe_load` and overrides are parsed as YAML scalars/lists, never evaluated.
Fields are strict (no 'true' -> 1, no 2.5 -> 2); a `Field` description, where there is one, is the hint an
out-of-range error gives after the bounds.
"""
from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .files import atomic_write_text
from .loopspec import parse_loop_list


class RecipeError(ValueError):
    """A recipe or override is wrong; the message names the key."""


def _check(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"{key}={value!r} is out of range; allowed: {allowed}")


# YAML 1.1 reads '1e-4' (no dot) as a string; numbers are fine where a string is asked for ('run.name=123')
Float = Annotated[float, BeforeValidator(lambda v: _number(v) if isinstance(v, str) else v)]
Str = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) in (int, float) else v)]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RunConfig(Section):
    # no '..', no leading '.': a plain directory name; the description is what an error says is allowed
    name: Str = Field("run", pattern=r"^[A-Za-z0-9_](?:\.?[A-Za-z0-9_-])*\.?$",
                      description="letters, digits, '_', '-', '.' (it names a directory under run.out_dir)")
    out_dir: Str = "runs"
    seed: int = 0


class DataConfig(Section):
    shards: Str = ""                  # directory or http(s) URL with manifest.json, a brace pattern, or pipe:CMD
    split: Str = "train"
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(0, ge=0)
    strict: bool = False              # corrupt shard / unexpected member: fatal (True) or skipped and counted
    allow_pipe: bool = False          # let data.shards be a `pipe:` command (webdataset), e.g. for s3:// or gs://
    io_timeout_s: Float = Field(60, gt=0)   # a remote read that receives no byte this long is a stall (retried)
    # transport faults of one shard are retried this long, then exit 69
    io_retry_s: Float = Field(600, ge=0, description="0 = no retries")


class ModelConfig(Section):
    family: Literal["masked", "diffusion"] = "masked"
    width: int = Field(64, ge=1)
    heads: int = Field(4, ge=1)
    unique_layers: int = Field(2, ge=1)   # N
    loops: int = Field(4, ge=1)       # L_max
    mlp_ratio: Float = 4.0
    grid: list[Annotated[int, Field(gt=0)]] = Field(     # [H, W] or [T, H, W] token/latent grid
        default_factory=lambda: [8, 8], min_length=2, max_length=3,
        description="[H, W] or [T, H, W] of positive integers")
    channels: int = 1                 # latent channels (diffusion)
    patch_size: int = Field(1, ge=1)  # spatial patch (diffusion)
    temporal_patch: int = Field(1, ge=1)   # temporal patch (diffusion video)
    vocab_size: int = Field(17, ge=2)  # codebook size (masked)
    num_classes: int = Field(10, ge=1)
    class_dropout: Float = Field(0.1, ge=0, lt=1)   # label drop for classifier-free guidance


class ObjectiveConfig(Section):
    label_smoothing: Float = 0.0      # masked CE
    noise_shift: Float = 1.0          # shifted-cosine schedule: SNR scaled by 1/shift**2 (diffusion)
    sigmoid_bias: Float = 0.0         # sigmoid loss weighting bias b in sigmoid(b - logSNR) (diffusion)


class IlsdConfig(Section):
    enabled: bool = True
    min_loops: int = 1                # 1 .. model.loops-1 when enabled (checked across fields, below)
    lambda_start: Float = Field(1.0, ge=0, le=1)
    lambda_end: Float = Field(0.0, ge=0, le=1)
    lambda_steps: int = Field(0, ge=0, description="0 = train.steps")


class TrainConfig(Section):
    steps: int = Field(300, ge=1)
    micro_batch: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    global_batch: int = Field(0, ge=0, description="0 = not checked")   # else must equal micro_batch*grad_accum*world
    lr: Float = Field(1e-3, gt=0)
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: Float = 0.01
    betas: list[Annotated[Float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.9, 0.99], min_length=2, max_length=2, description="[b1, b2] in [0, 1)")
    grad_clip: Float = 1.0
    bf16: bool = True                 # used only where the device supports it
    checkpointing: Literal["none", "loop", "layer"] = "none"
    log_every: int = Field(10, ge=1)
    save_every: int = Field(100, ge=0, description="0 = only at the end")
    keep_last: int = Field(2, ge=1)
    resume: Str = "auto"              # auto | never (refuses to overwrite a checkpoint) | PATH
    ema_decay: Float = Field(0.0, ge=0, lt=1, description="0 = off")
    max_bad_steps: int = Field(5, ge=1)
    compile: bool = False
    # a collective waiting longer for a peer fails (the job restarts); at least data.io_retry_s + io_timeout_s
    collective_timeout_s: Float = Field(600, gt=0)
    watchdog_factor: Float = Field(20, ge=0)      # a step slower than this x the median step exits the rank (0 = off)
    watchdog_min_s: Float = Field(180, ge=0)      # ... but never before this many seconds
    watchdog_first_s: Float = Field(1800, ge=0)   # the first step's allowance (compilation, warm-up)
    heartbeat_timeout_s: Float = 30   # a rank silent this long ends the job on every rank (0 = off)
    # a start-up wait (rendezvous, DeepSpeed's ops and engine) longer than this exits 124 (0 = unbounded)
    startup_timeout_s: Float = Field(1800, ge=0)
    # a torch extension lock that predates the start, in a directory quiet this long, is a dead process's
    stale_lock_s: Float = Field(300, gt=0)
    # ranks waiting for one rank's solo work (a checkpoint conversion, reference statistics) give up after this
    solo_timeout_s: Float = Field(3600, gt=0)


class DeepSpeedConfig(Section):
    zero_stage: int = 0               # not Literal[0, 1, 2, 3]: pydantic's Literal takes true for 1
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict = Field(default_factory=dict)   # merged verbatim into the generated DeepSpeed config


class LoggingConfig(Section):
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"  # opt in; WANDB_MODE env overrides
    wandb_project: Str = "elt-scale"
    peak_tflops: Float = 0.0          # per device, for MFU; 0 = not reported


class EvalConfig(Section):
    """In-training any-time evaluation (elt_scale/engine/live_eval.py): the same classes and seeds at every L."""
    every: int = Field(0, ge=0, description="0 = off")   # steps between evaluations
    loops: Str = ""                   # loop specs as for elt-sample --loops; "" = 1..model.loops
    num: int = Field(16, ge=1)        # samples per loop spec
    classes: list[int] = Field(default_factory=list)   # sample i gets classes[i % len]; [] = i % model.num_classes
    seed: int = 0
    cfg: Float = Field(1.0, ge=0, description="1 = no guidance")   # classifier-free guidance scale
    steps: int = Field(0, ge=0, description="0 = the sampler's default")   # as elt-sample --steps
    sampler: Literal["ddpm", "ddim"] = "ddim"     # diffusion only
    batch_size: int = Field(64, ge=1)
    reference: Str = ""               # FID reference (ADM .npz or shards dir), with inception_weights
    inception_weights: Str = ""       # local Inception file (elt-eval fid --inception-weights)
    # a failed evaluation is a line and a metrics row; this many in a row switch evaluation off for the attempt
    max_failures: int = Field(3, ge=1)


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    ilsd: IlsdConfig = Field(default_factory=IlsdConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw):     # `train:` with nothing under it is the defaults
        return {k: {} if v is None else v for k, v in raw.items()} if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _across_fields(self):
        """What one field's type and bounds cannot say."""
        m, i, t, d, e = self.model, self.ilsd, self.train, self.deepspeed, self.eval
        _check(m.width % m.heads == 0, "model.width", m.width, f"a positive multiple of model.heads ({m.heads})")
        _check(all(g % m.patch_size == 0 for g in m.grid[-2:]), "model.patch_size", m.patch_size,
               f"a divisor of the spatial grid {m.grid[-2:]}")
        _check(len(m.grid) == 2 or m.grid[0] % m.temporal_patch == 0, "model.temporal_patch", m.temporal_patch,
               "a divisor of the temporal grid")
        if i.enabled:
            _check(m.loops >= 2, "model.loops", m.loops, ">= 2 when ilsd.enabled (the student needs L_int < L_max)")
            _check(1 <= i.min_loops < m.loops, "ilsd.min_loops", i.min_loops, f"1 .. model.loops-1 = {m.loops - 1}")
        _check(t.heartbeat_timeout_s == 0 or t.heartbeat_timeout_s >= 3, "train.heartbeat_timeout_s",
               t.heartbeat_timeout_s, "0 (off) or >= 3 (ranks beat every second)")
        _check(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", d.zero_stage, "0, 1, 2, 3")
        # DeepSpeed documents these for those stages only and quietly ignores them at the others
        _check(not d.offload_optimizer or d.zero_stage >= 1, "deepspeed.offload_optimizer", d.offload_optimizer,
               "false at deepspeed.zero_stage=0 (ZeRO-Offload needs stage 1, 2 or 3)")
        _check(not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params", d.offload_params,
               f"false at deepspeed.zero_stage={d.zero_stage} (parameters are partitioned, so offloadable, only "
               "at stage 3)")
        _check(all(0 <= c < m.num_classes for c in e.classes), "eval.classes", e.classes,
               f"class ids in 0..{m.num_classes - 1}")
        _check(bool(e.reference) == bool(e.inception_weights), "eval.reference", e.reference,
               "set together with eval.inception_weights (FID needs both), or neither")
        try:
            parse_loop_list(e.loops or f"1-{m.loops}", m.loops)
        except ValueError as err:
            raise RecipeError(f"eval.loops={e.loops!r}: {err}") from None
        return self


# ---------------------------------------------------------------------------------------------
# loading

def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """YAML recipe (or defaults when path is None) + `a.b=value` overrides -> validated Recipe."""
    if path is None:
        return recipe_from_yaml("", overrides, where="")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    return recipe_from_yaml(text, overrides, where=str(path))


def recipe_from_yaml(text: str, overrides: list[str] | tuple[str, ...] = (), where: str = "recipe") -> Recipe:
    """The same from YAML text (e.g. the recipe stored in an export's metadata); `where` names it in errors:
    after the key's message ('train.steps=0 is out of range; allowed: >= 1; in recipes/x.yaml')."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{where or 'recipe'}: not a plain YAML recipe ({e})") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: top level must be a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:   # the first problem, unknown keys before the rest, as one line
        first = min(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise RecipeError(explain(first) + (f"; in {where}" if where else "")) from None


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
        node[p] = {} if node.get(p) is None else node[p]     # `train:` left empty in the YAML is a section
        node = node[p]
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
    section, _, name = key.rpartition(".")
    near = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean {section + '.' if section else ''}{near[0]}?)" if near else ""
    return f"unknown key {key} in {where}{hint}; allowed: {', '.join(allowed)}"


EXPECTED = {"int": "an integer", "bool": "true or false", "float": "a number", "string": "a string",
            "list": "a list like [1, 2]", "dict": "a mapping", "model": "a mapping"}
OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "string_pattern_mismatch"}


def explain(err: dict) -> str:
    """One pydantic error -> 'train.betas[1]='x': expected a number' (key, value, what is allowed)."""
    if err["type"] == "value_error" and isinstance(err["ctx"]["error"], RecipeError):
        return str(err["ctx"]["error"])         # a check across fields, worded where it is made
    names = [p for p in err["loc"] if isinstance(p, str)]
    key = ".".join(names) + "".join(f"[{p}]" for p in err["loc"] if isinstance(p, int))
    owner, info = Recipe, None
    for name in names:                           # the model that holds the key, and the key's field
        owner = info.annotation if info else owner
        info = owner.model_fields.get(name)
    if err["type"] == "extra_forbidden":
        return unknown_key(key, ".".join(names[:-1]) or "the recipe", sorted(owner.model_fields))
    value, kind = err["input"], err["type"]
    if kind == "literal_error":
        return f"{key}={value!r}: allowed values are {', '.join(map(str, typing.get_args(info.annotation)))}"
    if kind in OUT_OF_RANGE:
        return f"{key}={value!r} is out of range; allowed: {allowed(info) or err['msg']}"
    expected = EXPECTED.get(kind.split("_")[0])
    return f"{key}={value!r}: " + (f"expected {expected}" if expected else err["msg"])


def allowed(info) -> str:
    """'>= 0 (0 = off)' from a field's bounds and description."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = " and ".join(f"{ops[k]} {getattr(m, k)}" for m in info.metadata for k in ops if hasattr(m, k))
    return f"{bounds} ({info.description})" if bounds and info.description else bounds or info.description or ""


def recipe_to_dict(r: Recipe) -> dict:
    return r.model_dump()


def save_recipe(r: Recipe, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(recipe_to_dict(r), sort_keys=False))
