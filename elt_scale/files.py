"""Small files the next start reads (recipe.yaml, run_info.json, client_state.json, ckpt/latest): written to a
temporary name, flushed to disk and renamed, so that a full disk, a quota or a kill mid-write leaves the old
file (or none), never a torn one. A failed write removes its temporary file and raises."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def free_space(path: str | Path) -> str:
    """Free space on the file system of `path` (or of its nearest existing parent), for error messages."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


WRITE_FAILURES = ("unexpected pos", "failed writing file", "file write failed", "No space left", "Disk quota",
                  "Input/output error")


def is_write_error(e: BaseException) -> bool:
    """An OSError, or a RuntimeError in which torch.save reports one (a full disk reads "[enforce fail at
    inline_container.cc:…] . unexpected pos …" or "PytorchStreamWriter failed writing file …"). Anything else
    raised while saving is a bug or a crash, not a write failure."""
    if isinstance(e, OSError):
        return True
    if isinstance(e.__cause__ or e.__context__, OSError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in WRITE_FAILURES)
