"""Storage that fails for real, on loopback, for tests (tests/unit/test_storage_io.py,
tests/e2e/test_storage_faults.py, tests/cluster/test_slurm_faults.py).

    ShardServer(dir)       `python -m http.server` in its own process on a fixed port: kill() it, start() it
                           again on the same port (what the issue's user did to a running job)
    FaultyServer(dir)      a threaded http.server in this process that serves the directory, except on cue:
                           unavailable(path, 503, seconds) answers 503 for that long from the first request,
                           stall(path, bytes) sends the first bytes of the body and then nothing, once
Both record how often each path was asked for (`hits`), so a test can tell that its fault was met.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/manifest.json", timeout=2).read()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


class ShardServer:
    def __init__(self, directory: Path, port: int | None = None):
        self.directory, self.port = Path(directory), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ShardServer":
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                                      "--directory", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_serving(self.url)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "FaultyServer"

    def log_message(self, *args) -> None:          # quiet
        pass

    def do_GET(self) -> None:
        s, path = self.server, self.path.lstrip("/")
        with s.lock:
            s.hits[path] += 1
            first = s.first_hit.setdefault(path, time.monotonic())
            unavailable, stall = s.unavailable.get(path), s.stalls.pop(path, None)
        if unavailable and time.monotonic() - first < unavailable[1]:
            self.send_error(unavailable[0])
        elif stall is not None:
            self._send_part_then_stall(path, stall)
        else:
            super().do_GET()

    def _send_part_then_stall(self, path: str, nbytes: int) -> None:
        data = (Path(self.directory) / path).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:nbytes])
        self.wfile.flush()
        self.server.stopped.wait()                 # hold the connection open, silent, until the server stops


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.hits: collections.Counter = collections.Counter()
        self.first_hit: dict[str, float] = {}
        self.unavailable: dict[str, tuple[int, float]] = {}
        self.stalls: dict[str, int] = {}

    def unavailable_for(self, path: str, status: int, seconds: float) -> None:
        self.unavailable[path] = (status, seconds)

    def stall(self, path: str, nbytes: int) -> None:
        self.stalls[path] = nbytes

    def __enter__(self) -> "FaultyServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        wait_until_serving(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A real small file system at `path` (root: `mount -t tmpfs`), unmounted afterwards: a disk that fills."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot mount a {size} tmpfs at {path} ({r.stderr.strip()}); these tests need root, "
                           f"as CI has")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
