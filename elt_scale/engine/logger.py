"""What a run reports: metrics.jsonl (always), wandb (offline/online), run_info.json, throughput.

Only rank 0 writes. metrics.jsonl holds each step at most once across preemptions: on resume at step S
rows after S (logged before the job died, but not covered by the checkpoint) are dropped, because the
resumed run logs those steps again."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from ..config import recipe_to_dict
from ..models import param_counts
from ..models.flops import sequence_length, train_flops_per_sample
from .ds_internals import full_numel


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def new_wandb_id() -> str:
    return uuid.uuid4().hex[:12]


def init_wandb(recipe, run_id: str):
    """wandb run (resumed by id) or None. The WANDB_MODE environment variable, wandb's own switch,
    overrides logging.wandb_mode (tests set it to disabled)."""
    mode = os.environ.get("WANDB_MODE", recipe.logging.wandb_mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print(f"elt-train: WARNING logging.wandb_mode={mode} but wandb is not installed "
              "(pip install 'elt-scale[wandb]'); logging to metrics.jsonl only", file=sys.stderr)
        return None
    return wandb.init(project=recipe.logging.wandb_project, name=recipe.run.name, id=run_id, resume="allow",
                      mode=mode, dir=str(recipe.run_dir), config=recipe_to_dict(recipe))


class Throughput:
    """samples/s, tokens/s, achieved TFLOP/s (ELT FLOPs: N layers × L loops, teacher pass once) and MFU."""

    def __init__(self, recipe, world: int):
        self.flops_per_sample = train_flops_per_sample(recipe)
        self.tokens_per_sample = sequence_length(recipe.model)
        self.peak = recipe.logging.peak_tflops * world
        self.t, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def read(self) -> dict:
        now = time.perf_counter()
        sps = self.samples / max(now - self.t, 1e-9)
        self.t, self.samples = now, 0
        tflops = sps * self.flops_per_sample / 1e12
        out = {"samples_per_s": sps, "tokens_per_s": sps * self.tokens_per_sample, "tflops": tflops}
        if self.peak > 0:
            out["mfu"] = tflops / self.peak
        out["peak_mem_gb"] = peak_memory_gb()
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # Linux: KiB -> GiB (host RSS)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(path: Path, recipe, model, world: int, ds_config: dict, wandb_id: str) -> dict:
    import deepspeed
    counts = param_counts(model, numel=full_numel)      # ZeRO-3 leaves placeholders on the module
    unique, effective = counts["unique"], counts["effective"]
    info = {"world_size": world, "zero_stage": recipe.deepspeed.zero_stage,
            "global_batch": ds_config["train_batch_size"], "micro_batch": recipe.train.micro_batch,
            "grad_accum": recipe.train.grad_accum, "bf16": ds_config["bf16"]["enabled"],
            "unique_params": unique, "effective_params": effective,
            "train_flops_per_sample": train_flops_per_sample(recipe), "wandb_id": wandb_id,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__},
            "git_commit": git_commit(), "ds_config": ds_config}
    Path(path).write_text(json.dumps(info, indent=1))
    return info


class Reporter:
    """Rank 0's voice: console lines, the progress bar, metrics.jsonl and wandb. On every other rank each
    method does nothing, so the trainer calls them without asking which rank it is."""

    def __init__(self, recipe, rank: int, start_step: int, wandb_id: str):
        self.on, self.recipe, self.start_step = rank == 0, recipe, start_step
        self.metrics = self.wandb = self._bar = None
        if self.on:
            self.metrics = MetricsLog(recipe.run_dir, resume_step=start_step)
            self.wandb = init_wandb(recipe, wandb_id)

    @property
    def bar(self):
        """Created at the first step, so that the start-up lines come before it."""
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=self.recipe.train.steps, initial=self.start_step, desc=self.recipe.run.name,
                             unit="step")
        return self._bar

    def say(self, text: str, error: bool = False) -> None:
        if self.on:
            print(f"elt-train: {text}", file=sys.stderr if error else sys.stdout, flush=True)

    def log(self, row: dict) -> None:
        """One training step's row (every rank computed it; rank 0 writes it)."""
        if self.on:
            self.metrics.write(row)
            if self.wandb:
                self.wandb.log(row, step=row["step"])
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", L_int=row.get("l_int"))

    def log_eval(self, step: int, rows: list[dict], grids: dict[str, Path], eval_s: float) -> None:
        """An evaluation: one metrics row per loop spec, the grids as wandb images."""
        if not self.on:
            return
        for row in rows:
            self.metrics.write(row)
        if self.wandb:
            import wandb
            logged = {f"eval/{k}_{r['eval_L']}": v for r in rows for k, v in r.items()
                      if k not in ("step", "eval_L", "eval_s")}
            logged.update({f"eval/grid_{label}": wandb.Image(str(p)) for label, p in grids.items()})
            self.wandb.log({**logged, "eval/eval_s": eval_s}, step=step)

    def tick(self) -> None:
        if self.on:
            self.bar.update(1)

    def close(self) -> None:
        if self.on:
            if self._bar is not None:
                self._bar.close()
            self.metrics.close()
            if self.wandb:
                self.wandb.finish()
