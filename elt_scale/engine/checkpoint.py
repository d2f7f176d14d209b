"""Checkpoints: DeepSpeed's per-rank files + EMA shards + client state, and a `latest` pointer that only
moves once every rank has finished writing.

    <run>/ckpt/step_00001000/{mp_rank_00_model_states.pt, *zero_pp_rank_*optim_states.pt,
                              ema_rank*.safetensors, client_state.json}
    <run>/ckpt/latest          -> "step_00001000", replaced atomically (write tmp, fsync, rename)

DeepSpeed's own `latest` is written by rank 0 without waiting for the other ranks' shards, so a job
killed mid-save could point at a half-written folder; we save with save_latest=False and write the
pointer ourselves after a barrier. A folder without the pointer is ignored (and pruned later).

A save that cannot be written (disk full, quota, EIO) on any rank fails on every rank together: each rank
writes what it can, the ranks agree on the outcome (one all-reduce where the barrier was), rank 0 removes
the partial folder, `latest` stays on the previous complete checkpoint, and SaveFailed carries one line
that the trainer prints before exiting SAVE_FAILED_EXIT_CODE. Not retried by slurm/train_large.sh: a full
disk stays full until someone frees space; then the rerun resumes from `latest`.

Resuming on the same world size restores everything through `engine.load_checkpoint`. On a different
world size the checkpoint is converted once into a universal checkpoint (universal.py), each rank reads the
fp32 weights from it parameter by parameter before `deepspeed.initialize` and the optimizer moments and step
count after it, the EMA is re-sliced, step/LR schedule/data position continue, and each rank's data stream
is the new world's (the stream is a function of rank and world)."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import atomic_write_text, free_space
from ..inference.weights import CLIENT_STATE, POINTER, read_client, read_pointer
from . import ds_internals, faults

SAVE_FAILED_EXIT_CODE = 74    # EX_IOERR: a checkpoint could not be written; not retried


TORCH_PREFIX = re.compile(r"^\[enforce fail at [^]]*\][ .]*")     # where in torch's C++ it noticed


class SaveFailed(RuntimeError):
    """A checkpoint save failed on some rank; raised on every rank, with one line for the log."""


@dataclass
class TrainState:
    """Everything besides DeepSpeed's own files that a resume needs, saved as client_state.json (and inside
    DeepSpeed's model-states file) and restored as one object."""
    step: int = 0
    data_position: int = 0                 # global batches the loader has handed out
    world_size: int = 1
    zero_stage: int = 0
    ilsd_lambda: float | None = None       # saved as "lambda"
    wandb_id: str = ""
    skipped_steps: int = 0
    bad_streak: int = 0
    model_shapes: dict | None = None       # parameter shapes, to refuse a checkpoint of another model

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lambda"] = d.pop("ilsd_lambda")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        d = {**d, "ilsd_lambda": d.get("lambda")}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        return cls.from_dict(read_client(folder))


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_pointer(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(Path(ckpt_dir) / POINTER, tag)


def rng_state() -> dict:
    import random

    import numpy as np
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, ckpt_dir: Path, state: TrainState, ema=None, keep_last: int = 2) -> str:
    """Collective: every rank calls it. Returns the tag, or raises SaveFailed on every rank. The state's keys
    are merged into DeepSpeed's model-states dict, so none may be DeepSpeed's own ('param_shapes', 'module' ...)."""
    client = state.to_dict()
    tag = tag_for(state.step)
    error = write_files(engine, ckpt_dir, tag, client, ema)
    agree_saved(engine, ckpt_dir, tag, error)       # every rank's files are on disk (or all ranks raise)
    faults.kill_in_save(client["step"], ckpt_dir.parent)   # test-only (ELT_FAULT): die mid-save
    error = None
    if dist.get_rank() == 0:
        try:
            write_pointer(ckpt_dir, tag)
        except OSError as e:
            error = describe(e)
    agree_saved(engine, ckpt_dir, tag, error)       # `latest` names this checkpoint (or all ranks raise)
    if dist.get_rank() == 0:
        prune(ckpt_dir, keep_last)
    return tag


def write_files(engine, ckpt_dir: Path, tag: str, client: dict, ema) -> str | None:
    """This rank's files of checkpoint `tag`; what went wrong (one line), or None. Never raises a write
    error: every rank must reach the agreement that follows."""
    folder = ckpt_dir / tag
    try:
        with ds_internals.save_errors_kept(engine) as errors:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client, "rng": rng_state()},
                                   save_latest=False)
        if errors:
            return describe(errors[0])
        if ema is not None:
            ema.save(folder)
        if dist.get_rank() == 0:
            atomic_write_text(folder / CLIENT_STATE, json.dumps(client, indent=1))
    except OSError as e:
        return describe(e)
    return None


def describe(e: Exception) -> str:
    """A write error in one line: the OS's words and the file, or what torch.save said (it reports a full
    disk as a RuntimeError such as "[enforce fail at inline_container.cc:672] . unexpected pos ...")."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    said = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"a write failed ({TORCH_PREFIX.sub('', said)})"


def agree_saved(engine, ckpt_dir: Path, tag: str, error: str | None) -> None:
    """Collective: nothing when no rank failed; else rank 0 removes the partial folder and every rank raises
    SaveFailed naming the first failing rank, its error and what is left."""
    failed = torch.tensor([float(error is not None)], device=engine.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    rank = next(r for r, e in enumerate(errors) if e is not None)
    free = free_space(ckpt_dir)                  # what the save met, before its folder is removed (rank 0's)
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    previous = read_pointer(ckpt_dir)
    kept = f"{ckpt_dir / POINTER} still names {previous}" if previous else f"no checkpoint in {ckpt_dir} yet"
    raise SaveFailed(f"checkpoint {tag} could not be written (rank {rank}: {errors[rank]}; {free}); the "
                     f"partial folder is removed and {kept}. Free space or raise the quota on that file system, "
                     f"then rerun the same command to resume from there")


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to the pointer (the pointed-to one always);
    drop older ones and folders of saves that never completed (killed before the pointer moved)."""
    current = read_pointer(ckpt_dir) or ""
    tags = sorted(p.name for p in Path(ckpt_dir).glob("step_*") if p.is_dir())
    complete = [t for t in tags if t <= current and (ckpt_dir / t / CLIENT_STATE).exists()]
    keep = set(complete[-keep_last:]) | {current}
    for t in tags:
        if t not in keep:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def find_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """train.resume=auto|never|PATH -> the checkpoint folder to resume from (or None to start fresh).
    PATH may be a run's ckpt/ directory (its pointer is followed) or one step_* folder."""
    if resume == "never":
        if tag := read_pointer(ckpt_dir):            # starting over would prune it and rewrite metrics.jsonl
            raise ValueError(f"train.resume=never: {ckpt_dir} already holds a checkpoint ({tag}) that a fresh "
                             f"start would overwrite; choose another run.name or run.out_dir, or delete "
                             f"{ckpt_dir.parent} first")
        return None
    if resume == "auto":
        tag = read_pointer(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(resume)
    tag = read_pointer(path)
    folder = path / tag if tag else path
    if not (folder / CLIENT_STATE).exists():
        raise FileNotFoundError(f"train.resume={resume}: no complete checkpoint there (expected a ckpt/ "
                                f"directory with a '{POINTER}' pointer, or a step_* folder with {CLIENT_STATE})")
    return folder


def param_shapes(model) -> dict[str, list[int]]:
    """Recorded in each checkpoint's client state (taken before ZeRO-3 partitions the parameters)."""
    return {n: list(p.shape) for n, p in model.named_parameters()}


def shape_mismatch(saved: dict | None, shapes: dict) -> str | None:
    """Why a checkpoint's weights cannot load into this model, or None (also for checkpoints that
    predate the record): one differing parameter named, and how many differ."""
    if not saved:
        return None
    names = sorted(set(saved) | set(shapes))
    bad = [n for n in names if saved.get(n) != shapes.get(n)]
    if not bad:
        return None
    n = bad[0]
    return (f"{len(bad)} of {len(names)} parameters differ from this recipe's model, e.g. {n}: "
            f"{saved.get(n, 'absent')} there, {shapes.get(n, 'absent')} here")


def load_same_world(engine, folder: Path) -> TrainState:
    """Full restore (weights, optimizer) through DeepSpeed; returns our train state
    (client_state.json: DeepSpeed hands its own copy back only where the rank's file holds one)."""
    path, ds_client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed could not load this checkpoint")
    if ds_client and "rng" in ds_client:    # our randomness is a function of the step; restored for others'
        set_rng_state(ds_client["rng"])
    return TrainState.read(folder)
