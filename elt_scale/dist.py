"""Process-group plumbing shared by training and sampling: where this process sits among the launcher's
(deepspeed, torchrun, srun via slurm/task_env.sh, or none), its device, and a free port."""
from __future__ import annotations

import os
import socket

import torch


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def launcher_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rendezvous() -> str:
    """MASTER_ADDR:MASTER_PORT as the launcher set them (a free local port is chosen later without one)."""
    return f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '(free port)')}"


def local_ranks() -> int:
    """How many ranks the launcher started on this host: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE,
    srun's SLURM_NTASKS_PER_NODE (slurm/train_large.sh sets --ntasks-per-node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
               or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or 1)


def set_threads() -> int:
    """Compute threads: the cores this process was given (its affinity mask: taskset, Slurm's cgroup) shared by
    the ranks on this host; OMP_NUM_THREADS, when set, wins (slurm/task_env.sh sets it from --cpus-per-task).
    torch alone gives every rank all the cores, and OpenMP threads that outnumber the cores spin on each other:
    2 ranks on 2 cores trained 17x slower (bench/RESULTS.md, bench/threads.py). Fixed for the run, not adapted to
    the load: the thread count can change a CPU run's float sums, and a run must not depend on its neighbours."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks()))
    return torch.get_num_threads()


def single_process_env() -> None:
    """Without a launcher DeepSpeed falls back to MPI discovery (and dies importing mpi4py): make a plain
    `python -m ...` rank 0 of 1 on a free local port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> tuple[int, int]:
    """For launched tools that need no DeepSpeed (sampling, evaluation): a process group when the launcher
    started several processes, none for one. Returns (rank, world)."""
    rank, world = launcher_env()
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        torch.distributed.init_process_group(backend())
    return rank, world


def quiet_deepspeed() -> None:
    """Before DeepSpeed is first imported: name the accelerator through its own DS_ACCELERATOR switch on a
    machine without CUDA (else it warns on every start that it found none)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
