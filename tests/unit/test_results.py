"""Results that hold themselves: claims are checks over seeds; the result blocks of docs/results.md and the
README's headline are generated from docs/*.json and agree with them; the committed results come from a full
run (3+ seeds) of committed code."""
import json
import subprocess
import sys

import pytest

from studies.claims import Claim, QualityBar, check_bars, evaluate, separation
from studies.readme import PAGES, STUDIES, render
from studies.results import summarize
from tests.conftest import ROOT


def rows_of(values: dict) -> list[dict]:
    """{(model, L): [value per seed]} -> study rows of one family (L_max = 4)."""
    return [{"family": "f", "model": m, "seed": s, "L": L, "trained_L": 4, "unique_layers": 2, "params": 1,
             "gflops_per_sample": 0.1 * L, "val_loss": v, "class_acc": 1 - v / 10, "fd_digits": 10 * v}
            for (m, L), vs in values.items() for s, v in enumerate(vs)]


def test_a_claim_holds_only_when_it_holds_for_every_seed():
    rows = rows_of({("a", 1): [1.0, 1.1, 1.2], ("b", 1): [1.5, 1.6, 1.15], ("a", 4): [1.01, 1.1, 1.3]})
    better = Claim("x", "a beats b", "better", "val_loss", ("f", "a", 1), ("f", "b", 1))
    [v] = evaluate([better], rows)
    assert not v["holds"] and "seed 2: 1.2 vs 1.15" in v["evidence"]          # two of three seeds is not enough
    rows[2].update(val_loss=1.1, class_acc=0.89)
    assert evaluate([better], rows)[0]["holds"]
    higher = Claim("y", "a's accuracy beats b's", "better", "class_acc", ("f", "a", 1), ("f", "b", 1))
    assert evaluate([higher], rows)[0]["holds"]                               # higher is better for accuracy
    within = Claim("z", "a at L=1 within 2% of its L_max", "within", "val_loss", ("f", "a", 1), ("f", "a", "max"))
    assert not evaluate([within], rows)[0]["holds"]                           # tol 0: exact only
    assert not evaluate([Claim("w", "", "within", "val_loss", ("f", "a", 1), ("f", "a", "max"), tol=0.05)], rows)[0]["holds"]
    assert evaluate([Claim("w", "", "within", "val_loss", ("f", "a", 1), ("f", "a", "max"), tol=0.2)], rows)[0]["holds"]
    margin = Claim("m", "", "better", "val_loss", ("f", "a", 1), ("f", "b", 1), tol=0.2)   # by at least 20%
    assert not evaluate([margin], rows)[0]["holds"]
    missing = Claim("n", "", "better", "val_loss", ("f", "a", 2), ("f", "b", 1))
    assert evaluate([missing], rows)[0] == {"name": "n", "text": "", "holds": False,
                                            "evidence": "no seeds to compare", "quick": False}


def test_no_worse_is_one_sided_and_each_verdict_gives_its_margin_and_the_seed_spread():
    rows = rows_of({("a", 4): [0.90, 1.00, 1.04], ("b", 4): [1.00, 1.00, 1.00]})
    args = ("val_loss", ("f", "a", "max"), ("f", "b", "max"))
    free = Claim("nw", "a costs nothing against b", "no_worse", *args, tol=0.05)
    [v] = evaluate([free], rows)
    assert v["holds"]                                   # 10% better on seed 0 is no failure of "no worse"
    assert "A worse than B by -10.00% to +4.00% (bar <= +5%); margin +1.00 points; B's seed spread 0.00%" \
        in v["evidence"], v["evidence"]
    assert not evaluate([Claim("w", "", "within", *args, tol=0.05)], rows)[0]["holds"]    # two-sided: fails
    rows[2]["val_loss"] = 1.06
    [v] = evaluate([free], rows)
    assert not v["holds"] and "margin -1.00 points" in v["evidence"], v["evidence"]
    higher = Claim("acc", "", "no_worse", "class_acc", ("f", "a", "max"), ("f", "b", "max"), tol=0.01)
    assert evaluate([higher], rows)[0]["holds"]         # accuracies 0.91, 0.9, 0.894 vs 0.9: at most 0.7% lower


def test_a_quality_bar_must_be_reached_on_every_seed():
    rows = rows_of({("a", 4): [0.5, 1.0, 1.5]})            # class_acc 0.95, 0.9, 0.85
    [v] = check_bars([QualityBar("q", "a is trained", "class_acc", ("f", "a", "max"), 0.85)], rows)
    assert v["holds"] and "closest seed's margin +0" in v["evidence"] and "bar >= 0.85" in v["evidence"], v
    [v] = check_bars([QualityBar("q", "", "class_acc", ("f", "a", "max"), 0.9)], rows)
    assert not v["holds"] and "seed 2: 0.85" in v["evidence"] and "margin -0.05" in v["evidence"], v
    [v] = check_bars([QualityBar("q", "", "val_loss", ("f", "a", 4), 1.5)], rows)    # lower is better: at most
    assert v["holds"]
    assert not check_bars([QualityBar("q", "", "val_loss", ("f", "b", 4), 1.5)], rows)[0]["holds"]   # no seeds


def test_separation_is_about_the_seed_ranges():
    rows = rows_of({("a", 1): [1.0, 1.1], ("b", 1): [1.2, 1.3], ("c", 1): [1.05, 1.4]})
    assert separation(rows, "val_loss", ("f", "a", 1), ("f", "b", 1))["separated"]
    assert not separation(rows, "val_loss", ("f", "a", 1), ("f", "c", 1))["separated"]
    s = summarize(rows)[0]
    assert s["seeds"] == [0, 1] and s["val_loss"]["min"] == 1.0 and abs(s["val_loss"]["mean"] - 1.05) < 1e-12


def test_result_blocks_are_generated_from_docs():
    assert set(PAGES) == {"README.md", "docs/results.md"}
    for page in PAGES:
        text = (ROOT / page).read_text()
        assert render(text, ROOT / "docs", page) == text, f"{page}: run python -m studies.readme"
    full = (ROOT / "docs" / "results.md").read_text()
    assert all(f"<!-- results:{name} -->" in full for name in STUDIES)     # the full tables live there
    r = subprocess.run([sys.executable, "-m", "studies.readme", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_stale_or_missing_block_is_caught():
    for page in PAGES:
        text = (ROOT / page).read_text()
        stale = text.replace("**PASS**", "**FAIL**", 1)
        assert stale != text and render(stale, ROOT / "docs", page) == text, page
        with pytest.raises(ValueError, match=f"{page} has no <!-- results:"):
            render(text.replace("<!-- /results:", "<!-- /result:"), ROOT / "docs", page)


def test_committed_results_come_from_full_runs_of_committed_code():
    for name in STUDIES:
        data = json.loads((ROOT / "docs" / f"{name}.json").read_text())
        meta = data["meta"]
        assert len(meta["seeds"]) >= 3 and not meta["quick"], name
        assert "dirty" not in meta["commit"] and meta["commit"] != "unknown", meta["commit"]
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", meta["commit"], "HEAD"], cwd=ROOT)
        assert ancestor.returncode == 0, f"docs/{name}.json names {meta['commit']}, not an ancestor of HEAD"
        claims = {c["name"] for c in data["claims"]}
        study = __import__(f"studies.{name}", fromlist=["CLAIMS"])
        expected = {c.name for c in study.CLAIMS} | {q.name for q in getattr(study, "QUALITY_BARS", [])}
        assert claims == expected, "docs/ predate a change of the claims: rerun the study"
