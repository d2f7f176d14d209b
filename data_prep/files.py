"""Walking an input tree safely and turning file names into safe, unique sample keys.

Inputs come from other people's archives: a symlink may point anywhere, a file name may hold '..',
a newline or a leading '-'. Nothing here follows a link out of the tree, and every key is built by
`elt_scale.data.shards.safe_key` and then made unique over the whole (sorted) input list, so every
rank of a split job derives the same keys."""
from __future__ import annotations

import os
from pathlib import Path

from elt_scale.data.shards import safe_key

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".avi", ".mp4", ".mkv", ".mov", ".webm"}


def inside(path: str | Path, root: str | Path) -> bool:
    """True when `path`, with every link resolved, lies inside `root` (also resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def walk_files(root: str | Path, extensions: set[str], skipped: list[dict]) -> list[Path]:
    """Sorted files under `root` with one of `extensions` (case-insensitive).

    Symlinked files that resolve inside the tree are kept; ones that point outside it (or dangle) are
    appended to `skipped` with the reason. Symlinked directories are never followed (a link loop or a
    link to '/' must not turn a walk into a crawl); they are listed in `skipped` too. os.scandir's
    entries know their type without a stat per file, which matters for 1.28M files on a cluster FS."""
    root = Path(root)
    found, stack = [], [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_symlink():
                if e.is_dir():
                    skipped.append({"source": _rel(e.path, root), "reason": "symlinked directory, not followed"})
                    continue
                if Path(e.name).suffix.lower() not in extensions:
                    continue
                if not (inside(e.path, root) and os.path.exists(e.path)):
                    where = "points outside the input tree" if not inside(e.path, root) else "dangles"
                    skipped.append({"source": _rel(e.path, root),
                                    "reason": f"symlink to {os.readlink(e.path)!r} {where}"})
                    continue
                found.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif Path(e.name).suffix.lower() in extensions:
                found.append(Path(e.path))
    return sorted(found)


def _rel(path, root) -> str:
    return os.path.relpath(path, root)


def unique_keys(names: list[str]) -> list[str]:
    """Safe keys for `names` (in order), unique: a clash gets `_1`, `_2`, ... appended.

    Call with the full sorted input list (before any rank slicing) so every rank agrees."""
    used: set[str] = set()
    keys = []
    for name in names:
        base = safe_key(name)
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def strip_suffix(rel: str) -> str:
    """'cls/a.b.JPEG' -> 'cls/a.b' : the key keeps the class folder, so it stays unique across classes."""
    head, _, tail = rel.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail.lstrip(".") else tail
    return f"{head}/{stem}" if head else stem
