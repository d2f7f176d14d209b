"""The built-in demonstration on scikit-learn's digits (no GPU, no downloads).

    python -m elt_scale.demo [--out demo_out] [--steps 300]

Tokenizes digits into shards, then trains the masked ELT with ILSD through DeepSpeed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="where shards and runs go")
    p.add_argument("--steps", type=int, default=300, help="training steps per model")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    shards = out / "shards" / "digits"
    if not (shards / "manifest.json").exists():
        run([sys.executable, "data_prep/tokenize.py", "--source", "digits", "--out", str(shards)])
    run([sys.executable, "-m", "elt_scale.train", "recipes/digits_masked.yaml", f"data.shards={shards}",
         f"run.out_dir={out / 'runs'}", f"train.steps={args.steps}", "train.resume=never"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
