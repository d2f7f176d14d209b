"""studies/diffusion_ablation.py: each variant is paired with the plain 8-layer model of its own setting (steps,
width), variants that share a setting share one plain model, and the table's gaps are computed per seed."""
from pathlib import Path

from studies.diffusion_ablation import VARIANTS, plan, table


def test_each_variant_pairs_with_the_plain_model_of_its_setting():
    runs = plan(list(VARIANTS), [0, 1], 100, Path("shards"), Path("out"))
    plain = {k: r for k, r in runs.items() if k[0] == "plain"}
    assert sorted({k[1] for k in plain}) == ["x1", "x196", "x2"]            # three settings, not seven plains
    assert "train.steps=200" in runs["looped", "steps2x", 0].overrides
    assert "train.steps=200" in runs["plain", "x2", 1].overrides and "model.loops=1" in runs["plain", "x2", 1].overrides
    assert "model.width=96" in runs["looped", "width96", 1].overrides and "model.width=96" in runs["plain", "x196", 1].overrides
    assert "ilsd.lambda_steps=50" in runs["looped", "lam_half", 0].overrides                 # half of 100 steps
    assert runs["looped", "base", 0].overrides == ("train.steps=100",)
    assert len({r.dir for r in runs.values()}) == len(runs)                                 # no two share a folder


def test_table_gives_the_gap_and_the_anytime_cost_per_seed():
    rows = [{"variant": "base", "seed": 0, "looped": [0.033, 0.031, 0.030, 0.030], "plain": 0.0285},
            {"variant": "base", "seed": 1, "looped": [0.032, 0.030, 0.030, 0.0297], "plain": 0.0281}]
    line = table(rows, 1500).splitlines()[-1]
    assert line.startswith("| base | 0,1 | 0.02970–0.03000 | 0.02810–0.02850 |")
    assert "+5.3–+5.7" in line and "+7.7–+10.0" in line
