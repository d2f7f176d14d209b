"""The built-in demonstration, shortened (--quick): tokenize, train ILSD and vanilla, sweep L, write outputs."""
import csv
import json
import math
import subprocess
import sys

import torch

from elt_scale.config import load_recipe
from elt_scale.demo import val_loss_by_loops
from elt_scale.models import build_model
from tests.conftest import ROOT


def test_quick_demo_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "elt_scale.demo", "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo: finished" in r.stdout

    rows = list(csv.DictReader(open(out / "demo_anytime.csv")))
    l_max = load_recipe(ROOT / "recipes" / "digits_masked.yaml").model.loops
    assert sorted((row["model"], int(row["L"])) for row in rows) == \
           sorted((m, L) for m in ("ilsd", "vanilla") for L in range(1, l_max + 2))
    for row in rows:
        assert math.isfinite(float(row["val_loss"])) and 0 <= float(row["class_acc"]) <= 1
        assert float(row["gflops_per_sample"]) > 0
    gflops = [float(row["gflops_per_sample"]) for row in rows if row["model"] == "ilsd"]
    assert gflops == sorted(gflops)                        # more loops cost more

    table = (out / "demo_anytime.md").read_text()
    assert "val loss ILSD" in table and "class acc vanilla" in table and f"| **{l_max}** |" in table
    assert (out / "demo_anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "anytime" / "anytime.csv").exists()

    # the two runs really differ in the one switch: only the ILSD run has a student loss
    ilsd = json.loads((out / "runs" / "demo_ilsd" / "metrics.jsonl").read_text().splitlines()[-1])
    vanilla = json.loads((out / "runs" / "demo_vanilla" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ilsd["step"] == vanilla["step"] == 30
    assert "loss_student" in ilsd and "loss_student" not in vanilla


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
