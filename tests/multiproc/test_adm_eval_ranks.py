"""elt-eval fid on 2 ranks (torch.distributed.run) gives the numbers of 1 rank. The rest of ADM's suite, in one
process: tests/unit/test_adm_eval.py (whose Inception fixture and helpers this file uses)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from elt_scale.dist import free_port
from tests.conftest import ROOT
from tests.unit.test_adm_eval import ADM_KEYS, elt_eval_fid, inception, noise  # noqa: F401  (inception: a fixture)


@pytest.mark.multiproc
def test_two_ranks_give_the_numbers_of_one(inception, tmp_path):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=noise(300, 7), arr_1=np.zeros(300, np.int64))
    np.savez(ref, arr_0=noise(200, 8, high=180))           # no statistics: the reference is extracted on both ranks
    one, err = elt_eval_fid(samples, "--reference", ref, "--inception-weights", inception)
    assert set(one) == ADM_KEYS and "ADM's protocol (and the paper's FIDs) use 50000" in err
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "elt_scale.evaluate", "fid", str(samples), "--reference", str(ref), "--inception-weights", inception]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1                                  # rank 0 prints, rank 1 does not
    two = lines[0]
    assert {k: two[k] for k in ("num_samples", "reference_stats", "reference_pr_images", "inception_sha256")} == \
           {k: one[k] for k in ("num_samples", "reference_stats", "reference_pr_images", "inception_sha256")}
    for k in ("is", "fid", "sfid", "precision", "recall"):
        assert two[k] == pytest.approx(one[k], rel=1e-6), k
