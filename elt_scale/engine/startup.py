"""Start-up waits, bounded and said aloud. Before step 1 neither the step watchdog (not armed yet) nor the
heartbeats (they beat from a thread while the main thread sits) can tell a slow start from a stuck one, so
every wait of train.py's start-up that can block on something outside this process runs inside `waiting`:

    the rendezvous and DeepSpeed's process group (init_distributed: its CPU collectives op is loaded there)
    DeepSpeed's engine (deepspeed.initialize: the optimizer ops it JIT-loads)

While the block runs, a thread says every `say_every_s` what it waits for and how long, and past
train.startup_timeout_s it gives up: one line, exit 124 (the launcher restarts the job, as for a stalled step).
One-rank solo work (a checkpoint conversion, reference statistics) has its own deadline (distributed.solo).

Stale extension locks. torch.utils.cpp_extension guards each JIT op's build directory with an empty `lock`
file, taken on every load, built or not; a process killed while holding it (a launcher SIGTERMs its ranks
when one fails at start-up) leaves the file, and every later load on that cache sleeps on it forever, silently
(PITFALLS.md). The file names no owner, so a lock counts as stale when it was there before this wait began and
nothing in its directory has changed for train.stale_lock_s: a live holder is either loading (under a second)
or building (the compiler writes into the directory; one compile of one file can take minutes on a loaded
machine, hence the generous default). A lock taken after the wait began is never touched: it may be this
process's own. A stale lock is taken over, which is what the waiting loader needs: torch's waiter polls for
the file to go and then loads the op the dead holder had built. One line says which file was removed."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from .watchdog import WATCHDOG_EXIT_CODE

STARTUP_EXIT_CODE = WATCHDOG_EXIT_CODE


def extensions_root() -> Path:
    """Where torch keeps JIT-built ops (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def quiet_s(directory: Path, now: float) -> float:
    """Seconds since anything in `directory` (itself included, not below) last changed."""
    newest = directory.stat().st_mtime
    for entry in directory.iterdir():
        with contextlib.suppress(OSError):
            newest = max(newest, entry.lstat().st_mtime)
    return now - newest


def extension_locks(root: Path) -> list[Path]:
    """Every op's lock under the extensions root (<root>/<op>/lock and <root>/<py_cpu|py_cuXY>/<op>/lock)."""
    if not root.is_dir():
        return []
    return sorted([*root.glob("*/lock"), *root.glob("*/*/lock")])


def take_over_stale_locks(root: Path, stale_after_s: float, born_before: float, say=None) -> list[Path]:
    """Remove the locks taken before `born_before` (a time.time()) whose directory has been quiet for
    `stale_after_s` -> those this process removed."""
    removed, now = [], time.time()
    for lock in extension_locks(root):
        try:
            quiet = quiet_s(lock.parent, now)
            if quiet < stale_after_s or lock.stat().st_mtime >= born_before:
                continue
            lock.unlink()                  # another rank of this host may have got there first: then not ours
        except OSError:
            continue
        removed.append(lock)
        (say or _say)(f"removed a stale lock {lock} (nothing in its directory changed for {quiet:.0f} s; the process "
                      f"that took it is gone) so that the DeepSpeed op it guards can load")
    return removed


def live_locks(root: Path) -> list[Path]:
    return [lock for lock in extension_locks(root) if lock.exists()]


def _say(line: str) -> None:
    print(f"elt-train: rank {os.environ.get('RANK', '0')}: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def waiting(what: str, bound_s: float, stale_after_s: float, say_every_s: float = 30.0, poll_s: float = 1.0):
    """Run the block with a watcher: stale extension locks taken over at once and every `poll_s`; every
    `say_every_s` one line naming `what` (and any extension lock in the way); past `bound_s` (0 = never)
    one line and exit STARTUP_EXIT_CODE. os._exit: the main thread is blocked where no exception reaches."""
    root, done, start, born_before = extensions_root(), threading.Event(), time.monotonic(), time.time()
    take_over_stale_locks(root, stale_after_s, born_before)

    def watch():
        next_say = say_every_s
        while not done.wait(poll_s):
            take_over_stale_locks(root, stale_after_s, born_before)
            waited = time.monotonic() - start
            locks = live_locks(root)
            held = f"; extension lock(s) in the way: {', '.join(map(str, locks))}" if locks else ""
            if bound_s and waited > bound_s:
                _say(f"gave up waiting for {what} after {waited:.0f} s (train.startup_timeout_s={bound_s:g}){held}; "
                     f"exiting {STARTUP_EXIT_CODE}")
                os._exit(STARTUP_EXIT_CODE)
            if waited >= next_say:
                _say(f"still waiting for {what} ({waited:.0f} s{f' of {bound_s:g}' if bound_s else ''}){held}")
                next_say += say_every_s

    thread = threading.Thread(target=watch, name="startup-wait", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
