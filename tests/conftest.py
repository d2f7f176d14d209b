import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elt_scale.dist import free_port  # noqa: E402  (the checkout's package, after the path insert)

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


def read_metrics(run_dir: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
