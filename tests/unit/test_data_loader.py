"""The shard loader: exact resume, corrupt shards skipped or fatal, manifest/recipe checks."""
import logging

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.data import ShardError, make_loader
from tests.datasets import write_shards


def recipe(shards, *overrides):
    return load_recipe(None, [f"data.shards={shards}", "train.micro_batch=16", "data.shuffle_buffer=64", *overrides])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_lands_on_the_same_next_batch(tmp_path, workers):
    shards = write_shards(tmp_path / "s")
    r = recipe(shards, f"data.num_workers={workers}")
    first = make_loader(r)
    batches = [next(first) for _ in range(30)]      # 480 samples: past one epoch of 300
    assert first.position == 30
    for position in (1, 7, 22):
        resumed = make_loader(r, position=position)
        for k in range(position, position + 3):
            x, y = next(resumed)
            assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1]), (position, k)
        assert resumed.position == position + 3
    x, y = batches[0]
    assert x.shape == (16, 8, 8) and x.dtype == torch.int64 and y.dtype == torch.int64


def test_ranks_read_disjoint_samples(tmp_path):
    shards = write_shards(tmp_path / "s", n=400)
    r = recipe(shards, "data.shuffle_buffer=0")
    seen = [torch.cat([next(loader)[0][:, 0, 0] for loader in [make_loader(r, rank, 2)] for _ in range(12)])
            for rank in (0, 1)]
    a, b = (set(x.tolist()) for x in seen)
    assert len(a) == len(b) == 192 and not a & b and a | b <= set(range(400))


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2 + 100])
    elif how == "garbage":
        path.write_bytes(b"\x17" * 4096)
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing"])
def test_corrupt_shard_skipped_with_warning_and_counter(tmp_path, how, caplog):
    shards = write_shards(tmp_path / "s")
    corrupt(shards / "train-000002.tar", how)
    loader = make_loader(recipe(shards))
    with caplog.at_level(logging.WARNING):
        for _ in range(40):                          # two epochs over what is left
            x, _ = next(loader)
            assert x.shape == (16, 8, 8)
    assert loader.bad_shards >= 1
    assert "train-000002.tar" in caplog.text


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_shard_is_fatal_when_strict(tmp_path, how):
    shards = write_shards(tmp_path / "s")
    corrupt(shards / "train-000002.tar", how)
    loader = make_loader(recipe(shards, "data.strict=true"))
    with pytest.raises(ShardError, match="train-000002.tar"):
        for _ in range(40):
            next(loader)


@pytest.mark.timeout(60)
def test_all_shards_corrupt_is_an_error_not_a_hang(tmp_path):
    shards = write_shards(tmp_path / "s", n=100)
    for p in shards.glob("*.tar"):
        corrupt(p, "garbage")
    with pytest.raises(Exception, match="no readable samples"):
        next(make_loader(recipe(shards)))


@pytest.mark.timeout(60)
def test_shards_vanishing_mid_run_is_an_error_not_a_hang(tmp_path):
    shards = write_shards(tmp_path / "s", n=100)
    loader = make_loader(recipe(shards))
    next(loader)
    for p in shards.glob("*.tar"):
        p.unlink()
    with pytest.raises(ShardError, match="no readable samples"):
        for _ in range(100):
            next(loader)
    assert loader.bad_shards >= 2


def test_manifest_recipe_mismatch_fails_before_training(tmp_path):
    shards = write_shards(tmp_path / "s")
    with pytest.raises(ValueError, match=r"\[8, 8\] != recipe's \[16, 16\]"):
        make_loader(recipe(shards, "model.grid=[16, 16]"))
    with pytest.raises(ValueError, match="shards hold codes but model.family=diffusion needs latents"):
        make_loader(recipe(shards, "model.family=diffusion"))
    with pytest.raises(ValueError, match="vocab_size 17 > model.vocab_size 8"):
        make_loader(recipe(shards, "model.vocab_size=8"))
