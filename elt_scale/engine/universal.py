"""Resume on another layout (world size or ZeRO stage) with Adam's moments and step counts kept.

A checkpoint saved under another layout is first converted by DeepSpeed's `ds_to_universal` into one
fp32 / exp_avg / exp_avg_sq (/ step) file per parameter, cached beside the original:

    <run>/ckpt/step_00001000/universal/{zero/<param name>/*.pt, zero/optimizer_state.pt, *model_states.pt}

Then, with this DeepSpeed (0.19.8):
  - ZeRO-1/2 -> ZeRO-1/2 on another world size: DeepSpeed's own universal load (`checkpoint.load_universal`).
  - every other change (ZeRO-1/2 <-> ZeRO-3, ZeRO-3 -> ZeRO-3 on another world size, or to stage 0): our own
    per-parameter load into the engine's partitions, by name. DeepSpeed's ZeRO-3 universal load reads the step
    from a ZeRO-3 global optimizer state (absent when the source was ZeRO-1/2) and copies the first param
    group's hyperparameters into every group (our no-decay group would get weight decay); its ZeRO-1/2 load
    wants a ZeRO-1/2 global state.
A stage-0 checkpoint holds no ZeRO shards to convert, and bf16 at stage 0 wraps the optimizer in DeepSpeed's
BF16_Optimizer, which we do not load into: there the moments restart (stderr says so).
Trusted input: the per-parameter files are unpickled."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..inference.weights import read_client
from .ds_config import merge
from .ds_internals import adam_step, load_zero3, load_zero12

UNIVERSAL = "universal"
DEEPSPEED_LOAD = "DeepSpeed universal checkpoint"
OWN_LOAD = "own per-parameter load"
RESTARTED = "nothing: stage-0 checkpoint, Adam moments restart"
RESTARTED_BF16 = "nothing: bf16 at stage 0 (DeepSpeed's BF16_Optimizer), Adam moments restart"


def source_stage(resume_from: Path) -> int:
    return read_client(resume_from)["zero_stage"]


def deepspeed_loads(source: int, target: int) -> bool:
    """Where DeepSpeed's universal load works with this DeepSpeed (see the module docstring)."""
    return source in (1, 2) and target in (1, 2)


def universal_config(ds_config: dict, resume_from: Path, zero_stage: int) -> dict:
    """The DeepSpeed config for a cross-layout resume: `load_universal` where DeepSpeed loads it itself."""
    if deepspeed_loads(source_stage(resume_from), zero_stage):
        return merge(ds_config, {"checkpoint": {"load_universal": True}})
    return ds_config


def convert(folder: Path) -> Path:
    """`folder`/universal, converted once by rank 0 (the others wait, and fail with it rather than hang);
    written under a temporary name and renamed, so a folder of that name is complete and reused later."""
    out, error = Path(folder) / UNIVERSAL, None
    if dist.get_rank() == 0 and not out.exists():
        try:
            run_ds_to_universal(Path(folder), out)
        except Exception as e:            # noqa: BLE001 -- re-raised below, after telling the other ranks
            error = e
    failed = [error is not None]
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0]:
        raise RuntimeError(f"rank 0 could not convert {folder} to a universal checkpoint (see its log)")
    return out


def run_ds_to_universal(folder: Path, out: Path) -> None:
    for stale in folder.glob(f".{UNIVERSAL}.tmp*"):                # from a conversion killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".{UNIVERSAL}.tmp{os.getpid()}"
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                        "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", workers,
                        "--num_merge_workers", workers], capture_output=True, text=True)
    (folder / "latest_universal").unlink(missing_ok=True)          # its pointer names the temporary folder
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {folder}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    as_zero12_files(tmp / "zero", read_client(folder).get("model_shapes") or {})
    os.replace(tmp, out)


def as_zero12_files(states: Path, shapes: dict) -> None:
    """A ZeRO-3 conversion stores each state as a bare flat tensor, a ZeRO-1/2 one as {"param": tensor} in the
    parameter's shape, which is all DeepSpeed's ZeRO-1/2 per-parameter reader (and ZeRO-3's) understands."""
    for name, shape in shapes.items():
        for f in (states / name).glob("*.pt"):
            t = torch.load(f, map_location="cpu", weights_only=False)
            if torch.is_tensor(t) and f.stem != "step":
                torch.save({"param": t.view(shape)}, f)


def load(engine, resume_from: Path, zero_stage: int) -> str:
    """Collective, after `deepspeed.initialize` (with `universal_config`) and the consolidated weights:
    fp32 master weights, Adam moments and step counts of a checkpoint saved under another layout. Returns how."""
    source = source_stage(resume_from)
    if source == 0:
        return RESTARTED
    if zero_stage == 0 and engine.bfloat16_enabled():
        return RESTARTED_BF16
    folder = convert(resume_from)
    if deepspeed_loads(source, zero_stage):
        path, _ = engine.load_checkpoint(str(resume_from), tag=UNIVERSAL)
        if path is None:
            raise FileNotFoundError(f"{folder}: DeepSpeed could not load this universal checkpoint")
        return DEEPSPEED_LOAD
    states = folder / "zero"
    step = saved_step(states)
    if zero_stage == 3:
        load_zero3(engine.optimizer, states, step)
    elif zero_stage in (1, 2):
        load_zero12(engine.optimizer, states, step)
    else:
        load_unwrapped(engine, states, step)
    return OWN_LOAD


def saved_step(states: Path) -> int:
    """Adam's step count: a per-parameter step.pt (ZeRO-1/2 sources), else the ZeRO-3 global state."""
    if files := sorted(states.glob("*/step.pt")):
        return int(torch.load(files[0], weights_only=False))
    optim = torch.load(states / "optimizer_state.pt", weights_only=False)
    return int(next(iter(optim["optimizer_state_dict"]["state"].values()))["step"])


def read(folder: Path, key: str) -> torch.Tensor:
    return torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)["param"]


def load_unwrapped(engine, states: Path, step: int) -> None:
    """Stage 0 in fp32: DeepSpeed hands our torch optimizer the module's own parameters."""
    names = {p: n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            d = states / names[p]
            with torch.no_grad():
                p.copy_(read(d, "fp32").view_as(p))
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[p][key] = read(d, key).view_as(p).to(p.device, p.dtype)
            opt.state[p]["step"] = adam_step(opt, p, step)
