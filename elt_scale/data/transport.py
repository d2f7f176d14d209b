"""Reading from storage that comes and goes: a transport fault is retried, a content fault is not.

A shard's (or the manifest's) bytes come from a local file (webdataset's gopen), from curl for an http(s)
URL, or from a shell command for a `pipe:` spec. What can go wrong is one of two kinds:

  transport  the bytes did not arrive: connection refused or reset, a name that does not resolve, a
             timeout, HTTP 408/425/429/5xx, curl cut off mid-body, a `pipe:` command exiting non-zero, a
             read that receives no byte for data.io_timeout_s (a stall), a local EIO, ESTALE, ETIMEDOUT,
             ENOTCONN ... -> TransientError. The caller reopens the source and continues where it broke
             (webds.shard_samples: at the next sample), waiting with exponential backoff and jitter, until
             data.io_retry_s have passed without progress; then StorageUnavailable, and the trainer exits
             STORAGE_EXIT_CODE, which restarts the job from its last checkpoint (slurm/train_large.sh,
             torchrun --max-restarts).
  content    the bytes arrived and are wrong, or the storage says the object is not there: a malformed
             tar, a refused member, a shard that ends early after a complete read, HTTP 404 (and every
             other 4xx but 408/425/429), a missing local file -> OSError or the tar reader's error: the
             loader's skip-and-count (or data.strict) path. A 404 for a shard the manifest lists is taken
             as "gone", like a deleted file: today's object stores (S3, GCS, Azure) are strongly
             consistent, and retrying a deleted shard would stall the run for data.io_retry_s per restart.
             A `pipe:` command cannot say why it failed, so its every non-zero exit is a transport fault.

Why not webdataset's gopen for URLs: its curl (`--retry 30`) does not retry a refused connection, and
neither curl's retry nor anything else can rewind a stream the tar reader has already consumed; its pipes
raise "exit N" without the reason and block in read() for as long as the source is silent. Here curl
runs once per attempt (`--fail --show-error`: the HTTP status is in its one error line), every retry is
ours and resumes at a sample, and reads from a command wait with a deadline (poll on its pipe). A stuck
local file system cannot be timed out from Python: the step watchdog (engine/watchdog.py) covers it.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing as mp
import os
import random
import re
import select
import subprocess
import time

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

STORAGE_EXIT_CODE = 69     # EX_UNAVAILABLE: storage unreachable for data.io_retry_s; restart from the checkpoint

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                              errno.ECONNABORTED, errno.ENOTCONN, errno.EHOSTUNREACH, errno.EHOSTDOWN,
                              errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET})
# curl exit statuses that say the transport failed (man curl, EXIT CODES); 22 is decided by the HTTP status
CURL_TRANSIENT = {5: "proxy name not resolved", 6: "host name not resolved", 7: "could not connect",
                  16: "HTTP/2 error", 18: "transfer cut off mid-body", 28: "timed out", 35: "TLS handshake failed",
                  52: "empty reply", 55: "send failed", 56: "receive failed", 92: "HTTP/2 stream error"}
HTTP_TRANSIENT = frozenset({408, 425, 429})   # and every 5xx
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 10.0     # at most 10 s late after the storage is back


class TransientError(Exception):
    """The bytes did not arrive for a transport reason; reopening the source later may work."""

    def __init__(self, url: str, cause: str):
        super().__init__(f"{url}: {cause}")
        self.url, self.cause = url, cause


class StorageUnavailable(RuntimeError):
    """A source stayed unreachable for data.io_retry_s. Not an OSError: nothing may take it for a bad shard."""

    def line(self) -> str:
        """The one-line message, also when a DataLoader worker re-raised it with its traceback in front."""
        text = str(self).strip().splitlines()[-1]
        return text.split(f"{type(self).__name__}: ", 1)[-1]


@dataclasses.dataclass(frozen=True)
class IoPolicy:
    timeout_s: float = 60.0      # data.io_timeout_s: a read that receives no byte this long is a stall
    retry_s: float = 600.0       # data.io_retry_s: how long one source may fail without progress


def io_policy(data_config) -> IoPolicy:
    return IoPolicy(data_config.io_timeout_s, data_config.io_retry_s)


class IoStats:
    """Bytes read, retries, seconds slept before retries, and reads in an outage right now; shared with
    DataLoader workers (fork), so the main process (metrics, the step watchdog) sees theirs."""

    def __init__(self):
        self._bytes, self._retries, self._wait = mp.Value("q", 0), mp.Value("l", 0), mp.Value("d", 0.0)
        self._outages = mp.Value("l", 0)

    bytes_read = property(lambda self: self._bytes.value)
    retries = property(lambda self: self._retries.value)
    wait_s = property(lambda self: self._wait.value)
    in_outage = property(lambda self: self._outages.value > 0)

    def outage(self, delta: int) -> None:
        with self._outages.get_lock():
            self._outages.value += delta

    def add_bytes(self, n: int) -> None:
        with self._bytes.get_lock():
            self._bytes.value += n

    def add_retry(self, wait_s: float) -> None:
        with self._retries.get_lock():
            self._retries.value += 1
        with self._wait.get_lock():
            self._wait.value += wait_s


def transient_or_same(e: OSError, url: str) -> Exception:
    """A local read error: TransientError for errnos that mean the storage, not the file, failed."""
    if e.errno in TRANSIENT_ERRNOS:
        return TransientError(url, f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}")
    return e


def curl_argv(url: str, timeout_s: float) -> list[str]:
    # no --retry: a retry is ours, resumes at a sample, and also covers a refused connection
    return ["curl", "--fail", "--silent", "--show-error", "--location", "--connect-timeout", f"{timeout_s:g}", url]


class ShardStream:
    """A source's bytes for the tar reader: read(n) returns n bytes, or fewer at the end. A local read
    error or a stall raises TransientError at once; a command's exit status is judged by `check` once its
    output has ended (curl cut off at a tar member boundary looks like a clean end until then)."""

    def __init__(self, url: str, timeout_s: float, stats: IoStats | None = None):
        self.url, self.timeout_s, self.stats = url, timeout_s, stats
        self.eof, self.proc, self.file = False, None, None
        if url.startswith(("http://", "https://")):
            self.proc = subprocess.Popen(curl_argv(url, timeout_s), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         bufsize=0)
        elif url.startswith("pipe:"):           # as webdataset's gopen_pipe, unbuffered so that poll() tells
            self.proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=0)
        else:
            try:
                self.file = gopen(url)
            except OSError as e:
                raise transient_or_same(e, url) from None
        if self.proc is not None:
            self.poller = select.poll()
            self.poller.register(self.proc.stdout, select.POLLIN)

    def __str__(self) -> str:                  # webdataset's tar reader names the stream in its errors
        return self.url

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        data = self._read_command(n) if self.proc is not None else self._read_file(n)
        if len(data) < n:
            self.eof = True
        if self.stats is not None:
            self.stats.add_bytes(len(data))
        return data

    def _read_file(self, n: int) -> bytes:
        try:
            return self.file.read(n)
        except OSError as e:
            raise transient_or_same(e, self.url) from None

    def _read_command(self, n: int) -> bytes:
        parts, got, fd = [], 0, self.proc.stdout.fileno()
        while got < n:
            if not self.poller.poll(self.timeout_s * 1000):
                self.proc.kill()
                raise TransientError(self.url, f"no bytes for {self.timeout_s:g} s (data.io_timeout_s)")
            chunk = os.read(fd, n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def check(self) -> None:
        """After reading stopped: TransientError if the transport failed, OSError if the source says the
        object is not there; nothing if the bytes were whole, or if we stopped reading before the end (a
        content error found mid-stream, or a tar that ended before its padding: not the transport's fault)."""
        if self.proc is None or not self.eof:
            return
        try:
            status = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise TransientError(self.url, f"the command did not exit within {self.timeout_s:g} s of its output "
                                           f"ending") from None
        if status != 0:
            raise self._failure(status)

    def _failure(self, status: int) -> Exception:
        if self.proc.stderr is None:                                      # a pipe: command
            how = f"killed by signal {-status}" if status < 0 else f"exited {status}"
            return TransientError(self.url, f"command {how}")
        said = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        said = said[-1] if said else ""
        if status < 0:
            return TransientError(self.url, f"curl killed by signal {-status}")
        if status == 22 and (m := re.search(r"error: (\d{3})", said)):
            code = int(m[1])
            if code in HTTP_TRANSIENT or code >= 500:
                return TransientError(self.url, f"HTTP {code}")
            return (FileNotFoundError if code in (404, 410) else OSError)(f"{self.url}: HTTP {code}")
        said = re.sub(r"^curl: \(\d+\) ", "", said) or CURL_TRANSIENT.get(status, "no message")
        if status in CURL_TRANSIENT:
            return TransientError(self.url, f"curl exit {status}: {said}")
        return OSError(f"{self.url}: curl exit {status}: {said}")

    def close(self) -> None:
        if self.proc is None:
            self.file.close()
            return
        self.proc.stdout.close()
        if self.proc.poll() is None:           # stopped early, or stalled: nothing more is wanted from it
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Outage:
    """The retries of one source after a transport fault: exponential backoff (1 s doubling to 10 s) with
    jitter (x 0.5..1, so that ranks hit by the same outage do not return in lockstep), each logged once and
    counted; StorageUnavailable once data.io_retry_s have passed since the first failure. The jitter comes
    from its own generator: a retry never moves the training's random streams."""

    def __init__(self, url: str, io: IoPolicy, stats: IoStats | None):
        self.url, self.io, self.stats = url, io, stats
        self.start, self.attempt, self.rng = time.monotonic(), 0, random.Random()
        self.ongoing = stats is not None
        if self.ongoing:
            stats.outage(+1)

    def over(self) -> None:
        """The source delivered again (or the reader gave up or was closed): no longer in an outage."""
        if self.ongoing:
            self.ongoing = False
            self.stats.outage(-1)

    def wait(self, error: TransientError) -> None:
        spent = time.monotonic() - self.start
        left = self.io.retry_s - spent
        if left <= 0:
            self.over()
            raise StorageUnavailable(f"storage unavailable: {self.url}: {error.cause} (retried {self.attempt} "
                                     f"time(s) over {spent:.0f} s, data.io_retry_s={self.io.retry_s:g})")
        self.attempt += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.attempt - 1)) * self.rng.uniform(0.5, 1.0)
        delay = min(delay, left)
        log.warning("storage: %s: %s; retry %d in %.1f s (%.0f of data.io_retry_s=%g s spent)",
                    self.url, error.cause, self.attempt, delay, spent, self.io.retry_s)
        if self.stats is not None:
            self.stats.add_retry(delay)
        time.sleep(delay)


def fetch(url: str, io: IoPolicy, stats: IoStats | None = None) -> bytes:
    """All of a small file (the manifest), retried like a shard."""
    outage = None
    while True:
        stream = None
        try:
            stream = ShardStream(url, io.timeout_s, stats)
            data = stream.read()
            stream.check()
            return data
        except TransientError as e:
            outage = outage or Outage(url, io, stats)
            outage.wait(e)
        finally:
            if stream is not None:
                stream.close()
