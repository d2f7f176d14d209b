"""Issue 13: shards through webdataset (directory, brace pattern, http, pipe:), the same global batches and
random draws for every world size x grad_accum, and a resume that opens its place instead of reading to it. The same losses from 2 ranks, 1 rank with
accumulation and http on real runs: tests/multiproc/test_elastic_data_ranks.py."""
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

from elt_scale.config import load_recipe
from elt_scale.data import make_loader
from tests.conftest import run_train
from tests.datasets import write_shards

N, PER_SHARD, MICRO = 320, 50, 16       # 10 global batches of 32 per epoch; the last shard is short


def recipe(shards, *overrides):
    return load_recipe(None, [f"data.shards={shards}", f"train.micro_batch={MICRO}", "data.shuffle_buffer=20",
                              *overrides])


def global_batches(shards, world: int, accum: int, count: int, position: int = 0, spec=None, *overrides):
    """Sample ids of global batches position..position+count-1, gathered from every rank's loader in
    (rank, micro-step) order, as a trainer's global batch is laid out."""
    r = recipe(spec or shards, f"train.grad_accum={accum}", *overrides)
    loaders = [make_loader(r, rank, world, position) for rank in range(world)]
    out = []
    for _ in range(count):
        out.append([i for loader in loaders for _ in range(accum) for i in next(loader)[0][:, 0, 0].tolist()])
    assert all(loader.position == position + count for loader in loaders)
    return out, loaders


def test_global_batches_are_the_same_for_every_layout_and_each_epoch_sees_every_sample(tmp_path):
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    reference, _ = global_batches(shards, 2, 1, 20)                          # two epochs
    assert global_batches(shards, 1, 2, 20)[0] == reference
    other, _ = global_batches(shards, 2, 4, 20, 0, None, "train.micro_batch=4")   # 8 streams of 4: same again
    assert global_batches(shards, 1, 8, 20, 0, None, "train.micro_batch=4")[0] == other
    assert sorted(sum(other[:10], [])) == list(range(N))
    for epoch in (reference[:10], reference[10:]):
        seen = sum(epoch, [])
        assert sorted(seen) == list(range(N))                                  # each sample once per epoch
    assert reference[:10] != reference[10:]                                   # reshuffled between epochs
    assert reference[0] != sorted(reference[0])                               # shuffled within a window


def test_the_loader_delivers_what_the_order_says(tmp_path):
    """Order.micro_batch_samples is the contract: (shard, index) of every sample of micro-batch j of batch b,
    from arithmetic on the manifest alone. The loader's micro-batches are exactly those samples, in order."""
    from elt_scale.data import Order
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    order = Order(tuple(min(PER_SHARD, N - i) for i in range(0, N, PER_SHARD)), 0, 2 * MICRO, MICRO, 20)
    batches, _ = global_batches(shards, 2, 1, 15)                     # into the second epoch
    for b, delivered in enumerate(batches):
        promised = [shard * PER_SHARD + i for j in range(2) for shard, i in order.micro_batch_samples(b, j)]
        assert delivered == promised, b


def test_each_of_two_ranks_reads_about_half_of_the_bytes(tmp_path):
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    _, loaders = global_batches(shards, 2, 1, 10)                             # one epoch
    read = [loader.bytes_read for loader in loaders]
    assert all(0.4 * total < b < 0.65 * total for b in read), (read, total)


def test_resume_opens_its_place_and_gives_the_batches_read_through(tmp_path):
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    through, _ = global_batches(shards, 1, 2, 47)
    for position in (3, 11, 44):                                              # mid-window, epoch 1, epoch 4
        resumed, loaders = global_batches(shards, 2, 1, 3, position)
        assert resumed == through[position:position + 3], position
    # a resumed loader opens the shard under its place: it reads far less than the data before it
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    _, loaders = global_batches(shards, 1, 1, 1, 105, None, "train.micro_batch=32")   # epoch 10, mid-shard
    assert loaders[0].bytes_read < total / 2, (loaders[0].bytes_read, total)


@contextlib.contextmanager
def http_server(directory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/manifest.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_brace_pattern_http_and_opted_in_pipe_give_the_directorys_batches(tmp_path):
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    reference, _ = global_batches(shards, 2, 1, 12)
    brace = f"{shards}/train-{{000000..000006}}.tar"
    assert global_batches(shards, 2, 1, 12, 0, brace)[0] == reference
    pipe = f"pipe:cat {shards}/train-{{000000..000006}}.tar"
    assert global_batches(shards, 2, 1, 12, 0, pipe, "data.allow_pipe=true")[0] == reference
    with http_server(shards) as url:
        assert global_batches(shards, 2, 1, 12, 0, url)[0] == reference
        assert global_batches(shards, 2, 1, 12, 0, url + "/train-{000000..000006}.tar")[0] == reference


def test_pipe_without_opt_in_exits_2_naming_the_key_and_runs_nothing(tmp_path):
    shards = write_shards(tmp_path / "s", n=N, per_shard=PER_SHARD)
    marker = tmp_path / "RAN"
    r = run_train("digits_masked.yaml", f"data.shards=pipe:touch {marker}; cat {shards}/train-{{000000..000006}}.tar",
                  f"run.out_dir={tmp_path}", "train.steps=1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.shards" in r.stderr and "data.allow_pipe=true" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "digits_masked").exists()
