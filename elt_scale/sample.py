"""Sample a trained ELT at one or several loop counts.

    elt-sample RUN_DIR|model.safetensors --loops 1,2,4 --num 64 --cfg 2.0 --seed 0 --out samples/

Per loop spec it writes `samples_<L>.npz` (ADM layout: arr_0 uint8 N×H×W×3, or N×T×H×W×3 for video;
arr_1 the class labels) and `grid_<L>.png` (`grid_<L>.gif` for video). Loop specs: `4`, a range `1-6`,
a per-step ramp `6>2`, piecewise `6/4/2`, or adaptive `auto:0.02` (see elt_scale/sampling/loops.py).

Under torchrun/deepspeed (RANK/WORLD_SIZE set) each process samples its share of the batches and rank 0
writes the merged files; sample i depends only on (seed, i), so the result does not depend on the number
of processes:

    torchrun --nproc_per_node 8 -m elt_scale.sample RUN_DIR --loops 1-4 -n 50000 --out samples/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.shards import read_manifest
from .sampling import SAMPLERS, LoopSchedule, generate, parse_loop_list
from .tokenizers import tokenizer_from_manifest


@dataclass
class SampleSet:
    images: np.ndarray        # uint8 (N, H, W, 3) or (N, T, H, W, 3)
    labels: np.ndarray        # int64 (N,)
    gflops_per_sample: float  # mean over samples: every pass and loop actually run, CFG included
    loops_per_step: float     # mean loops per forward pass (differs from L only for auto)
    wall_s: float
    index: np.ndarray         # global sample ids (sample i depends only on seed and i)


def load_decoder(recipe, shards: str | Path | None = None):
    """The tokenizer recorded in the shards' manifest (recipe.data.shards unless `shards` is given)."""
    where = shards or recipe.data.shards
    try:
        return tokenizer_from_manifest(read_manifest(where))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; decoding samples needs the shards' manifest.json "
                                f"(recipe data.shards={recipe.data.shards!r}): pass --shards DIR") from None


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [0, 1], (B, C, H, W) or (B, C, T, H, W) -> uint8 channels-last with 3 channels."""
    x = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.movedim(1, -1)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.contiguous().numpy()


def class_labels(indices: range, num_classes: int, class_id: int | None = None,
                 classes: list[int] | None = None) -> torch.Tensor:
    """Balanced labels: sample i gets class i mod num_classes (or always `class_id`, or classes[i mod len])."""
    if class_id is not None:
        return torch.full((len(indices),), class_id, dtype=torch.long)
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """Randomness of one batch is a function of (seed, batch index) only: reproducible on any world size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


def sample_set(model, recipe, schedule: LoopSchedule, num: int, decoder, cfg: float = 1.0,
               steps: int | None = None, sampler: str = "ddpm", seed: int = 0, batch_size: int = 64,
               class_id: int | None = None, rank: int = 0, world: int = 1, progress: bool = True,
               temperature: float = 1.0, classes: list[int] | None = None) -> SampleSet:
    """Sample this rank's share (batches b with b % world == rank) of `num` samples and decode them."""
    num_batches = (num + batch_size - 1) // batch_size
    mine = range(rank, num_batches, world)
    images, labels, flops, loops = [], [], [], []
    start = time.perf_counter()
    for b in tqdm(mine, desc=f"sampling L={schedule.spec}", disable=not progress or rank != 0, leave=False):
        idx = range(b * batch_size, min(num, (b + 1) * batch_size))
        y = class_labels(idx, recipe.model.num_classes, class_id, classes).to(next(model.parameters()).device)
        z, cost = generate(model, recipe, y, schedule, cfg, steps, sampler, batch_generator(seed, b), temperature)
        images.append(to_uint8(decoder.decode(z).cpu()))
        labels.append(y.cpu().numpy())
        flops.append(cost.flops_per_sample(recipe.model))
        loops.append(torch.full((len(idx),), cost.loops_per_step()))
    wall = time.perf_counter() - start
    if not images:
        return SampleSet(np.zeros((0,), np.uint8), np.zeros((0,), np.int64), 0.0, 0.0, wall, np.zeros(0, np.int64))
    index = np.concatenate([np.arange(b * batch_size, min(num, (b + 1) * batch_size)) for b in mine])
    return SampleSet(np.concatenate(images), np.concatenate(labels), float(torch.cat(flops).mean()) / 1e9,
                     float(torch.cat(loops).mean()), wall, index)


def save_npz(path: Path, s: SampleSet) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, arr_0=s.images, arr_1=s.labels)
    os.replace(tmp, path)


def save_grid(path: Path, images: np.ndarray, max_images: int = 64, min_side: int = 64) -> Path:
    """PNG grid of images (or an animated GIF grid for videos), upscaled so tiny images stay visible."""
    from PIL import Image

    x = images[:max_images]
    if x.ndim == 4:
        x = x[:, None]                                      # one frame
    n, t, h, w, _ = x.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.zeros((t, rows * (h + 1) + 1, cols * (w + 1) + 1, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[i]
    scale = max(1, int(np.ceil(min_side / max(h, w))))
    frames = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in canvas]
    if t == 1:
        path = path.parent / f"{path.name}.png"          # not with_suffix: names like grid_Lauto0.1
        frames[0].save(path)
    else:
        path = path.parent / f"{path.name}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return path


# ---------------------------------------------------------------------------------------------
# multi-process: each rank writes its part, rank 0 merges

def dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_dist(world: int):
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def write_part(path: Path, s: SampleSet) -> None:
    stats = json.dumps({"n": len(s.labels), "gflops_per_sample": s.gflops_per_sample,
                        "loops_per_step": s.loops_per_step, "wall_s": s.wall_s})
    np.savez(path, arr_0=s.images, arr_1=s.labels, index=s.index, stats=np.array(stats))


def merge_parts(parts: list[Path]) -> SampleSet:
    """Concatenate per-rank parts and put the samples back in global index order."""
    loaded = [np.load(p, allow_pickle=False) for p in parts]
    loaded = [f for f in loaded if len(f["arr_1"])] or loaded[:1]     # a rank may have had no batch
    index = np.concatenate([f["index"] for f in loaded])
    order = np.argsort(index, kind="stable")
    stats = [json.loads(str(f["stats"])) for f in loaded]
    n = max(sum(s["n"] for s in stats), 1)
    mean = lambda k: sum(s[k] * s["n"] for s in stats) / n
    return SampleSet(np.concatenate([f["arr_0"] for f in loaded])[order],
                     np.concatenate([f["arr_1"] for f in loaded])[order], mean("gflops_per_sample"),
                     mean("loops_per_step"), max(s["wall_s"] for s in stats), index[order])


def gather_to_rank0(s: SampleSet, out: Path, tag: str, rank: int, world: int) -> SampleSet | None:
    if world == 1:
        return s
    write_part(out / f".part_{tag}.rank{rank}.npz", s)
    torch.distributed.barrier()
    merged = None
    if rank == 0:
        parts = [out / f".part_{tag}.rank{r}.npz" for r in range(world)]
        merged = merge_parts(parts)
        for p in parts:
            p.unlink()
    torch.distributed.barrier()
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="elt-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory (latest checkpoint) or an elt-export .safetensors file")
    p.add_argument("--loops", default=None, help="comma-separated loop specs, e.g. 1,2,4 or 1-6 or 6>2,auto:0.02 "
                                                 "(default: the trained L_max)")
    p.add_argument("-n", "--num", "--num-samples", dest="num", type=int, default=64,
                   help="samples per loop spec (under torchrun write -n or --num-samples: torchrun reads "
                        "a bare --num as an abbreviation of its own --numa-binding)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: MaskGIT 24 images / 12 video; DDPM 512; DDIM 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="diffusion sampler")
    p.add_argument("--temperature", type=float, default=1.0, help="MaskGIT token sampling temperature")
    p.add_argument("--class", dest="class_id", type=int, default=None, help="sample one class only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--shards", default=None, help="shards dir whose manifest names the tokenizer "
                                                  "(default: the recipe's data.shards)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value is not None and value < 1:
            p.error(f"{flag} {value}: must be >= 1")
    if args.temperature <= 0:
        p.error(f"--temperature {args.temperature}: must be > 0")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__})")

    from .engine.export import load_model

    rank, world = dist_env()
    init_dist(world)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    # a wrong path, run without checkpoint, loop spec or class is the user's error: one line, exit 2
    try:
        model, recipe = load_model(args.model, ema=args.ema, device=device)
        decoder = load_decoder(recipe, args.shards)
        schedules = parse_loop_list(args.loops or str(recipe.model.loops), recipe.model.loops)
        if args.class_id is not None and not 0 <= args.class_id < recipe.model.num_classes:
            raise ValueError(f"--class {args.class_id}: the model has classes 0..{recipe.model.num_classes - 1}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: is a file; give a directory")
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, KeyError, ValueError) as e:
        print(f"elt-sample: error: {e}", file=sys.stderr)
        return 2
    for schedule in schedules:
        s = sample_set(model, recipe, schedule, args.num, decoder, args.cfg, args.steps, args.sampler,
                       args.seed, args.batch_size, args.class_id, rank, world,
                       temperature=args.temperature)
        s = gather_to_rank0(s, out, schedule.label, rank, world)
        if rank == 0:
            save_npz(out / f"samples_{schedule.label}.npz", s)
            grid = save_grid(out / f"grid_{schedule.label}", s.images)
            print(f"elt-sample: L={schedule.spec} {len(s.labels)} samples in {s.wall_s:.1f}s, "
                  f"{s.loops_per_step:.2f} loops/step, {s.gflops_per_sample:.3f} GFLOPs/sample -> "
                  f"{out / f'samples_{schedule.label}.npz'}, {grid}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
