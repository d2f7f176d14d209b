"""The real sizes, rehearsed (issue 38 item 3): a recipe at its real width, depth and grid, fed by its header's
tokenize command, trained, saved, resumed on another layout, exported and sampled on the loopback two-node
Slurm cluster (tests/slurm_cluster.py), with each process's peak host memory recorded.

    sudo python bench/rehearsal.py [--recipes masked,diffusion] [--global-batch 2] [--work DIR] [--out JSON]
    sudo python bench/rehearsal.py --ci ...        the CI cut (tests/cluster/test_real_size.py): no phase C,
                                                   one loop count and one sample

Per recipe (masked: imagenet256_masked_elt_xl_7x4, diffusion: imagenet256_diffusion_elt_8x4):
  data   an ImageNet-shaped tree (tests/tiny_tokenizers.py) through the header's `# data:` command, run as
         written except --input, --tokenizer-path (a tiny random model of the header's `# tokenizer:` class,
         compression and vocabulary/channels) and --out; so the shards are the recipe's real grid
  A      `sbatch -N2 slurm/train_large.sh RECIPE` (1 rank per node), overrides: train.global_batch (small),
         train.steps=3, train.save_every=2, train.log_every=1, train.warmup_steps=1 (so that 3 steps move the
         weights), data.num_workers=0, and train.ema_decay=0.9999 where the recipe keeps no EMA: the
         uninterrupted run, checkpoints at steps 2 and 3
  rewind A's run directory as a job killed after step 2's checkpoint leaves it: step_3 gone, `latest` on
         step 2, metrics.jsonl cut to 2 rows (A's own step-3 row is kept aside as the reference)
  B      `sbatch -N1 slurm/train_large.sh RUN/recipe.yaml`: one rank on one node, no override at all. The run's
         own recipe.yaml holds the small global batch and the micro-batch A's layout chose; the trainer derives
         grad_accum for one rank, so step 3 sees the same samples and draws as A's (a cross-layout resume:
         2 ranks -> 1, through the universal checkpoint)
  export `python -m elt_scale.export RUN --ema`, then `python -m elt_scale.sample FILE --loops 1,L_max
         -n 2 --steps 2` (MaskGIT, or DDIM for diffusion; --ci: --loops L_max -n 1)
  C      (not with --ci) B's step-3 checkpoint (1 rank) resumed on 2 nodes with nothing left to train: each
         rank's peak host memory is that of a cross-layout resume alone
Peak host RSS: every Python process the phases start imports a `sitecustomize` written into --work (on
PYTHONPATH through the env file slurm/train_large.sh sources) that writes its own ru_maxrss and lifetime at
exit (atexit, and os._exit, which the trainer uses on several ranks): per rank, per converter, per CLI.
Checkpoint bytes are the files of ckpt/step_00000002 against `elt-plan`'s checkpoint figure (fp32, as CPU
training is); save seconds from goodput.json; conversion seconds are the ds_to_universal process's lifetime.

Needs root, slurm-wlm and munge (as tests/cluster). Prints a summary and writes JSON; bench/RESULTS.md holds
the numbers of a run. The diffusion recipe (545M parameters) needs ~10 GiB of host memory per rank here; the
script skips a recipe whose estimate exceeds the memory available and says so (--force runs it anyway)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import device_facts  # noqa: E402  (bench/common.py, beside this script)
from elt_scale.config import load_recipe  # noqa: E402
from elt_scale.engine import checkpoint as ckpt  # noqa: E402
from elt_scale.plan import GiB, checkpoint_bytes, make_plan, parameter_counts  # noqa: E402

RECIPES = {"masked": "imagenet256_masked_elt_xl_7x4.yaml", "diffusion": "imagenet256_diffusion_elt_8x4.yaml"}
DATA_LINE = re.compile(r"^# data: python data_prep/tokenize\.py (?P<args>.+)$", re.M)
TOKENIZER_LINE = re.compile(r"^# tokenizer: (?P<name>[\w-]+), compression (?P<s>\d+)x\d+, (?P<what>vocab|channels) "
                            r"(?P<n>\d+)\b", re.M)
SAVED_AT, STEPS = 2, 3

PROBE = '''"""Written by bench/rehearsal.py: at exit, this process's peak RSS and lifetime into $ELT_RSS_DIR."""
import atexit, json, os, resource, socket, sys, time
_pid, _t0, _dir, _done = os.getpid(), time.time(), os.environ.get("ELT_RSS_DIR"), []


def _dump():
    if _done or os.getpid() != _pid:       # once; never from a forked child (it inherits this module)
        return
    _done.append(1)
    rec = {"pid": _pid, "rank": os.environ.get("RANK"), "node": os.environ.get("SLURMD_NODENAME"),
           "argv": sys.argv, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "wall_s": round(time.time() - _t0, 2)}
    try:
        with open(os.path.join(_dir, f"{socket.gethostname()}-{_pid}.json"), "w") as f:
            json.dump(rec, f)
    except OSError:
        pass


if _dir:
    atexit.register(_dump)
    _real_exit = os._exit

    def _exit(code):
        _dump()
        _real_exit(code)
    os._exit = _exit
'''


# ---------------------------------------------------------------------------------------------
# data: the header's command on an ImageNet-shaped tree, with a tiny tokenizer of the header's kind

def header(recipe_path: Path) -> tuple[list[str], dict]:
    text = recipe_path.read_text()
    argv = shlex.split(DATA_LINE.search(text)["args"])
    t = TOKENIZER_LINE.search(text)
    n = int(t["n"])
    return argv, {"name": t["name"], "spatial": int(t["s"]), "vocab": n if t["what"] == "vocab" else None,
                  "channels": n if t["what"] == "channels" else None}


def swapped(argv: list[str], swap: dict[str, str]) -> list[str]:
    argv = list(argv)
    for flag, value in swap.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def make_shards(recipe_path: Path, work: Path, images_per_class: int) -> tuple[Path, list[str]]:
    """The recipe's shards, written by its header's command (through tokenize.py's CLI); returns (out, argv)."""
    from tests.tiny_tokenizers import make_imagenet_tree, write_diffusers_tokenizer

    argv, tok = header(recipe_path)
    tree = make_imagenet_tree(work / "imagenet" / "train", per_class=images_per_class)
    # a stand-in with the header's class, compression and codebook/channels: random weights, tiny blocks
    model = write_diffusers_tokenizer(tok["name"], work / f"tok-{tok['name']}", 1, tok["spatial"], tok["vocab"],
                                      tok["channels"])
    out = work / "shards" / recipe_path.stem
    argv = swapped(argv, {"--input": str(tree), "--tokenizer-path": str(model), "--out": str(out)})
    run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), *argv, "--workers", "0", "--device", "cpu"],
        "tokenize")
    return out, argv


# ---------------------------------------------------------------------------------------------
# jobs and processes

def run(cmd: list[str], what: str, env: dict | None = None) -> float:
    """Run a command to completion; its wall seconds. A failure stops the bench with its output."""
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what} exited {r.returncode}: {shlex.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.time() - start


class Jobs:
    """train_large.sh jobs on the cluster, each phase with its own RSS folder."""

    def __init__(self, cluster, work: Path, timeout_s: float):
        self.cluster, self.work, self.timeout_s = cluster, work, timeout_s
        self.probe = work / "probe"
        self.probe.mkdir(parents=True, exist_ok=True)
        (self.probe / "sitecustomize.py").write_text(PROBE)
        self.env_file = work / "env.sh"
        self.env_file.write_text(f"source {Path(sys.prefix) / 'bin' / 'activate'}\nexport GLOO_SOCKET_IFNAME=lo\n"
                                 f"export PYTHONPATH={self.probe}${{PYTHONPATH:+:$PYTHONPATH}}\n")

    def env(self, rss: Path) -> dict:
        rss.mkdir(parents=True, exist_ok=True)
        return {"ELT_ENV_FILE": str(self.env_file), "ELT_LOG_DIR": str(self.work / "logs"), "ELT_RSS_DIR": str(rss),
                "WANDB_MODE": "disabled", "ELT_MAX_RESTARTS": "2"}   # the rendezvous port is 20000 + job id:
        # another engineer's loopback cluster on this host may hold it; a restart moves it (train_large.sh)

    def train(self, name: str, nodes: int, cpus: int, args: list[str], rss: Path) -> dict:
        """One train_large.sh job to completion: its wall seconds (queue to end) and restarts."""
        out = self.work / f"{name}-%j.out"
        start = time.time()
        job = self.cluster.sbatch("slurm/train_large.sh", *args, env=self.env(rss), cwd=ROOT, sbatch_args=[
            f"-N{nodes}", "--ntasks-per-node=1", "--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=180",
            f"--job-name={name}", f"--output={out}"])
        info = self.cluster.wait(job, timeout=self.timeout_s)
        if info.get("JobState") != "COMPLETED":
            logs = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-3000:]}" for p in
                             [Path(str(out).replace("%j", str(job))), *sorted((self.work / "logs").glob(f"{name}-{job}/*.log"))]
                             if p.exists())
            raise SystemExit(f"job {name} ({job}) ended {info.get('JobState')} {info.get('ExitCode')}\n{logs}")
        batch = Path(str(out).replace("%j", str(job))).read_text(errors="replace")
        return {"wall_s": time.time() - start, "restarts": len(re.findall(r"; restart \d+ of \d+", batch)),
                "rss": rss_records(rss)}

    def cli(self, cmd: list[str], what: str, rss: Path) -> float:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(self.env(rss), PYTHONPATH=f"{self.probe}:{ROOT}")
        return run(cmd, what, env)


def rss_records(folder: Path) -> list[dict]:
    """One row per (kind, rank, node): the largest peak of its processes (a restarted attempt adds one)."""
    rows = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        argv = " ".join(r["argv"])
        kind = ("converter" if "ds_to_universal" in argv else "rank" if "elt_scale/train" in argv else
                "export" if "elt_scale/export" in argv else "sample" if "elt_scale/sample" in argv else "other")
        row = {"kind": kind, "rank": r["rank"], "node": r["node"], "peak_rss_gib": r["maxrss_kib"] / 2**20,
               "wall_s": r["wall_s"], "processes": 1}
        key = (kind, r["rank"], r["node"])
        if key in rows:
            row["processes"] += rows[key]["processes"]
            row = max(row, rows[key], key=lambda x: x["peak_rss_gib"]) | {"processes": row["processes"]}
        rows[key] = row
    return sorted(rows.values(), key=lambda r: (r["kind"], str(r["rank"])))


# ---------------------------------------------------------------------------------------------
# the run directory

def folder_bytes(folder: Path, skip: str = "universal") -> dict:
    """Bytes by file kind of a checkpoint folder (the cached universal conversion apart)."""
    kinds = {"module": 0, "optimizer": 0, "ema": 0, "other": 0}
    for f in folder.rglob("*"):
        if not f.is_file() or skip in f.relative_to(folder).parts[:1]:
            continue
        kind = ("module" if f.name.endswith("model_states.pt") else "optimizer" if f.name.endswith("optim_states.pt")
                else "ema" if f.name.startswith("ema_rank") else "other")
        kinds[kind] += f.stat().st_size
    kinds["total"] = sum(kinds.values())
    return kinds


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def rewind(run_dir: Path, step: int) -> dict:
    """The run directory as a job killed after step `step`'s checkpoint leaves it; returns the removed rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for tag in (p for p in (run_dir / "ckpt").glob("step_*") if int(p.name.split("_")[1]) > step):
        shutil.rmtree(tag)
    ckpt.write_pointer(run_dir / "ckpt", ckpt.tag_for(step))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    return {r["step"]: r for r in rows if r["step"] > step}


def saves(run_dir: Path) -> list[dict]:
    attempts = json.loads((run_dir / "goodput.json").read_text())["attempts"]
    return [{"attempt": a["attempt"], "saves": a["saves"], "save_s_each": a["save_s"] / max(1, a["saves"]),
             "startup_s": a["startup_s"], "training_s": a["training_s"]} for a in attempts]


def metrics(run_dir: Path) -> dict:
    return {r["step"]: r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                                   if line.strip())}


# ---------------------------------------------------------------------------------------------
# one recipe

def overrides_for(recipe, shards: Path, runs: Path, global_batch: int) -> list[str]:
    extra = [] if recipe.train.ema_decay > 0 else ["train.ema_decay=0.9999"]   # sampling from the EMA needs one
    return [f"data.shards={shards}", f"run.out_dir={runs}", f"train.global_batch={global_batch}",
            f"train.steps={STEPS}", f"train.save_every={SAVED_AT}", "train.log_every=1", "train.warmup_steps=1",
            "data.num_workers=0", *extra]


def predicted(recipe, world: int) -> dict:
    params = parameter_counts(recipe)
    return checkpoint_bytes(params, recipe.deepspeed.zero_stage, world, "fp32", recipe.train.ema_decay > 0)


def host_need_gib(recipe, ranks: int) -> float:
    """A rough host-memory estimate for `ranks` fp32 ranks on this machine, to decide whether a recipe can run
    here: elt-plan's fp32 row at micro-batch 1, plus per rank its EMA and DeepSpeed's separate fp32 partition
    (4Ψ/W each) and the transient of DeepSpeed's universal load (two copies of the rank's Adam moments, 8Ψ/W),
    plus 1 GiB of interpreter and libraries (masked XL: 5.4 GiB on one rank, 5.8 measured)."""
    plan = make_plan(recipe, ranks, 10_000, precision="fp32")
    row = next(r for r in plan["memory"] if (r["zero_stage"], r["checkpointing"]) ==
               (recipe.deepspeed.zero_stage, recipe.train.checkpointing))
    psi = plan["params"]["unique"]
    return ranks * (row["total"] + 16 * psi / ranks / GiB) + 1.0 * ranks     # 16 bytes per parameter, over W


def rehearse(name: str, jobs: Jobs, work: Path, args) -> dict:
    path = ROOT / "recipes" / RECIPES[name]
    base = load_recipe(path)
    res: dict = {"recipe": path.name}
    t0 = time.time()
    shards, argv = make_shards(path, work / name, args.images_per_class)
    res["data"] = {"tokenize_argv": argv, "seconds": round(time.time() - t0, 1),
                   "manifest_sample": json.loads((shards / "manifest.json").read_text())["sample"]}
    overrides = overrides_for(base, shards, work / name / "runs", args.global_batch)
    recipe = load_recipe(path, overrides)
    run_dir = recipe.run_dir
    rss = work / name / "rss"
    res["A"] = jobs.train(f"{name}-A", 2, 1, [str(path), *overrides], rss / "A")
    res["A"]["attempts"] = len(json.loads((run_dir / "goodput.json").read_text())["attempts"])   # 1: uninterrupted
    folder = run_dir / "ckpt" / ckpt.tag_for(SAVED_AT)
    res["checkpoint"] = {"world": 2, "measured": folder_bytes(folder), "plan": predicted(recipe, 2)}
    reference = rewind(run_dir, SAVED_AT)
    res["B"] = jobs.train(f"{name}-B", 1, 2, [str(run_dir / "recipe.yaml")], rss / "B")
    got = metrics(run_dir)[STEPS]
    res["step3"] = {"uninterrupted": reference[STEPS], "resumed": got,
                    "loss_rel_diff": abs(got["loss"] - reference[STEPS]["loss"]) / abs(reference[STEPS]["loss"])}
    res["universal_bytes"] = tree_bytes(folder / "universal")
    res["checkpoint_world1"] = {"world": 1, "measured": folder_bytes(run_dir / "ckpt" / ckpt.tag_for(STEPS)),
                                "plan": predicted(recipe, 1)}
    res["saves"] = saves(run_dir)
    res["log_B"] = "\n".join(p.read_text(errors="replace") for p in sorted((work / "logs").glob(f"{name}-B-*/*.log")))
    export = work / name / f"{name}.safetensors"
    res["export"] = {"wall_s": jobs.cli([sys.executable, "-m", "elt_scale.export", str(run_dir), "--ema", "--out",
                                         str(export)], "elt-export", rss / "export"), "bytes": export.stat().st_size}
    sampler = ["--sampler", "ddim"] if base.model.family == "diffusion" else []
    loops, num = (str(base.model.loops), "1") if args.ci else (f"1,{base.model.loops}", "2")   # CI: the cheapest
    samples = work / name / "samples"
    res["sample"] = {"wall_s": jobs.cli([sys.executable, "-m", "elt_scale.sample", str(export), "--loops", loops,
                                         "-n", num, "--steps", "2", *sampler, "--out", str(samples)], "elt-sample",
                                        rss / "sample"),
                     "files": sorted(p.name for p in samples.iterdir())}
    res["cli_rss"] = rss_records(rss / "export") + rss_records(rss / "sample")
    if not args.ci:        # C: resume-only on 2 ranks from B's 1-rank checkpoint (train.steps is already 3)
        res["C"] = jobs.train(f"{name}-C", 2, 1, [str(run_dir / "recipe.yaml")], rss / "C")
    res["params"] = parameter_counts(recipe)["unique"]
    return res


# ---------------------------------------------------------------------------------------------
# report

def gib(x: float) -> str:
    return f"{x / GiB:.3f}" if x > 1000 else f"{x:.3f}"


def summary(name: str, r: dict) -> list[str]:
    if "skipped" in r:
        return [f"{name}: not run: {r['skipped']}"]
    lines = [f"{name} ({r['recipe']}, {r['params'] / 1e6:.1f}M params)"]
    for phase in ("A", "B", "C"):
        if phase in r:
            ranks = ", ".join(f"{x['kind']} {x['rank']}@{x['node']}: {x['peak_rss_gib']:.2f} GiB ({x['wall_s']:.0f} s)"
                              for x in r[phase]["rss"])
            lines.append(f"  {phase}: {r[phase]['wall_s']:.0f} s job, {r[phase]['restarts']} restart(s); peak RSS {ranks}")
    for key in ("checkpoint", "checkpoint_world1"):
        c = r[key]
        lines.append(f"  checkpoint bytes (world {c['world']}): measured {c['measured']['total']:,} "
                     f"(module {c['measured']['module']:,}, optimizer {c['measured']['optimizer']:,}, ema "
                     f"{c['measured']['ema']:,}, other {c['measured']['other']:,}); elt-plan {c['plan']['total']:,.0f}"
                     f" -> measured/plan {c['measured']['total'] / c['plan']['total']:.4f}")
    lines.append(f"  universal conversion: {r['universal_bytes']:,} bytes")
    s3 = r["step3"]
    lines.append(f"  step 3 loss: uninterrupted {s3['uninterrupted']['loss']:.8f}, resumed {s3['resumed']['loss']:.8f}"
                 f" (rel diff {s3['loss_rel_diff']:.2e})")
    lines.append("  saves: " + "; ".join(f"attempt {s['attempt']}: {s['saves']} x {s['save_s_each']:.1f} s, start-up "
                                         f"{s['startup_s']:.0f} s" for s in r["saves"]))
    lines.append(f"  export {r['export']['wall_s']:.1f} s ({r['export']['bytes']:,} bytes), sample "
                 f"{r['sample']['wall_s']:.1f} s; " + ", ".join(f"{x['kind']} {x['peak_rss_gib']:.2f} GiB"
                                                               for x in r["cli_rss"]))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="masked", help="comma-separated: masked, diffusion")
    p.add_argument("--global-batch", type=int, default=2, help="train.global_batch of the rehearsal (2 ranks)")
    p.add_argument("--images-per-class", type=int, default=2, help="images in each of the tree's 2 classes")
    p.add_argument("--ci", action="store_true", help="the CI cut: skip phase C (resume-only memory on 2 ranks)")
    p.add_argument("--force", action="store_true", help="run a recipe even if its memory estimate exceeds what is free")
    p.add_argument("--work", default=None, help="keep everything here (default: a temporary folder, removed)")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds one Slurm job may take")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if unknown := [n for n in names if n not in RECIPES]:
        p.error(f"--recipes {','.join(unknown)}: allowed: {', '.join(RECIPES)}")
    from tests.slurm_cluster import LocalSlurm, missing_slurm
    if why := missing_slurm():
        print(f"rehearsal: {why}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="elt-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"meta": device_facts(), "results": {}}
    try:
        with LocalSlurm(work / "slurm") as cluster:
            jobs = Jobs(cluster, work, args.job_timeout)
            for name in names:
                result["results"][name] = one(name, jobs, work, args)
                print("\n".join(summary(name, result["results"][name])), flush=True)
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def one(name: str, jobs: Jobs, work: Path, args) -> dict:
    path = ROOT / "recipes" / RECIPES[name]
    recipe = load_recipe(path, overrides_for(load_recipe(path), work, work, args.global_batch))
    need = max(host_need_gib(recipe, 2), host_need_gib(recipe, 1))        # A and C on 2 ranks, B on 1
    free = available_gib()
    if need > free and not args.force:
        return {"skipped": f"needs ~{need:.0f} GiB of host memory (fp32, 2 ranks or 1), {free:.0f} GiB available "
                           f"(--force to try)"}
    return rehearse(name, jobs, work, args)


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


if __name__ == "__main__":
    sys.exit(main())
