import pytest

from elt_scale.config import RecipeError, load_recipe
from tests.conftest import ROOT

MASKED = ROOT / "recipes" / "digits_masked.yaml"


def test_recipe_loads_with_overrides():
    r = load_recipe(MASKED, ["train.steps=7", "deepspeed.zero_stage=3", "train.lr=1e-4", "model.grid=[4, 4]"])
    assert r.train.steps == 7 and r.deepspeed.zero_stage == 3 and r.train.lr == 1e-4 and r.model.grid == [4, 4]
    for key in ("run.name", "run.out_dir", "run.seed", "data.shards", "model.family", "model.width", "model.heads",
                "model.unique_layers", "model.loops", "ilsd.enabled", "ilsd.min_loops", "train.steps",
                "train.micro_batch", "train.grad_accum", "train.lr", "train.log_every", "train.save_every",
                "deepspeed.zero_stage", "train.checkpointing"):
        section, name = key.split(".")
        assert hasattr(getattr(r, section), name), key


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["train.stepz", "allowed", "steps"]),
    ("bogus.x=1", ["bogus", "allowed"]),
    ("train.steps=abc", ["train.steps", "integer"]),
    ("ilsd.enabled=maybe", ["ilsd.enabled", "true or false"]),
    ("ilsd.min_loops=4", ["ilsd.min_loops", "1 .. model.loops-1 = 3"]),
    ("model.family=gan", ["model.family", "masked", "diffusion"]),
    ("train.checkpointing=all", ["train.checkpointing", "none", "loop", "layer"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "0, 1, 2, 3"]),
    ("deepspeed.offload_optimizer=true", ["deepspeed.offload_optimizer", "ZeRO-Offload needs stage 1, 2 or 3"]),
    ("deepspeed.offload_params=true", ["deepspeed.offload_params", "deepspeed.zero_stage=0", "only at stage 3"]),
    ("model.width=65", ["model.width", "multiple of model.heads"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(MASKED, [override])
    for w in words:
        assert w in str(e.value)


def test_bad_recipe_file_is_a_clear_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [1, 2]\n")
    with pytest.raises(RecipeError, match="model"):
        load_recipe(p)
