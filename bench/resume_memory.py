"""Host memory of a resume, phase by phase, on every rank (issue 38 item 3).

    python bench/resume_memory.py RUN_DIR --tag step_00000003 --world 2 [--source /tmp/old] [--out JSON] [key=value ...]

Starts `--world` local ranks (gloo, no launcher), each of which builds the run's engine from the checkpoint
exactly as elt-train does (`engine.resume.start_engine` with the run's recipe.yaml and the batch layout for
this world) and nothing else: no data, no step. Around each phase of start_engine a rank resets its peak RSS
(Linux: `echo 5 > /proc/self/clear_refs` sets VmHWM to the current RSS) and reads it back after, so each row is
that phase's own peak and the RSS it leaves behind. Phases are found by name in the checkout measured
(`--source`, default this one; `git archive COMMIT | tar -x -C /tmp/old` gives an older one): build_model,
consolidated_weights (before issue 38) or universal.load_weights (after), deepspeed.initialize,
universal.load (Adam moments), ShardedEMA and, as the rest, the EMA load. A checkpoint saved on another world
size or ZeRO stage than --world makes this a cross-layout resume; its universal conversion is cached in the
checkpoint folder by the first run (delete `universal/` to time it again). Threads: one per rank."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PHASES = (("elt_scale.engine.resume", "build_model"), ("elt_scale.engine.resume", "consolidated_weights"),
          ("elt_scale.engine.universal", "load_weights"), ("deepspeed", "initialize"),
          ("elt_scale.engine.universal", "load"), ("elt_scale.engine.resume", "ShardedEMA"))


def status_gib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 2**20, 3)
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(run_dir: Path, tag: str, overrides: list[str]) -> None:
    """One rank (RANK/WORLD_SIZE/MASTER_* set by the parent): start_engine with every phase measured."""
    import importlib

    import torch
    torch.set_num_threads(1)
    rows = []

    def mark(what: str) -> None:
        s = status_gib()
        rows.append({"phase": what, "peak_gib": s["VmHWM"], "after_gib": s["VmRSS"], "anon_gib": s["RssAnon"],
                     "file_gib": s["RssFile"]})
        reset_peak()

    def measured(module, name):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            mark(f"(before {name})")
            out = inner(*args, **kwargs)
            mark(name)
            return out
        setattr(module, name, wrapped)

    from elt_scale.batching import batch_layout, with_layout
    from elt_scale.config import load_recipe
    from elt_scale.engine import resume
    from elt_scale.engine.distributed import init_distributed
    rank, world = init_distributed(600)
    mark("imports and process group")
    for module, name in PHASES:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            measured(mod, name)
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    recipe = with_layout(recipe, batch_layout(recipe.train, world))
    resume.start_engine(recipe, resume.make_ds_config(recipe, world), run_dir / "ckpt" / tag, rank, world)
    mark("rest (EMA load)")
    rows = [r for r in rows if not r["phase"].startswith("(before")]
    Path(os.environ["RESUME_MEMORY_OUT"]).write_text(json.dumps({"rank": rank, "phases": rows}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tag", required=True, help="checkpoint folder under RUN_DIR/ckpt")
    p.add_argument("--world", type=int, default=2, help="ranks to resume on")
    p.add_argument("--source", type=Path, default=ROOT, help="checkout whose elt_scale is measured")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.global_batch=8 for a world the run's "
                                                "global batch cannot be split over (memory does not depend on it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if args.worker:
        worker(args.run_dir, args.tag, args.overrides)
        return 0
    sys.path.insert(0, str(ROOT))
    from elt_scale.dist import free_port
    port, procs, outs = str(free_port()), [], []
    for rank in range(args.world):
        out = Path(f"/tmp/resume_memory.{os.getpid()}.{rank}.json")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
        env.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(args.world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(args.source.resolve()),
                   RESUME_MEMORY_OUT=str(out))
        procs.append(subprocess.Popen([sys.executable, __file__, str(args.run_dir.resolve()), "--tag", args.tag,
                                       "--worker", *args.overrides], cwd=args.source, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
        outs.append(out)
    failed = [(i, p.wait(), p.stderr.read()[-3000:]) for i, p in enumerate(procs)]
    if any(code for _, code, _ in failed):
        print("\n".join(f"rank {i} exited {code}:\n{err}" for i, code, err in failed if code), file=sys.stderr)
        return 1
    ranks = [json.loads(o.read_text()) for o in outs]
    for o in outs:
        o.unlink()
    for r in ranks:
        print(f"rank {r['rank']}: " + "; ".join(f"{x['phase']} {x['peak_gib']:.2f} -> {x['after_gib']:.2f}"
                                               for x in r["phases"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"source": str(args.source), "world": args.world, "tag": args.tag,
                                              "ranks": ranks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
