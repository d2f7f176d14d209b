"""Issue 13 on real runs: 2 ranks, 1 rank with accumulation and 1 rank reading over http log the same losses.
The loader's global batches, resume and shard specs: tests/unit/test_elastic_data.py (whose http server this
file uses)."""
import pytest
import torch

from tests.conftest import read_metrics, run_train
from tests.unit.test_elastic_data import http_server


def losses(run_dir):
    return [(row["step"], row["loss"], row["loss_teacher"]) for row in read_metrics(run_dir)]


@pytest.mark.multiproc
def test_two_ranks_one_rank_with_accumulation_and_http_log_the_same_losses(tmp_path, digits_shards):
    common = ("train.steps=6", "train.log_every=1", "train.save_every=0", "train.micro_batch=16",
              "deepspeed.zero_stage=2", "model.width=32")
    one = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path / 'one'}",
                    "train.grad_accum=2", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path / 'two'}",
                    *common, nprocs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    with http_server(digits_shards) as url:
        http = run_train("digits_masked.yaml", f"data.shards={url}", f"run.out_dir={tmp_path / 'http'}",
                         "train.grad_accum=2", *common)
    assert http.returncode == 0, http.stderr[-3000:]
    a, b, c = (losses(tmp_path / d / "digits_masked") for d in ("one", "two", "http"))
    assert [s for s, *_ in a] == list(range(1, 7))
    assert c == a                                        # same process layout, same bytes: bit-identical
    for (_, *x), (_, *y) in zip(a, b):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), rtol=1e-4, atol=0), (a, b)
    assert len({round(loss, 4) for _, loss, _ in a}) > 1  # the losses move: the comparison could fail
