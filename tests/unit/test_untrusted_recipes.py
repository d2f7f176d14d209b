"""Recipes and overrides are data, never code (issue 9)."""
import subprocess
import sys

import pytest

from elt_scale.config import RecipeError, load_recipe, parse_override
from tests.conftest import ROOT

MASKED = ROOT / "recipes" / "digits_masked.yaml"


def test_python_object_tag_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="not a plain YAML recipe"):
        load_recipe(evil)
    assert not marker.exists()


def test_unknown_tag_is_refused(tmp_path):
    p = tmp_path / "tag.yaml"
    p.write_text("train: !custom {steps: 3}\n")
    with pytest.raises(RecipeError):
        load_recipe(p)


def test_shell_substitution_in_override_stays_a_string(tmp_path):
    marker = tmp_path / "MARKER"
    key, value = parse_override(f"run.out_dir=$(touch {marker})")
    assert value == f"$(touch {marker})" and not marker.exists()
    r = load_recipe(MASKED, [f"run.out_dir=$(touch {marker})"])
    assert r.run.out_dir == f"$(touch {marker})"
    assert not marker.exists()


def test_run_name_cannot_leave_the_output_directory():
    for bad in ("../escape", "a/b", "$(touch MARKER)", ".hidden"):
        with pytest.raises(RecipeError, match="run.name"):
            load_recipe(MASKED, [f"run.name={bad}"])


def test_python_expression_override_is_not_evaluated(tmp_path):
    with pytest.raises(RecipeError, match="train.lr.*expected a number"):
        load_recipe(MASKED, ["train.lr=__import__('os').system('touch MARKER')"])
    assert not (ROOT / "MARKER").exists()


def test_cli_never_evaluates_overrides(tmp_path):
    marker = tmp_path / "MARKER"
    r = subprocess.run([sys.executable, "-m", "elt_scale.train", str(MASKED), f"run.name=$(touch {marker})",
                        f"train.lr=__import__('os').system('touch {marker}')"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and ("run.name" in r.stderr or "train.lr" in r.stderr)
    assert not marker.exists()
