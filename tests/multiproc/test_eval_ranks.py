"""elt-sample in 2 processes (torch.distributed.run) splits the samples and writes those of 1 process. The rest of
elt-sample and elt-eval, in one process: tests/unit/test_eval.py (whose trained run this file uses)."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from elt_scale import sample
from elt_scale.dist import free_port
from tests.conftest import ROOT
from tests.unit.test_eval import trained_run  # noqa: F401  (a fixture)


@pytest.mark.multiproc
def test_two_processes_split_the_samples_and_match_one(trained_run, tmp_path):
    common = ["--loops", "2", "-n", "10", "--steps", "3", "--batch-size", "4", "--seed", "3"]
    sample.main([str(trained_run), *common, "--out", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "elt_scale.sample", str(trained_run), *common, "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)         # own process group: a timeout kills the workers too
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    one, two = np.load(tmp_path / "one" / "samples_L2.npz"), np.load(tmp_path / "two" / "samples_L2.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert not list((tmp_path / "two").glob(".part_*"))
