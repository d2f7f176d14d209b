"""Sample a trained ELT at one or several loop counts.

    elt-sample RUN_DIR|model.safetensors|FOLDER --loops 1,2,4 --num 64 --cfg 2.0 --seed 0 --out samples/

Per loop spec it writes `samples_<L>.npz` (ADM layout: arr_0 uint8 N×H×W×3, or N×T×H×W×3 for video;
arr_1 the class labels) and `grid_<L>.png` (`grid_<L>.gif` for video). Loop specs: `4`, a range `1-6`,
a per-step ramp `6>2`, piecewise `6/4/2`, or adaptive `auto:0.02` (see elt_scale/loopspec.py).
A run directory records its tokenizer, so this works from any directory and without the shards. Weights: the
EMA when the checkpoint keeps one (train.ema_decay > 0), else the raw ones, as ELT.from_pretrained does;
`--ema` insists on the EMA, `--no-ema` takes the raw weights.

Under torchrun/deepspeed (RANK/WORLD_SIZE set) each process samples its share of the batches and rank 0
writes the merged files; sample i depends only on (seed, i), so the result does not depend on the number
of processes:

    torchrun --nproc_per_node 8 -m elt_scale.sample RUN_DIR --loops 1-4 -n 50000 --out samples/
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .cli import ArgumentParser
from .dist import init_from_env, set_threads
from .inference.load import load
from .inference.outputs import save_grid, save_npz
from .inference.samples import gather_set, sample_set
from .sampling import SAMPLERS, parse_loop_list


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="elt-sample", description=__doc__)
    p.add_argument("model", help="run directory (latest checkpoint), elt-export .safetensors file or saved folder")
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
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="--ema: the EMA weights (an error if the run has none); --no-ema: the raw weights "
                        "(default: the EMA when the checkpoint keeps one, as ELT.from_pretrained and eval.every)")
    p.add_argument("--shards", default=None, help="shards dir whose manifest names the tokenizer (default: the "
                                                  "one the run recorded)")
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads()
    rank, world = init_from_env()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    # a wrong path, run without checkpoint, loop spec or class is the user's error: one line, exit 2
    try:
        loaded = load(args.model, ema=args.ema, device=device)
        recipe, decoder = loaded.recipe, loaded.decoder(args.shards)
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
        s = sample_set(loaded.model, recipe, schedule, args.num, decoder, args.cfg, args.steps, args.sampler,
                       args.seed, args.batch_size, args.class_id, rank, world, temperature=args.temperature)
        s = gather_set(s, rank, world)
        if rank == 0:
            npz = save_npz(out / f"samples_{schedule.label}.npz", s.images, s.labels)
            grid = save_grid(out / f"grid_{schedule.label}", s.images)
            print(f"elt-sample: L={schedule.spec} {len(s.labels)} samples ({'EMA' if loaded.ema else 'raw'} weights) "
                  f"in {s.wall_s:.1f}s, "
                  f"{s.loops_per_step:.2f} loops/step, {s.gflops_per_sample:.3f} GFLOPs/sample -> {npz}, {grid}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
