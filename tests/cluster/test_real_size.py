"""The real sizes, rehearsed (issue 38 item 3): the masked ELT-XL 7×4 recipe at its real width, depth and grid,
fed by its header's tokenize command, through slurm/train_large.sh on the loopback two-node cluster, resumed
on one node from the run's own recipe (no override), exported and sampled from the EMA. bench/rehearsal.py
does the work (its CI cut, --ci: no resume-only memory phase); this test holds what it finds. The diffusion
ELT 8×4 recipe (545M parameters, ~10 GiB of host memory per rank) is left to the bench."""
import json
import subprocess
import sys

import numpy as np
import pytest

from elt_scale.config import load_recipe
from tests.conftest import ROOT
from tests.slurm_cluster import missing_slurm

pytestmark = pytest.mark.slurm

RECIPE = ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if missing_slurm():
        pytest.skip(missing_slurm())
    work = tmp_path_factory.mktemp("rehearsal")
    out = work / "result.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearsal.py"), "--ci", "--recipes", "masked",
                        "--work", str(work / "w"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    result = json.loads(out.read_text())["results"]["masked"]
    assert "skipped" not in result, result
    return work / "w", result


@pytest.mark.timeout(1800)
def test_masked_xl_at_real_size_resumes_on_one_node_and_samples(rehearsal):
    work, res = rehearsal
    recipe = load_recipe(RECIPE)
    m = recipe.model
    assert (m.width, m.unique_layers, m.loops, m.grid, m.vocab_size) == (1152, 7, 4, [16, 16], 1024)
    sample = res["data"]["manifest_sample"]
    assert sample["shape"] == [16, 16] and sample["vocab_size"] == 1024, sample   # the header's command, f16 VQ
    assert res["params"] == 115_394_560
    ranks = lambda phase: [r for r in res[phase]["rss"] if r["kind"] == "rank"]   # noqa: E731
    assert sorted((r["rank"], r["node"]) for r in ranks("A")) == [("0", "n1"), ("1", "n2")]
    assert [(r["rank"], r["node"]) for r in ranks("B")] == [("0", "n1")]

    assert res["A"]["attempts"] == 1                 # A ran its 3 steps in one go: the uninterrupted reference
    # step 3 after a 2 -> 1 rank resume from the run's recipe.yaml equals the uninterrupted 2-rank run's
    s3 = res["step3"]
    assert s3["uninterrupted"]["world_size"] == 2 and s3["resumed"]["world_size"] == 1
    assert s3["loss_rel_diff"] <= 1e-4, s3
    assert "optimizer state from layout (world 2, ZeRO-1) loaded by DeepSpeed universal checkpoint" in res["log_B"]
    assert "batch layout: train.grad_accum=2 (recipe: 1) keep train.global_batch=2 on 1 ranks" in res["log_B"]

    # the checkpoint on disk is what elt-plan says (payload; pickle framing and padding well under 0.1%)
    for key in ("checkpoint", "checkpoint_world1"):
        c = res[key]
        assert 1.0 <= c["measured"]["total"] / c["plan"]["total"] < 1.001, c
        assert c["measured"]["module"] == pytest.approx(c["plan"]["module"], rel=1e-3)
    # the universal conversion holds fp32 + exp_avg + exp_avg_sq per parameter, not the module's weights again
    assert res["universal_bytes"] < 12.2 * res["params"]

    # the resume converted once, in a process of its own beside rank 0 (engine/universal.py); each rank's
    # host memory per phase is bench/resume_memory.py's, and what it reads is held by tests/unit/test_engine_units.py
    assert [r["node"] for r in res["B"]["rss"] if r["kind"] == "converter"] == ["n1"]

    # export of the EMA, and a sample from it at L_max through the f16 VQ decoder
    assert res["export"]["bytes"] == pytest.approx(4 * res["params"], rel=1e-3)
    images = np.load(work / "masked" / "samples" / "samples_L4.npz")["arr_0"]
    assert images.shape == (1, 256, 256, 3) and images.dtype == np.uint8
