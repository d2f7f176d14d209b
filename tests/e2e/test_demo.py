"""The built-in demonstration, shortened (--quick, two seeds): tokenize, train ILSD and vanilla per seed, sweep L,
check the claims, write the result files."""
import csv
import json
import math
import subprocess
import sys

import torch

from elt_scale.config import load_recipe
from elt_scale.models import build_model
from studies.demo import CLAIMS
from studies.measure import val_loss_by_loops
from tests.conftest import ROOT

SEEDS = (0, 1)


def test_quick_demo_writes_results_and_its_quick_claims_hold(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "studies.demo", "--quick", "--seeds", ",".join(map(str, SEEDS)),
                        "--out", str(out), "--shards", str(tmp_path / "shards")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo: finished" in r.stdout and "claims hold" in r.stdout

    rows = list(csv.DictReader(open(out / "demo.csv")))
    l_max = load_recipe(ROOT / "recipes" / "digits_masked.yaml").model.loops
    assert sorted((row["model"], int(row["seed"]), int(row["L"])) for row in rows) == \
           sorted((m, s, L) for m in ("ilsd", "vanilla") for s in SEEDS for L in range(1, l_max + 2))
    for row in rows:
        assert math.isfinite(float(row["val_loss"])) and 0 <= float(row["class_acc"]) <= 1
    result = json.loads((out / "demo.json").read_text())
    verdicts = {v["name"]: v for v in result["claims"]}
    assert set(verdicts) == {c.name for c in CLAIMS}                     # every claim checked, held or not
    assert all(verdicts[c.name]["holds"] for c in CLAIMS if c.quick), verdicts
    assert result["meta"]["seeds"] == list(SEEDS) and result["meta"]["quick"] is True
    report = (out / "demo.md").read_text()
    assert "## Claims" in report and ("**PASS**" in report or "**FAIL**" in report) and f"| **{l_max}** |" in report
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the two models differ in the one switch: only the ILSD runs have a student loss; the seeds differ
    last = lambda m, s: json.loads((out / "runs" / f"demo_{m}_s{s}" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_student" in last("ilsd", 0) and "loss_student" not in last("vanilla", 0)
    assert last("ilsd", 0)["loss"] != last("ilsd", 1)["loss"]
    # the demo's shards are where recipes/digits_masked.yaml would look from --shards' parent
    assert (tmp_path / "shards" / "manifest.json").exists()


def test_val_loss_exits_equal_separate_passes():
    """All L come from one forward pass with exits; each must equal a pass that stops at that L."""
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml", ["model.width=32", "model.heads=2"])
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    codes = torch.randint(0, recipe.model.vocab_size, (24, 8, 8))
    labels = torch.randint(0, 10, (24,))
    together = val_loss_by_loops(model, codes, labels, [1, 2, 5], repeats=2, batch=10)
    for L in (1, 2, 5):
        alone = val_loss_by_loops(model, codes, labels, [L], repeats=2, batch=10)[L]
        assert abs(together[L] - alone) < 1e-5
    assert len(set(round(v, 6) for v in together.values())) == 3   # the loop count changes the prediction
