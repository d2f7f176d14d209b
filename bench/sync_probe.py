"""elt-train with CUDA's sync debug mode on: every operation that makes the host wait for the GPU is counted
by the Python line that caused it, and the counts are written to $SYNC_REPORT (JSON) when training returns.

    SYNC_REPORT=sync.json python bench/sync_probe.py RECIPE.yaml key=value ...

Used by bench/gpu_check.py; a count of about one per step at a line means a sync in the step loop.
On a machine without CUDA the same report counts the reads of a tensor's values into Python (`item`,
`tolist`, `float()`, `int()`, `bool()`, `numpy`, `cpu`): where the tensor lives on a GPU, each is a host sync
(bench/host_syncs.py turns two such reports into syncs per step)."""
from __future__ import annotations

import collections
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))   # after $PYTHONPATH: bench/host_syncs.py --source

import torch  # noqa: E402

counts: collections.Counter = collections.Counter()
_show = warnings.showwarning


def _count(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        counts[f"{filename}:{lineno}"] += 1
    else:
        _show(message, category, filename, lineno, file, line)


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def count_host_reads() -> None:
    """Wrap the Tensor methods that hand a value to Python; each call is counted at its caller's line."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1)
            counts[f"{caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)


def main() -> int:
    from elt_scale.train import main as train_main

    warnings.showwarning = _count
    warnings.simplefilter("always")
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    else:
        count_host_reads()
    try:
        return train_main(sys.argv[1:])
    finally:
        if os.environ.get("SYNC_REPORT"):
            Path(os.environ["SYNC_REPORT"]).write_text(json.dumps(dict(counts.most_common()), indent=1))


if __name__ == "__main__":
    sys.exit(main())
