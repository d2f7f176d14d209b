"""Process-group set-up that works with a launcher (deepspeed, torchrun, srun) and without one."""
from __future__ import annotations

import contextlib
import io
import os
import socket
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
    """The ranks waiting for one rank's solo work gave up (its message names the rank and the work)."""


_solo_calls = 0


def solo(work, what: str, deadline_s: float, src: int = 0):
    """Run `work()` on rank `src` alone while the other ranks wait for it through the rendezvous store, not in
    a collective: a collective's deadline (train.collective_timeout_s) is for peers that should arrive
    together, and one rank's solo work (a checkpoint conversion, reference statistics) can take far longer.
    The waiters poll a counter once a second (one store read each, so thousands of ranks cost the store
    little) and give up after `deadline_s` with SoloTimeout naming the rank; a worker that dies takes the
    store down with it (rank 0) or never arrives. An exception on the worker is raised there and reported on
    every other rank. Returns work()'s value on `src`, None elsewhere; world 1 just runs it."""
    global _solo_calls
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    _solo_calls += 1                                  # every rank calls solo() in the same order
    store = dist.PrefixStore(f"elt_solo/{_solo_calls}", dist.distributed_c10d._get_default_store())
    if dist.get_rank() == src:
        try:
            result = work()
        except BaseException as e:
            store.set("error", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            raise
        store.set("done", "1")
        return result
    waited, start = 0.0, time.monotonic()
    while not store.check(["done"]) and not store.check(["error"]):
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise SoloTimeout(f"rank {src} has been {what} for {waited:.0f} s, longer than {deadline_s:g} s "
                              f"(train.watchdog_first_s): treating it as hung")
        time.sleep(1.0)
    if store.check(["error"]):
        raise RuntimeError(f"rank {src} failed while {what}: {store.get('error').decode()}")
    return None
