"""The batch layout (elt_scale/batching.py): a recipe's global batch on any world size that divides it."""
import pytest

from elt_scale.batching import BatchLayoutError, accum_given, batch_layout, with_layout
from elt_scale.config import load_recipe
from tests.conftest import ROOT


def train_of(**kw):
    return load_recipe(None, [f"train.{k}={v}" for k, v in kw.items()]).train


def test_grad_accum_is_derived_and_the_recipes_micro_batch_kept_where_it_divides():
    t = train_of(global_batch=512, micro_batch=16, grad_accum=1)
    assert [(lay.micro_batch, lay.grad_accum) for lay in (batch_layout(t, w) for w in (1, 8, 32))] == \
        [(16, 32), (16, 4), (16, 1)]
    assert all(batch_layout(t, w).global_batch == 512 for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512))


def test_a_smaller_micro_batch_only_where_needed_never_a_larger_one():
    t = train_of(global_batch=512, micro_batch=16, grad_accum=4)
    assert (batch_layout(t, 64).micro_batch, batch_layout(t, 64).grad_accum) == (8, 1)
    assert batch_layout(t, 64).note == "train.micro_batch=8 (recipe: 16), train.grad_accum=1 (recipe: 4) keep " \
                                       "train.global_batch=512 on 64 ranks"
    assert batch_layout(t, 8).micro_batch == 16           # 64 per rank: 16 x 4, not 64 x 1
    t = train_of(global_batch=96, micro_batch=10)
    assert (batch_layout(t, 2).micro_batch, batch_layout(t, 2).grad_accum) == (8, 6)   # 48 = largest m <= 10 x 6


def test_the_recipes_own_layout_has_no_note():
    t = train_of(global_batch=64, micro_batch=8, grad_accum=2)
    assert batch_layout(t, 4).note == "" and batch_layout(t, 4).grad_accum == 2


def test_a_world_that_cannot_divide_names_those_that_can():
    t = train_of(global_batch=32, micro_batch=16)
    with pytest.raises(BatchLayoutError) as e:
        batch_layout(t, 3, per_node=2)
    assert str(e.value) == ("train.global_batch=32 cannot be split over 3 ranks; world sizes that can: 1, 2, 4, 8, 16, "
                            "32 (at 2 GPUs per node: 1, 2, 4, 8, 16 nodes)")


def test_a_command_line_grad_accum_is_kept_exactly_or_refused():
    assert not accum_given(["train.global_batch=32", "train.micro_batch=16"])   # a micro-batch is only a bound
    assert accum_given(["train.steps=3", "train.grad_accum=4"])
    t = train_of(global_batch=32, micro_batch=16, grad_accum=4)    # accumulation kept: the micro-batch gives way
    assert (batch_layout(t, 4, keep_accum=True).micro_batch, batch_layout(t, 4, keep_accum=True).grad_accum) == (2, 4)
    with pytest.raises(BatchLayoutError) as e:
        batch_layout(t, 16, keep_accum=True)
    assert str(e.value) == ("train.global_batch=32 cannot be split over 16 ranks with train.grad_accum=4 (micro-batch "
                            "at most 16); world sizes that can: 1, 2, 4, 8")


def test_no_global_batch_keeps_the_recipes_settings_on_any_world():
    t = train_of(micro_batch=8, grad_accum=3)
    lay = batch_layout(t, 5)
    assert (lay.micro_batch, lay.grad_accum, lay.global_batch, lay.note) == (8, 3, 120, "")


def test_every_shipped_recipe_launches_at_its_documented_node_counts():
    """The README's launch lines: 16 nodes x 8 GPUs for the masked XL recipe, 8 GPUs for diffusion 8x4."""
    for name, world in (("imagenet256_masked_elt_xl_7x4", 128), ("imagenet256_diffusion_elt_8x4", 8)):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        lay = batch_layout(recipe.train, world)
        assert lay.global_batch == recipe.train.global_batch and lay.micro_batch <= recipe.train.micro_batch
        applied = with_layout(recipe, lay)
        assert (applied.train.micro_batch, applied.train.grad_accum) == (lay.micro_batch, lay.grad_accum)
        assert applied.model == recipe.model
