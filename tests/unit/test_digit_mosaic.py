"""The digit-mosaic source (issue 40): a built-in proxy task whose class depends on every digit of the canvas.
Deterministic from the seed, shaped as the grid says, labelled by its rule, train and val built from disjoint
source digits, written by tokenize.py like any source, and trainable through a digits recipe with overrides."""
import json
import re

import numpy as np
import pytest
import torch

from data_prep import tokenize
from data_prep.sources import digit_mosaic, digits
from elt_scale.config import load_recipe
from elt_scale.data import check_data, make_loader
from elt_scale.models import build_model
from tests.conftest import ROOT
from tests.datasets import read_samples


def cells_of(item) -> list[int]:
    """The digits-dataset indices a mosaic was tiled from, read back from its `source` field."""
    return [int(i) for i in re.fullmatch(r"digits\[([\d,]+)\]", item.source).group(1).split(",")]


def canvas(src, j):
    return src.decode(src.items[j].ref, False)[0].numpy()


def test_same_seed_same_mosaics_other_seed_other_mosaics():
    a, b = digit_mosaic("train", "2x2", "sum", 50, seed=3), digit_mosaic("train", "2x2", "sum", 50, seed=3)
    c = digit_mosaic("train", "2x2", "sum", 50, seed=4)
    assert [it.source for it in a.items] == [it.source for it in b.items]
    assert all(np.array_equal(canvas(a, j), canvas(b, j)) for j in range(50))
    assert sum(x.source != y.source for x, y in zip(a.items, c.items)) > 40


@pytest.mark.parametrize("grid, shape", [("2x2", [16, 16]), ("1x3", [8, 24]), ("3x3", [24, 24])])
def test_each_cell_is_its_source_digit(grid, shape):
    from sklearn.datasets import load_digits
    images, targets = load_digits().images / 16.0, load_digits().target
    rows, cols = (int(v) for v in grid.split("x"))
    src = digit_mosaic("val", grid, "sum", 20, seed=0)
    assert src.grid == shape and src.channels == 1 and len(src.items) == 20
    for j, item in enumerate(src.items):
        x, ids = canvas(src, j), cells_of(item)
        assert x.shape == tuple(shape) and len(ids) == rows * cols
        for k, i in enumerate(ids):     # row-major: cell k sits at row k // cols, column k % cols
            r, c = divmod(k, cols)
            assert np.allclose(x[8 * r:8 * r + 8, 8 * c:8 * c + 8], images[i])
        assert item.label == targets[ids].sum() % 10


def test_first_rule_is_the_top_left_digit_and_sum_is_not():
    from sklearn.datasets import load_digits
    targets = load_digits().target
    first = digit_mosaic("train", "2x2", "first", 200, seed=0)
    assert all(it.label == targets[cells_of(it)[0]] for it in first.items)
    summed = digit_mosaic("train", "2x2", "sum", 200, seed=0)
    assert [cells_of(it) for it in summed.items] == [cells_of(it) for it in first.items]   # same draw
    # the two rules must disagree on most mosaics (else `sum` would not need the other cells)
    assert sum(a.label != b.label for a, b in zip(summed.items, first.items)) > 150
    counts = np.bincount([it.label for it in summed.items], minlength=10)
    assert counts.min() > 5                                                                   # every class occurs


def test_train_and_val_share_no_source_digit():
    train = {i for it in digit_mosaic("train", "2x2", "sum", None, seed=0).items for i in cells_of(it)}
    val = {i for it in digit_mosaic("val", "2x2", "sum", None, seed=0).items for i in cells_of(it)}
    assert train.isdisjoint(val)
    # the split is the digits source's: val digits are its val digits (every 10th image)
    assert val <= {int(it.source[7:-1]) for it in digits("val").items} and len(val) > 150


@pytest.mark.parametrize("kwargs, message", [
    (dict(mosaic_grid="2by2"), "expected ROWSxCOLS"), (dict(mosaic_grid="1x1"), "at least two cells"),
    (dict(mosaic_rule="max"), "--mosaic-rule 'max'"), (dict(mosaic_count=0), "--mosaic-count 0"),
    (dict(split="test"), "digit-mosaic has splits train and val")])
def test_bad_options_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        digit_mosaic(**kwargs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaic")
    for split, count in (("train", 96), ("val", 24)):
        assert tokenize.main(["--source", "digit-mosaic", "--split", split, "--mosaic-count", str(count),
                              "--samples-per-shard", "40", "--workers", "0", "--out", str(out)]) == 0
    return out


def test_tokenize_writes_the_mosaics_as_pixel_codes(shards):
    m = json.loads((shards / "manifest.json").read_text())
    assert m["sample"]["shape"] == [16, 16] and m["sample"]["kind"] == "codes" and m["sample"]["vocab_size"] == 17
    assert m["source"] == {"name": "digit-mosaic", "mosaic_grid": "2x2", "mosaic_rule": "sum", "mosaic_count": 24}
    assert m["splits"]["train"]["num_samples"] == 96 and m["splits"]["val"]["num_samples"] == 24
    src = digit_mosaic("val", "2x2", "sum", 24, seed=0)
    by_key = {it.name: it for it in src.items}
    for key, (label, x, source) in read_samples(shards, "val").items():
        item = by_key[key]
        assert label == item.label and source == item.source
        # the pixels tokenizer's 17 levels of the decoded canvas in [0, 1]
        assert np.array_equal(x, np.rint(canvas(src, item.ref) * 16).astype(x.dtype))


def test_other_mosaic_options_refuse_the_same_out_dir(shards, capsys):
    assert tokenize.main(["--source", "digit-mosaic", "--split", "val", "--mosaic-rule", "first",
                          "--workers", "0", "--out", str(shards)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_digits_recipe_trains_on_it_with_overrides(shards):
    recipe = ROOT / "recipes" / "digits_masked.yaml"
    with pytest.raises(ValueError, match=r"sample shape \[16, 16\] != recipe's \[8, 8\]"):
        check_data(load_recipe(recipe, [f"data.shards={shards}"]))
    r = load_recipe(recipe, [f"data.shards={shards}", "model.grid=[16,16]", "train.micro_batch=8",
                             "data.num_workers=0"])
    check_data(r)
    codes, labels = next(iter(make_loader(r)))[:2]
    assert codes.shape == (8, 16, 16) and labels.max() < 10
    torch.manual_seed(0)
    logits = build_model(r)(codes, labels, exits=[1])[0]
    assert logits.shape[:2] == (8, 256) and torch.isfinite(logits).all()
