"""Consolidate a run's checkpoint (any ZeRO stage, any world size) into one safetensors file.

    elt-export RUN_DIR [--ema] [--tag step_00001000] --out model.safetensors

The recipe and the tokenizer that decodes samples travel inside the safetensors metadata, so the file
is all `elt-sample`, `elt-eval` and `ELT.from_pretrained` need: no DeepSpeed, no pickles, no shards. With
--ema the parameters are the fp32 EMA (consolidated from every rank's EMA shard); buffers come from the raw
weights. DeepSpeed checkpoints themselves are pickles and are trusted-only: they are read only from a run's
own directory or an explicit train.resume=PATH."""
from __future__ import annotations

import sys

from .cli import ArgumentParser
from .inference.load import export_run


def main(argv=None) -> int:
    p = ArgumentParser(prog="elt-export", description=__doc__)
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml and ckpt/)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (needs train.ema_decay > 0)")
    p.add_argument("--tag", default=None, help="checkpoint folder under ckpt/ (default: the latest complete one)")
    args = p.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.ema, args.tag)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"elt-export: {e}", file=sys.stderr)
        return 2
    print(f"elt-export: wrote {out} ({'EMA' if args.ema else 'raw'} weights of {args.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
