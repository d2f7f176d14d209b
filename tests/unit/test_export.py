"""elt-export's errors: --ema of a run without EMA, a bad --out or --tag, each one line and exit 2; the out
folder is created. The round trip against the DeepSpeed engine: tests/multiproc/test_export_round_trip.py."""
import subprocess
import sys

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine import checkpoint as ckpt
from tests.conftest import ROOT, run_train


def test_export_ema_of_a_run_without_ema_fails_clearly(tmp_path, digits_shards):
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={tmp_path}", "run.name=noema",
                  "model.width=32", "train.micro_batch=8", "train.steps=1", "train.save_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "elt_scale.export", str(tmp_path / "noema"), "--ema",
                        "--out", str(tmp_path / "m.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no EMA shards" in r.stderr and "train.ema_decay" in r.stderr
    assert not (tmp_path / "m.safetensors").exists()


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory as elt-train leaves it (recipe.yaml, ckpt/latest -> step_00000001), without training."""
    from elt_scale.config import save_recipe
    from elt_scale.models import build_model
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml", ["model.width=32"])
    run = tmp_path / "run"
    folder = run / "ckpt" / ckpt.tag_for(1)
    folder.mkdir(parents=True)
    save_recipe(recipe, run / "recipe.yaml")
    torch.save({"module": build_model(recipe).state_dict()}, folder / "mp_rank_00_model_states.pt")
    ckpt.write_pointer(run / "ckpt", folder.name)
    return run


@pytest.mark.parametrize("case,words", [
    ("out_is_dir", "is a directory; give a file name such as"),
    ("unknown_tag", "step_00000009: no such checkpoint; tags in"),
])
def test_export_bad_out_or_tag_is_one_line_exit_2(case, words, tiny_run, tmp_path, capsys):
    from elt_scale.export import main
    out, tag = tmp_path / "model.safetensors", []
    if case == "out_is_dir":
        out.mkdir()
    else:
        tag = ["--tag", "step_00000009"]
    assert main([str(tiny_run), *tag, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elt-export: ") and words in err and err.count("\n") == 1, err
    assert case == "out_is_dir" or "step_00000001" in err                              # the tags there are listed
    assert list(tmp_path.glob("*.tmp")) == [] and (out.is_dir() or not out.exists())   # no stray OUT.tmp


def test_export_creates_the_out_folder(tiny_run, tmp_path):
    from elt_scale.export import main
    from elt_scale.inference.load import load
    out = tmp_path / "new" / "dir" / "model.safetensors"
    assert main([str(tiny_run), "--out", str(out)]) == 0
    assert load(out).recipe.model.width == 32
