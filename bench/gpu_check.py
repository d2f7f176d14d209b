"""GPU correctness run (issue 25, step 1): the current code, end to end, on one GPU, before any timing.

    python bench/gpu_check.py --out OUT            # on the GPU machine (bench/gpu.sh's environment)
    python bench/gpu_check.py --out OUT --cpu      # the same flow, shortened, to check the script here

For both digits recipes (masked and diffusion), in parallel on the one GPU: train with ILSD, bf16, the
compiled block, per-loop checkpointing and in-training evaluation (eval.every), a checkpoint every 100
steps; rank 0 SIGKILLs itself as step 251 starts (ELT_FAULT die_at, a real kill -9); the same command then
resumes from step 200 and finishes. The resumed launch runs under CUDA's sync debug mode
(bench/sync_probe.py). Then ELT.from_pretrained + generate on CUDA and elt-sample at two loop specs.

Checks (each PASS/FAIL in OUT/check.md and OUT/check.json): the loss falls; no logged value is NaN/inf;
the killed launch died by SIGKILL after its step-200 checkpoint; the resumed losses for steps 201-250
match the ones logged before the kill; metrics.jsonl holds each step once; an evaluation row per L at
every eval.every; generate is deterministic for a seed; elt-sample writes an ADM .npz per loop spec.
Host syncs are reported by source line, not judged (one read per step after the step is by design)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"masked": "recipes/digits_masked.yaml", "diffusion": "recipes/digits_diffusion.yaml"}


def sizes(cpu: bool) -> dict:
    if cpu:   # the flow only: no compile, a few steps
        return dict(steps=30, save=10, kill=26, every=10, log=5, compile="false", num=20)
    return dict(steps=300, save=100, kill=251, every=100, log=10, compile="true", num=64)


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                           env={**os.environ, **(env or {})})
    return p.returncode, time.perf_counter() - t0


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "eval_L" not in r}


def finite(rows: list[dict]) -> bool:
    # a value logged as null is a non-finite float (MetricsLog writes inf/NaN as null)
    return all(v is not None for r in rows for k, v in r.items() if k not in ("mfu",))


def check_family(family: str, out: Path, s: dict, results: dict) -> None:
    work = out / family
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    runs = Path(os.environ.get("CHECK_RUNS", "/tmp/gpu_check_runs"))
    run_dir = runs / f"gpu_{family}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "bench/sync_probe.py", FAMILIES[family], f"run.out_dir={runs}", f"run.name=gpu_{family}",
           f"train.steps={s['steps']}", f"train.save_every={s['save']}", f"train.log_every={s['log']}",
           f"eval.every={s['every']}", f"train.compile={s['compile']}", "train.checkpointing=loop",
           "train.bf16=true", "logging.wandb_mode=disabled", "train.keep_last=3"]
    checks, info = {}, {}
    rc1, t1 = run(cmd, log, {"ELT_FAULT": f"die_at:0:{s['kill']}", "SYNC_REPORT": str(work / "sync_first.json")})
    info["first_launch"] = {"rc": rc1, "wall_s": round(t1, 1)}
    latest = (run_dir / "ckpt" / "latest").read_text().strip() if (run_dir / "ckpt" / "latest").exists() else None
    before = read_metrics(run_dir / "metrics.jsonl")
    shutil.copy(run_dir / "metrics.jsonl", work / "metrics_before_kill.jsonl") if before else None
    checks["killed by SIGKILL after the last checkpoint"] = (
        rc1 == -signal.SIGKILL and latest == f"step_{s['kill'] - 1 - (s['kill'] - 1) % s['save']:08d}")
    info["latest_at_kill"] = latest
    rc2, t2 = run(cmd, log, {"SYNC_REPORT": str(work / "sync_resumed.json")})
    info["resumed_launch"] = {"rc": rc2, "wall_s": round(t2, 1)}
    after = read_metrics(run_dir / "metrics.jsonl")
    shutil.copy(run_dir / "metrics.jsonl", work / "metrics.jsonl") if after else None
    checks["resumed run finished (exit 0)"] = rc2 == 0
    la, lb = losses(after), losses(before)
    steps = sorted(la)
    first, last = np.mean([la[k] for k in steps[:3]]), np.mean([la[k] for k in steps[-3:]])
    info["loss_first_last"] = [float(first), float(last)]
    checks["loss falls (last 3 logged < 0.9 x first 3)"] = bool(steps) and last < 0.9 * first
    checks["no NaN/inf logged"] = finite(before) and finite(after)
    overlap = [k for k in lb if k in la and k > s["kill"] - 1 - (s["kill"] - 1) % s["save"]]
    rel = max((abs(la[k] - lb[k]) / abs(lb[k]) for k in overlap), default=float("nan"))
    info["resume_overlap_steps"], info["resume_max_rel_loss_diff"] = overlap, rel
    checks["resumed losses match the pre-kill ones (rel < 2%)"] = bool(overlap) and rel < 0.02
    train_steps = [r["step"] for r in after if "eval_L" not in r]
    checks["each step once in metrics.jsonl"] = len(train_steps) == len(set(train_steps)) == s["steps"] // s["log"]
    evals = {(r["step"], r["eval_L"]) for r in after if "eval_L" in r}
    want = {(e, str(L)) for e in range(s["every"], s["steps"] + 1, s["every"]) for L in range(1, 5)}
    info["eval_rows"] = [r for r in after if "eval_L" in r and r["step"] == s["steps"]]
    checks["an eval row per L at every eval.every"] = want <= evals
    checks["eval grids written"] = all((run_dir / "samples" / f"step_{e:07d}" / f"grid_L{L}.png").exists()
                                       for e, L in want)

    # the Python API on CUDA: load, generate twice with one seed
    api = work / "api.json"
    code = (f"import json, numpy as np, torch; from elt_scale import ELT; m = ELT.from_pretrained({str(run_dir)!r}); "
            "a = m.generate(classes=list(range(10)), loops=1, seed=0); b = m.generate(classes=list(range(10)), loops=1, seed=0); "
            "c = m.generate(classes=list(range(10)), loops=4, seed=0); "
            f"json.dump(dict(device=str(m.device), dtype=str(m.dtype), shape=list(a.shape), uint8=str(a.dtype), "
            "same_seed_equal=bool((a == b).all()), l1_vs_l4_differ=bool((a != c).any())), open(" + repr(str(api)) + ", 'w')); "
            f"np.save({str(work / 'api_L4.npy')!r}, c)")
    rc3, _ = run([sys.executable, "-c", code], log, {"PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    a = json.loads(api.read_text()) if api.exists() else {}
    info["api"] = a
    want_dev = "cpu" if s["compile"] == "false" else "cuda"
    checks["ELT.from_pretrained + generate on the device, uint8, deterministic"] = (
        rc3 == 0 and a.get("device", "").startswith(want_dev) and a.get("uint8") == "uint8" and a.get("same_seed_equal"))

    # elt-sample at two loop specs
    samples = work / "samples"
    rc4, t4 = run([sys.executable, "-m", "elt_scale.sample", str(run_dir), "--loops", "1,4", "-n", str(s["num"]),
                   "--out", str(samples)], log)
    info["elt_sample"] = {"rc": rc4, "wall_s": round(t4, 1)}
    npz = sorted(p.name for p in samples.glob("*.npz")) if samples.exists() else []
    checks["elt-sample --loops 1,4 writes samples_L1/L4 .npz"] = rc4 == 0 and len(npz) == 2
    digits = {}
    for p in sorted(samples.glob("*.npz")) if samples.exists() else []:
        r = subprocess.run([sys.executable, "-m", "elt_scale.evaluate", "digits", str(p)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        digits[p.stem] = r.stdout.strip().splitlines()[-1:] if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-300:]}"
    info["digits_metrics"] = digits
    for name in ("sync_first.json", "sync_resumed.json"):
        if (work / name).exists():
            info[name.removesuffix(".json")] = dict(list(json.loads((work / name).read_text()).items())[:12])
    results[family] = {"checks": checks, "info": info}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cpu", action="store_true", help="shortened flow without compile, to check the script")
    ap.add_argument("--families", default="masked,diffusion")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    s, results, t0 = sizes(args.cpu), {}, time.perf_counter()
    threads = [threading.Thread(target=check_family, args=(f, args.out, s, results)) for f in args.families.split(",")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [f"# GPU correctness run ({'cpu flow check' if args.cpu else 'gpu'}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"commit {os.environ.get('COMMIT', '?')}, {time.perf_counter() - t0:.0f} s", ""]
    ok = True
    for fam, r in results.items():
        lines.append(f"## {fam}")
        for name, passed in r["checks"].items():
            ok &= bool(passed)
            lines.append(f"- {'PASS' if passed else 'FAIL'} {name}")
        lines.append("```\n" + json.dumps(r["info"], indent=1, default=str) + "\n```")
    ok &= len(results) == len(threads)
    (args.out / "check.md").write_text("\n".join(lines) + "\n")
    (args.out / "check.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
