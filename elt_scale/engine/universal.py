"""Resume on another layout (world size or ZeRO stage) with Adam's moments and step counts kept.

A checkpoint saved under another layout is first converted by DeepSpeed's `ds_to_universal` into one
fp32 / exp_avg / exp_avg_sq (/ step) file per parameter, cached beside the original:

    <run>/ckpt/step_00001000/universal/{zero/<param name>/*.pt, zero/optimizer_state.pt, *model_states.pt}

Every rank first reads the fp32 weights from the per-parameter files into its model, one parameter at a time
(`load_weights`, before `deepspeed.initialize`), so a rank holds its model and one parameter's file, never a
consolidated copy of the whole model: DeepSpeed's zero_to_fp32, used here before, read every rank's shard and
built the full fp32 state dict on every rank (8 ranks per node: 8 copies, bench/RESULTS.md measures both).
The conversion's copy of the model-states file keeps DeepSpeed's metadata but not the module's weights, which
its universal load never reads and would otherwise unpickle (twice) on every rank.

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

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..config import merge
from ..inference.weights import consolidated_weights, read_client
from .distributed import solo
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


def convert(folder: Path, deadline_s: float) -> Path:
    """`folder`/universal, converted once by rank 0 while the others wait through the store (solo: no
    collective deadline to trip, however long it takes); written under a temporary name and renamed, so a
    folder of that name is complete and reused later."""
    out = Path(folder) / UNIVERSAL
    solo(lambda: out.exists() or run_ds_to_universal(Path(folder), out), f"converting {folder} to a universal "
         f"checkpoint", deadline_s)
    return out


def run_ds_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's converter in a process of its own session, so that it outlives this trainer: a trainer
    restarted while a conversion runs (a crash, a watchdog exit, a launcher restart on the same node) finds
    it through `.universal.lock` and waits for it instead of starting over. A conversion that died with its
    node starts over (ds_to_universal cannot continue a half-written output)."""
    lock = folder / f".{UNIVERSAL}.lock"
    owner = alive_owner(lock)
    if owner is None:
        for stale in folder.glob(f".{UNIVERSAL}.tmp*"):            # from a conversion killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder / f".{UNIVERSAL}.tmp{os.getpid()}"
        log = folder / f".{UNIVERSAL}.log"
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        with open(log, "w") as out_log:
            proc = subprocess.Popen([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                     str(folder), "--output_folder", str(tmp), "--inject_missing_state",
                                     "--num_extract_workers", workers, "--num_merge_workers", workers],
                                    stdout=out_log, stderr=subprocess.STDOUT, start_new_session=True)
        lock.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "tmp": tmp.name}))
        code = proc.wait()
    else:
        pid, tmp = owner
        print(f"elt-train: a conversion of {folder} started by an earlier attempt (pid {pid}) is still running; "
              f"waiting for it", file=sys.stderr, flush=True)
        while pid_alive(pid):
            time.sleep(1.0)
        done = folder / "latest_universal"          # ds_to_universal's last act: its pointer to the output
        code = 0 if done.exists() and done.read_text().strip() == tmp.name else 1
    lock.unlink(missing_ok=True)
    (folder / "latest_universal").unlink(missing_ok=True)          # its pointer names the temporary folder
    if code != 0:
        said = (folder / f".{UNIVERSAL}.log").read_text()[-3000:] if (folder / f".{UNIVERSAL}.log").exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {folder}:\n{said}")
    as_zero12_files(tmp / "zero", read_client(folder).get("model_shapes") or {})
    without_module_weights(tmp)
    os.replace(tmp, out)


def alive_owner(lock: Path) -> tuple[int, Path] | None:
    """(pid, its output folder) of a conversion still running on this host, from its lock file."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if owner.get("host") != socket.gethostname() or not pid_alive(owner["pid"]):
        return None
    return owner["pid"], lock.parent / owner["tmp"]


def pid_alive(pid: int) -> bool:
    """A running process: not gone, and not a zombie (an orphaned converter that finished is reparented, and
    a container's init may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:                        # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def as_zero12_files(states: Path, shapes: dict) -> None:
    """A ZeRO-3 conversion stores each state as a bare flat tensor, a ZeRO-1/2 one as {"param": tensor} in the
    parameter's shape, which is all DeepSpeed's ZeRO-1/2 per-parameter reader (and ZeRO-3's) understands."""
    for name, shape in shapes.items():
        for f in (states / name).glob("*.pt"):
            t = torch.load(f, map_location="cpu", weights_only=False)
            if torch.is_tensor(t) and f.stem != "step":
                torch.save({"param": t.view(shape)}, f)


def without_module_weights(universal: Path) -> None:
    """The copied *model_states.pt files minus the module's weights: DeepSpeed's universal load reads their
    metadata (world sizes, step counters, parameter shapes) but restores weights from zero/, and each rank
    would otherwise unpickle the whole module (a ZeRO-1/2 checkpoint's, at the training precision) twice."""
    for f in universal.glob("*model_states.pt"):
        # memory-mapped, so the weights dropped are never read in; rewritten aside, as the map still reads f
        states = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        if states.get("module"):
            states["module"] = {}
            torch.save(states, f.with_name(f.name + ".tmp"))
            os.replace(f.with_name(f.name + ".tmp"), f)


def load_weights(model, resume_from: Path, deadline_s: float) -> None:
    """Every rank, before `deepspeed.initialize`: the fp32 weights of a checkpoint saved under another layout,
    parameter by parameter from its universal conversion (made here once, `convert`), so the rank's peak is
    its model plus one parameter's file. A stage-0 checkpoint has no ZeRO shards to convert: its one
    model-states file holds the weights (read memory-mapped). The models keep no state in buffers (they are
    built from the recipe), and the universal files hold parameters only."""
    if source_stage(resume_from) == 0:
        model.load_state_dict(consolidated_weights(resume_from))
        return
    states = convert(resume_from, deadline_s) / "zero"
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(read(states / name, "fp32").view_as(param))


def load(engine, resume_from: Path, zero_stage: int, deadline_s: float) -> str:
    """Collective, after `load_weights` and `deepspeed.initialize` (with `universal_config`):
    fp32 master weights, Adam moments and step counts of a checkpoint saved under another layout. Returns how."""
    source = source_stage(resume_from)
    if source == 0:
        return RESTARTED
    if zero_stage == 0 and engine.bfloat16_enabled():
        return RESTARTED_BF16
    folder = convert(resume_from, deadline_s)
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
