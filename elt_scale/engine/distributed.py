"""Process-group set-up that works with a launcher (deepspeed, torchrun, srun) and without one."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from ..dist import backend, local_device, quiet_deepspeed, single_process_env


def default_group_timeout(timeout: timedelta) -> None:
    """DeepSpeed makes its own groups (data parallel, ZeRO) with `dist.new_group()` and no timeout, which
    means torch's defaults (30 min gloo, 10 min NCCL): without this a stalled peer still hangs the
    gradient all-reduce for half an hour. torch reads these module defaults at each new_group()."""
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout


def elastic_attempt_store(timeout: timedelta):
    """Under torchrun (TORCHELASTIC_RESTART_COUNT set) the agent's TCPStore outlives a restart and still
    holds the failed attempt's rendezvous keys: the new rank 0 reads the dead rank 1's address and gloo
    fails with "connectFullMesh ... Connection refused". A prefix per restart gives each attempt its own
    keys. None outside torchrun (env:// then works as usual)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       int(os.environ["WORLD_SIZE"]), timeout=timeout,
                                       is_master=not agent_hosts_store() and os.environ["RANK"] == "0")
    return torch.distributed.PrefixStore(f"elt_attempt_{attempt}", store)


def agent_hosts_store() -> bool:
    """torchrun's agent hosts the rendezvous store (and outlives its workers); otherwise rank 0 does (env://)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


class StoreGone(ConnectionRefusedError):
    """Nothing listens on the rendezvous store's port: the process that hosted it (rank 0, or torchrun's agent)
    is gone."""


def store_client(name: str, timeout_s: float):
    """A client of the job's rendezvous store (MASTER_ADDR:MASTER_PORT, whoever hosts it) on a connection of its
    own, public API only; keys under `name` and a prefix per launch (the port) and torchrun attempt, so that a
    restarted job does not read a failed attempt's keys. Raises StoreGone when the port refuses: torch's client
    retries a refusal until its timeout and then reports a timeout, as for a store that is only slow."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        socket.create_connection((addr, port), timeout=timeout_s).close()
    except ConnectionRefusedError as e:
        raise StoreGone(f"{addr}:{port} refuses connections") from e
    store = torch.distributed.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                       wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"{name}_{attempt}_{port}", store)


def collective_deadline_s(recipe) -> float:
    """train.collective_timeout_s, but never shorter than the storage outage a peer may be riding out
    (data.io_retry_s + data.io_timeout_s): a rank waiting for such a peer is not waiting for a stalled one.
    Stopped or dead peers are the heartbeat's to catch (seconds: heartbeat.py), a peer hung while alive its own
    step watchdog's (watchdog.py); this deadline is the last line behind both."""
    return max(recipe.train.collective_timeout_s, recipe.data.io_retry_s + recipe.data.io_timeout_s)


def init_distributed(timeout_s: float = 600) -> tuple[int, int]:
    """`timeout_s` bounds every collective: a rank waiting for a stalled peer fails after it instead of
    hanging (gloo's default is 30 minutes). NCCL honours it only with async error handling, which
    aborts the communicator and the process on a timeout rather than leaving a stuck kernel behind."""
    quiet_deepspeed()
    import deepspeed

    single_process_env()
    default_group_timeout(timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local_device())
    timeout = timedelta(seconds=timeout_s)
    if store := elastic_attempt_store(timeout):       # DeepSpeed adopts an initialised default group
        torch.distributed.init_process_group(backend(), store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    with contextlib.redirect_stdout(io.StringIO()):      # DeepSpeed prints "... built successfully" each start
        deepspeed.init_distributed(dist_backend=backend(), timeout=timeout)
    unlink_shm_allreduce_buffer()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def unlink_shm_allreduce_buffer() -> None:
    """On the CPU, DeepSpeed maps a 69 MB /dev/shm segment per rank when all ranks share a host (LOCAL_SIZE ==
    WORLD_SIZE) and never unlinks it: every run leaks 69 MB x ranks of RAM (tmpfs), a killed one too, until
    the host runs out of memory (a CI run was OOM-killed after ~50 launches). Every rank has mapped every
    peer's segment when init returns, so after a barrier each rank unlinks its own name: the mappings live on
    until the processes exit, however they exit, and nothing is left behind."""
    if os.environ.get("LOCAL_SIZE") != str(torch.distributed.get_world_size()):
        return                                            # DeepSpeed's own test, the same on every rank
    torch.distributed.barrier()
    name = Path("/dev/shm") / "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        torch.distributed.get_rank())
    name.unlink(missing_ok=True)


class SoloTimeout(RuntimeError):
    """The ranks waiting for one rank's solo work gave up (its message names the rank, the work and the knob)."""


class SoloFailed(RuntimeError):
    """Solo work failed on its rank, or its rank left without a word; raised on the waiting ranks where the
    worker's own exception class cannot be rebuilt (`rebuilt`)."""


STORE_S = 30.0          # a solo client's store timeout: its reads are of keys that exist, or checks
READ_GRACE_S = 30.0     # how long rank 0 waits for every rank to have read a solo failure before raising it

_solo_calls = 0


def solo(work, what: str, deadline_s: float, src: int = 0):
    """Run `work()` on rank `src` alone while the other ranks wait for it through the rendezvous store, not in
    a collective: a collective's deadline (train.collective_timeout_s) is for peers that should arrive
    together, and one rank's solo work (a checkpoint conversion, reference statistics) can take far longer.
    The waiters poll once a second (one store read each, on a connection of their own, renewed after a reset)
    and give up after `deadline_s` (train.solo_timeout_s) with SoloTimeout naming the rank. An exception on
    the worker reaches every waiter as its message and its class (`rebuilt`), so that each rank exits with the
    code the worker's exception maps to; rank 0 raises only once every rank has read it (at most READ_GRACE_S),
    because where it hosts the store a rank that had not would see a connection error instead. Returns
    work()'s value on `src`, None elsewhere; world 1 just runs it."""
    global _solo_calls
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    _solo_calls += 1                                  # every rank calls solo() in the same order
    name, rank, world = f"elt_solo_{_solo_calls}", dist.get_rank(), dist.get_world_size()
    if rank != src:
        outcome, store = await_outcome(name, src, what, deadline_s)
        if outcome == "done":
            return None
        failure = json.loads(outcome)
        error = rebuilt(failure["kind"], failure["message"])
        all_read(store, rank, world)
        raise error
    try:
        result = work()
    except BaseException as e:
        kind, line = f"{type(e).__module__}:{type(e).__qualname__}", (str(e).strip().splitlines() or [""])[0]
        message = f"rank {src} failed while {what}: {type(e).__name__}: {line}"
        with contextlib.suppress(Exception):          # the work's own error is raised here, whatever the store does
            all_read(set_outcome(name, json.dumps({"kind": kind, "message": message})), rank, world)
        raise
    set_outcome(name, "done")
    return result


def await_outcome(name: str, src: int, what: str, deadline_s: float):
    """A waiter's poll -> (the outcome: "done" or the failure's JSON, the store client that read it)."""
    start, store = time.monotonic(), None
    while True:
        try:
            store = store or store_client(name, STORE_S)
            if store.check(["outcome"]):
                return store.get("outcome").decode(), store
        except StoreGone as e:                        # nothing listens: rank 0's process, the store's host, is gone
            if not agent_hosts_store():
                raise SoloFailed(f"rank 0 on {os.environ.get('MASTER_ADDR', '?')}, the rendezvous store, left while "
                                 f"rank {src} was {what}: {e}") from e
        except Exception:                             # noqa: BLE001 -- a reset or timed-out connection: a new one
            store = None
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise SoloTimeout(f"rank {src} has been {what} for {waited:.0f} s, longer than {deadline_s:g} s "
                              f"(train.solo_timeout_s): treating it as hung")
        time.sleep(1.0)


def set_outcome(name: str, outcome: str, tries: int = 3):
    """The worker's outcome into the store, on a new connection (the work may have outlasted an old one)."""
    for attempt in range(tries):
        try:
            store = store_client(name, STORE_S)
            store.set("outcome", outcome)
            return store
        except Exception:                             # noqa: BLE001 -- a blip: once more
            if attempt == tries - 1:
                raise
            time.sleep(1.0)


def all_read(store, rank: int, world: int) -> None:
    """Each rank counts itself once it knows the failure; rank 0 waits until all have (READ_GRACE_S at most).
    Best effort: the failure is raised either way."""
    with contextlib.suppress(Exception):
        count, end = store.add("read", 1), time.monotonic() + READ_GRACE_S
        while rank == 0 and count < world and time.monotonic() < end:
            time.sleep(0.1)
            count = store.add("read", 0)


def rebuilt(kind: str, message: str) -> BaseException:
    """The worker's exception as a waiter raises it: of the same class where this process has that class loaded
    and it keeps a message as given, so that train.py, which maps exceptions to exit codes by class (EXIT_CODES,
    USER_ERRORS, its except clauses), gives every rank the worker's code; else SoloFailed, a RuntimeError (exit
    1, as an exception train.py does not map gives the worker). The class name comes from the store: imported
    only from this package, any other only if this process has it loaded already."""
    module, _, qualname = kind.partition(":")
    cls = sys.modules.get(module)
    if cls is None and module.split(".")[0] == __name__.split(".")[0]:
        with contextlib.suppress(ImportError):
            cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            error = cls(message)
            if str(error) == message:
                return error
    return SoloFailed(message)
