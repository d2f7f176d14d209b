"""What a run reports: metrics.jsonl (always), wandb (offline/online), run_info.json, throughput.

Only rank 0 writes. metrics.jsonl holds each step at most once across preemptions: on resume at step S
rows after S (logged before the job died, but not covered by the checkpoint) are dropped, because the
resumed run logs those steps again. Each row is one write of a whole line; a write that fails (disk full,
quota) is cut back off the file, and a torn last line (a crash mid-write) is dropped on resume, so the
file always parses. A failed write is kept in `Reporter.write_error`: the trainer stops all ranks on it."""
from __future__ import annotations

import errno
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
from ..files import atomic_write_text
from ..models import param_counts
from ..flops import sequence_length, train_flops_per_sample
from .ds_internals import full_numel


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (torn by a crash or a full disk) is dropped
    with a note naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"elt-train: {path}:{n}: dropping a torn line ({line[:60]!r}...)", file=sys.stderr)
    return rows


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            keep = [row for row in read_rows(self.path) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size

    def write(self, row: dict) -> None:
        """One whole line or nothing: a failed or short write is truncated away, then raised."""
        data = (json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n").encode()
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write (file system full?)", str(self.path))
        except OSError:
            os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)


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
            "threads": torch.get_num_threads(),           # per rank (elt_scale.dist.set_threads)
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__},
            "git_commit": git_commit(), "ds_config": ds_config}
    atomic_write_text(path, json.dumps(info, indent=1))
    return info


class Reporter:
    """Rank 0's voice: console lines, the progress bar, metrics.jsonl and wandb. On every other rank each
    method does nothing, so the trainer calls them without asking which rank it is."""

    def __init__(self, recipe, rank: int, start_step: int, wandb_id: str):
        self.on, self.recipe, self.start_step = rank == 0, recipe, start_step
        self.metrics = self.wandb = self._bar = None
        self.write_error: str | None = None       # the first failed metrics.jsonl write (rank 0)
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
        if self.on:                      # through tqdm: a line of its own, not glued to the bar's
            from tqdm import tqdm
            out = sys.stderr if error else sys.stdout
            tqdm.write(f"elt-train: {text}", file=out)
            out.flush()

    def log(self, row: dict) -> None:
        """One training step's row (every rank computed it; rank 0 writes it)."""
        if self.on:
            self._write(row)
            if self.wandb:
                self.wandb.log(row, step=row["step"])
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", L_int=row.get("l_int"))

    def log_eval(self, step: int, rows: list[dict], grids: dict[str, Path], eval_s: float) -> None:
        """An evaluation: one metrics row per loop spec, the grids as wandb images."""
        if not self.on:
            return
        for row in rows:
            self._write(row)
        if self.wandb:
            import wandb
            logged = {f"eval/{k}_{r['eval_L']}": v for r in rows for k, v in r.items()
                      if k not in ("step", "eval_L", "eval_s")}
            logged.update({f"eval/grid_{label}": wandb.Image(str(p)) for label, p in grids.items()})
            self.wandb.log({**logged, "eval/eval_s": eval_s}, step=step)

    def log_eval_error(self, step: int, error: str, eval_s: float) -> None:
        """A failed evaluation: one metrics row naming the error, where its rows would have been."""
        if not self.on:
            return
        self._write({"step": step, "eval_error": error, "eval_s": eval_s})
        if self.wandb:
            self.wandb.log({"eval/failed": 1}, step=step)

    def _write(self, row: dict) -> None:
        """A row to metrics.jsonl; a failed write is kept (the trainer stops every rank on it), not raised,
        and later rows are not attempted: the file ends with the last whole row."""
        if self.write_error is not None:
            return
        try:
            self.metrics.write(row)
        except OSError as e:
            self.write_error = f"{self.metrics.path}: {e.strerror or e} at step {row.get('step')}"

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
