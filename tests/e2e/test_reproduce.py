"""The reproduction target, shortened (--quick): both families, all four models, every L; every model trained."""
import csv
import json
import math
import subprocess
import sys

import torch

from elt_scale.config import load_recipe
from elt_scale.models import build_model
from studies.measure import loop_counts, val_mse_by_loops
from studies.reproduce import CLAIMS, FAMILIES, MODELS, QUALITY_BARS, model_overrides
from studies.results import COLUMNS
from studies.runs import train_losses
from tests.conftest import ROOT


def test_quick_reproduce_covers_every_model_and_loop_count(tmp_path):
    out = tmp_path / "reproduce"
    r = subprocess.run([sys.executable, "-m", "studies.reproduce", "--quick", "--seeds", "0", "--out", str(out),
                        "--shards", str(tmp_path / "shards")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "reproduce: finished" in r.stdout

    rows = list(csv.DictReader(open(out / "reproduce.csv")))
    assert list(rows[0]) == COLUMNS
    expected = []
    for family, (recipe_path, *_) in FAMILIES.items():
        m = load_recipe(recipe_path).model
        expected += [(family, model, L) for model in MODELS
                     for L in loop_counts(m.loops if model in ("ilsd", "vanilla") else 1)]
    assert sorted((row["family"], row["model"], int(row["L"])) for row in rows) == sorted(expected)
    for row in rows:
        assert all(row[c] != "" for c in COLUMNS), row
        assert math.isfinite(float(row["val_loss"])) and 0 <= float(row["class_acc"]) <= 1
        assert math.isfinite(float(row["fd_digits"])) and float(row["gflops_per_sample"]) > 0

    for family in FAMILIES:
        mine = {(row["model"], int(row["L"])): row for row in rows if row["family"] == family}
        n = int(mine["ilsd", 1]["unique_layers"]) * int(mine["ilsd", 1]["trained_L"])
        assert int(mine["plain_deep", 1]["unique_layers"]) == n
        assert int(mine["plain_deep", 1]["params"]) > int(mine["ilsd", 1]["params"]) == int(mine["plain_small", 1]["params"])
        for model in MODELS:                       # every model really trained: its loss fell
            losses = train_losses(out / "runs" / f"{family}_{model}_s0")
            assert losses[-1][0] == 20 and losses[-1][1] < losses[0][1], (family, model, losses)

    verdicts = {v["name"]: v for v in json.loads((out / "reproduce.json").read_text())["claims"]}
    assert set(verdicts) == {c.name for c in CLAIMS} | {q.name for q in QUALITY_BARS}
    assert all(verdicts[c.name]["holds"] for c in CLAIMS if c.quick), verdicts   # equal depth, equal cost
    tables = (out / "reproduce.md").read_text()
    assert "**masked**" in tables and "**diffusion**" in tables and "plain_deep" in tables and "## Claims" in tables
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_overrides_change_only_depth_loops_and_ilsd():
    base = load_recipe(FAMILIES["diffusion"][0])
    n, l_max = base.model.unique_layers, base.model.loops
    deep = load_recipe(FAMILIES["diffusion"][0], model_overrides("plain_deep", n, l_max))
    small = load_recipe(FAMILIES["diffusion"][0], model_overrides("plain_small", n, l_max))
    assert (deep.model.unique_layers, deep.model.loops, deep.ilsd.enabled) == (n * l_max, 1, False)
    assert (small.model.unique_layers, small.model.loops, small.ilsd.enabled) == (n, 1, False)
    assert deep.train == small.train == base.train and deep.model.width == base.model.width


def test_diffusion_val_loss_exits_equal_separate_passes():
    """All L come from one forward pass with exits; each must equal a pass that stops at that L."""
    recipe = load_recipe(FAMILIES["diffusion"][0], ["model.width=32", "model.heads=2"])
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    for p in model.parameters():                   # adaLN-zero starts as the identity; make L matter
        p.data.add_(0.05 * torch.randn_like(p))
    x0, labels = torch.rand(24, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (24,))
    together = val_mse_by_loops(model, recipe, x0, labels, [1, 2, 5], repeats=2, batch=10)
    for L in (1, 2, 5):
        alone = val_mse_by_loops(model, recipe, x0, labels, [L], repeats=2, batch=10)[L]
        assert abs(together[L] - alone) < 1e-6 * max(1.0, alone)
    assert len(set(round(v, 7) for v in together.values())) == 3
