"""The one door to DeepSpeed's private internals. Everything here reads or writes attributes that DeepSpeed
does not document (ZeRO's per-parameter fragment mappings, ZeRO-3 partitions, optimizer flat groups);
they were read in DeepSpeed 0.19.8 and are tested with it. `check()` runs before any work: a DeepSpeed
outside the tested range, or one missing something used here, stops the run with one line.

Fragments: each rank owns a contiguous piece (start, values) of every flattened parameter's fp32 master:
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fragment DeepSpeed links to the parameter (`_hp_mapping`);
- ZeRO-3: this rank's partition [rank·P, rank·P + P) of the flattened, padded parameter;
- stage 0 (replicated fp32 weights, no master copy): a contiguous 1/world slice of each parameter."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ..dist import quiet_deepspeed
from ..files import is_write_error

TESTED = ((0, 19, 8), (0, 20, 0))       # [low, high): the versions these internals were read in
TESTED_TEXT = ">=0.19.8,<0.20"           # as pyproject.toml declares it

# what this module touches, checked at start-up: (module, attribute)
REQUIRED = (("deepspeed.utils", "safe_get_local_fp32_param"),
            ("deepspeed.utils.tensor_fragment", "map_to_flat_opt_states"),
            ("deepspeed.utils.zero_to_fp32", "get_fp32_state_dict_from_zero_checkpoint"),
            ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.update_lp_params"),
            ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state"),
            ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.checkpoint_event_prologue"),
            ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.checkpoint_event_epilogue"),
            ("deepspeed.runtime.engine", "DeepSpeedEngine._copy_recovery_script"),
            ("deepspeed.runtime.checkpoint_engine.checkpoint_engine", "CheckpointEngine.save"),
            ("deepspeed.runtime.checkpoint_engine.checkpoint_engine", "CheckpointEngine.makedirs"))


class DeepSpeedMismatch(RuntimeError):
    """The installed DeepSpeed is not one these internals were written against."""


def parse_version(text: str) -> tuple[int, int, int]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check(version: str | None = None) -> None:
    """Raise DeepSpeedMismatch (one line: what is installed, what is needed) unless the installed DeepSpeed
    is in the tested range and has every attribute used here."""
    import importlib

    quiet_deepspeed()
    import deepspeed
    version = version or deepspeed.__version__
    need = f"elt-scale needs deepspeed{TESTED_TEXT} (pip install 'deepspeed{TESTED_TEXT}')"
    if not TESTED[0] <= parse_version(version) < TESTED[1]:
        raise DeepSpeedMismatch(f"DeepSpeed {version} is installed; {need}")
    for module, attr in REQUIRED:
        obj = importlib.import_module(module)
        for name in attr.split("."):
            obj = getattr(obj, name, None)
        if obj is None:
            raise DeepSpeedMismatch(f"DeepSpeed {version} has no {module}.{attr}; {need}")


def build_cpu_ops() -> None:
    """JIT-build (or load from the torch extensions cache) the ops DeepSpeed compiles on a CPU machine: the
    shared-memory collectives and the CPU/fused Adam kernels, ~1-2 minutes once; `make setup` calls this so
    that the first training run does not sit at step 0 while a compiler runs."""
    quiet_deepspeed()
    from deepspeed.accelerator import get_accelerator
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            start = time.perf_counter()
            builder.load(verbose=False)
            print(f"DeepSpeed op {builder.NAME}: ready in {time.perf_counter() - start:.0f} s "
                  f"(built once, then loaded from ~/.cache/torch_extensions)", flush=True)


# --- parameters under ZeRO ---------------------------------------------------------------------------
def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's shape (ZeRO-3 leaves an empty placeholder on the module)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())


def fp32_fragment(param: torch.Tensor, rank: int, world: int) -> tuple[int, torch.Tensor] | None:
    """(start in the flattened param, live fp32 view or copy of this rank's fragment), or None if none."""
    if hasattr(param, "ds_id"):                                     # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param
        local = safe_get_local_fp32_param(param)
        start = rank * param.ds_tensor.ds_numel
        numel = max(0, min(param.ds_numel - start, local.numel()))
        return (start, local.view(-1)[:numel]) if numel else None
    if hasattr(param, "_hp_mapping"):                               # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)
    n = param.numel()                                               # stage 0: my 1/world slice
    chunk = -(-n // world)
    start = rank * chunk
    numel = max(0, min(chunk, n - start))
    return (start, param.detach().view(-1)[start:start + numel].float()) if numel else None


# --- saving -----------------------------------------------------------------------------------------------
# engine.save_checkpoint writes its files between barriers and ends with one: a write that raised on one
# rank (disk full, quota, EIO) would leave the others waiting there for the collective timeout. While it
# runs, its writers (torch.save through the checkpoint engine, makedirs, the copy of zero_to_fp32.py) keep
# their error and return, so every rank runs the same collectives; checkpoint.save agrees on the outcome.
SAVE_WRITERS = (("checkpoint_engine", "save"), ("checkpoint_engine", "makedirs"), (None, "_copy_recovery_script"))


@contextlib.contextmanager
def save_errors_kept(engine):
    """Yields the list that collects this rank's write errors during `engine.save_checkpoint`."""
    errors: list[Exception] = []
    patched = []
    for owner_name, attr in SAVE_WRITERS:
        owner = engine if owner_name is None else getattr(engine, owner_name)
        patched.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, _keeping(getattr(owner, attr), errors))
    try:
        yield errors
    finally:
        for owner, attr, own in patched:
            if own is None:
                delattr(owner, attr)          # the class's method shows through again
            else:
                setattr(owner, attr, own)


def _keeping(write, errors: list):
    def kept(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as e:     # torch.save reports a failed write as RuntimeError
            if not is_write_error(e):            # a bug, not a full disk: a crash, not exit 74
                raise
            errors.append(e)
    return kept


# --- optimizer state from per-parameter universal files (engine/universal.py) ------------------------------
def adam_step(opt, param, step: int):
    """Adam's step count as torch keeps it: a float32 scalar, on the parameter's device when fused/capturable."""
    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def load_zero3(opt, states: Path, step: int) -> None:
    """As DeepSpeed's ZeRO-3 universal load, but with the step from the files and our own param groups'
    hyperparameters kept: each rank's flat fp32 partition per sub-group is its parameters' partitions back to
    back, cut out of the full tensors by DeepSpeed's `load_hp_checkpoint_state`; Adam's state is created here
    (a fresh engine has none yet: torch's Adam creates it lazily). Bracketed like DeepSpeed's own load."""
    opt.checkpoint_event_prologue()
    for i, group in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[i]
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            parts = [opt.load_hp_checkpoint_state(str(states / opt.param_names[p]), key, param=p) for p in group]
            value = torch.cat([t.to(flat.device, flat.dtype) for t in parts])
            if key == "fp32":
                flat.data.copy_(value)
            else:
                opt.optimizer.state[flat][key] = value
        opt.optimizer.state[flat]["step"] = adam_step(opt.optimizer, flat, step)
        if flat.numel():                                  # the working (bf16/fp32) partitions too
            opt.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
    opt.checkpoint_event_epilogue()


def load_zero12(opt, states: Path, step: int) -> None:
    """DeepSpeed's universal load minus its global state and hyperparameters: each parameter's fragment of
    this rank's flat partition from the full tensors, then the flat Adam state assembled from the fragments
    (a fresh engine has none yet: torch's Adam creates it lazily)."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states
    for i, group in enumerate(opt.optimizer.param_groups):
        keys = set()
        for lp in opt.bit16_groups[i]:
            if lp._hp_mapping is not None:
                lp.load_hp_checkpoint_state(str(states / opt.param_names[lp]), 0, 1)
                keys.update(lp._hp_mapping.get_optim_state_keys())
        hp = group["params"][0]
        map_to_flat_opt_states(hp, opt.bit16_groups[i], opt.optimizer.state, keys)
        opt.optimizer.state[hp]["step"] = adam_step(opt.optimizer, hp, step)
    opt.update_lp_params()
