"""Helpers shared by the benchmarks: device facts, the measured matmul ceiling, timing, JSON out."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:        # run as `python bench/x.py` from anywhere, no install needed
    sys.path.insert(0, str(ROOT))


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def commit() -> str:
    """The commit being measured: $ELT_COMMIT (the GPU machine gets the tree without .git) or git's."""
    if os.environ.get("ELT_COMMIT"):
        return os.environ["ELT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "argv": sys.argv[1:]}
    if on_gpu():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                     cuda=torch.version.cuda)
    else:
        facts.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    try:
        import deepspeed
        facts["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return facts


def matmul_peak_tflops(size: int | None = None, repeats: int = 10) -> dict:
    """The practical ceiling, measured in this run: a square bf16 matmul (fp32 on CPU) on random data,
    median of `repeats` after warm-up. MFU is reported against this, not against a datasheet."""
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    size = size or (8192 if on_gpu() else 512)
    dev = "cuda" if on_gpu() else "cpu"
    a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
    times = []
    for i in range(repeats + 3):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    del a, b
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * size**3 / median / 1e12}


def free_memory() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None


def write_json(path: str | Path | None, data: dict) -> None:
    """Rewritten after every case, so a run stopped by its time limit still leaves what it measured."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


class Deadline:
    """Skip what would not fit: benchmarks on a lent GPU must end inside their slot."""

    def __init__(self, seconds: float | None):
        self.end = time.time() + seconds if seconds else None

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.time()

    def passed(self) -> bool:
        return self.left() <= 0
