"""ILSD's intermediate loop count on 2 ranks (torch.multiprocessing, gloo): every rank draws the same L_int.
ILSD's losses and schedules in one process: tests/unit/test_ilsd.py."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elt_scale.objectives import draw_l_int


def _gather_l_int(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(1000 + rank)   # ranks' global RNGs differ; the draw must not depend on them
    mine = torch.tensor([draw_l_int(3, s, 2, 6) for s in range(200)])
    got = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(got, mine)
    if rank == 0:
        out.put([g.tolist() for g in got])
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_l_int_identical_on_two_ranks():
    from elt_scale.dist import free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_gather_l_int, args=(2, free_port(), q), nprocs=2)
    a, b = q.get()
    assert a == b and set(a) <= {2, 3, 4, 5}
