import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elt_scale.dist import free_port  # noqa: E402  (the checkout's package, after the path insert)
from elt_scale.engine import checkpoint as ckpt  # noqa: E402
from tests.slurm_cluster import LocalSlurm, missing_slurm  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")


def run_tokenize(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), *args],
                          cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    r = run_tokenize("--source", "digits", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def digits_pixel_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits-pixels"
    r = run_tokenize("--source", "digits", "--pixel-mode", "identity", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def digits32_shards(tmp_path_factory) -> Path:
    """Digits in 51 shards of 32 samples (the set-up of issue 22): a run opens a new shard every few steps."""
    out = tmp_path_factory.mktemp("shards") / "digits32"
    r = run_tokenize("--source", "digits", "--samples-per-shard", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def train_cmd(recipe: str, *overrides: str, nprocs: int = 1) -> list[str]:
    if nprocs == 1:
        return [sys.executable, "-m", "elt_scale.train", str(ROOT / "recipes" / recipe), *overrides]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
            "--master_port", str(free_port()), "--module", "elt_scale.train", str(ROOT / "recipes" / recipe),
            *overrides]


def run_train(recipe: str, *overrides: str, nprocs: int = 1, timeout: int = 600, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("RANK", None), e.pop("WORLD_SIZE", None)
    return subprocess.run(train_cmd(recipe, *overrides, nprocs=nprocs), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)


def shrunk_masked_overrides(shards: Path, out: Path, grid: str, steps: int) -> list[str]:
    """A paper masked recipe shrunk to a CPU test: the given code grid, a one-layer width-32 trunk looped twice,
    batch 2, `steps` steps, one in-training evaluation at the last step; the recipe's vocabulary is kept."""
    return [f"data.shards={shards}", f"run.out_dir={out}", "data.num_workers=0", f"model.grid={grid}",
            "model.width=32", "model.heads=2", "model.unique_layers=1", "model.loops=2", "train.micro_batch=2",
            "train.global_batch=2", f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1",
            "train.save_every=0", "deepspeed.zero_stage=0", f"eval.every={steps}", "eval.num=2", "eval.steps=2"]


def read_metrics(run_dir: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def copy_checkpoint(src_run, dst_run, step):
    """A run directory whose only checkpoint is src_run's at `step` (as if the job had stopped there)."""
    tag = ckpt.tag_for(step)
    (dst_run / "ckpt").mkdir(parents=True)
    shutil.copytree(src_run / "ckpt" / tag, dst_run / "ckpt" / tag)
    ckpt.write_pointer(dst_run / "ckpt", tag)
    (dst_run / "metrics.jsonl").write_text("".join(l + "\n" for l in (src_run / "metrics.jsonl").read_text()
                                                   .splitlines()[:step]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_slurm():                       # the only reason to skip: Slurm cannot be installed here
        pytest.skip(missing_slurm())
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def job_env(tmp_path):
    """The env file the scripts source (this venv) and a log folder outside the checkout."""
    env_file = tmp_path / "env.sh"
    venv_bin = Path(sys.prefix) / "bin"
    env_file.write_text(f"source {venv_bin / 'activate'}\nexport GLOO_SOCKET_IFNAME=lo\n")
    # Jobs inherit our environment: take the venv off PATH so that only the env file can provide it.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv_bin)
    return {"ELT_ENV_FILE": str(env_file), "ELT_LOG_DIR": str(tmp_path / "logs"), "WANDB_MODE": "disabled",
            "PATH": path, "VIRTUAL_ENV": ""}


def shm_in_use(names: set[str]) -> set[str]:
    """Those of `names` (/dev/shm files) that a live process holds open or maps (from /proc/*/fd and maps).
    DeepSpeed creates a segment, writes its 69 MB through the descriptor, and only then maps it: a segment in
    that window is open, not yet mapped."""
    def links(proc: Path):
        for fd in proc.glob("fd/*"):
            try:
                yield os.readlink(fd)
            except OSError:
                pass                                   # closed while we looked

    held = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            paths = [line.split()[-1] for line in (proc / "maps").read_text().splitlines()] + list(links(proc))
        except OSError:
            continue                                   # the process ended while we read it
        held.update(path.split("/dev/shm/", 1)[1] for path in paths if path.startswith("/dev/shm/deepspeed"))
    return names & held


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """Every test, every tier: whatever its processes did (finished, killed -9, stopped), nothing new stays in
    /dev/shm. It is RAM: DeepSpeed's leaked CPU all-reduce buffers (69 MB per rank per run) once filled a CI
    machine's memory half-way through the suite and got it OOM-killed."""
    shm = Path("/dev/shm")
    # DeepSpeed's segments only: another program's files (a study's process-pool semaphores, a second test
    # session) are not this test's to judge or delete
    ours = lambda: {n for n in os.listdir(shm) if n.startswith("deepspeed")} if shm.is_dir() else set()  # noqa: E731
    before = ours()
    yield
    # a segment a live process still holds belongs to a run in flight (another xdist worker's test): only one
    # nobody holds is a leak (a run's ranks unlink theirs while they still map them, elt_scale/engine/distributed.py)
    new = ours() - before
    left = sorted(new - shm_in_use(new)) if new else []
    for name in left:                                  # one failure, not one per later test
        (shm / name).unlink(missing_ok=True)
    assert not left, f"left behind in /dev/shm: {left}"
