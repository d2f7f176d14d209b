import pytest
import yaml

from elt_scale.config import RecipeError, load_recipe, recipe_from_yaml, recipe_to_dict, save_recipe
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


@pytest.mark.parametrize("override, line", [
    ("train.stpes=3", "unknown key train.stpes in train (did you mean train.steps?); allowed: betas, bf16,"),
    ("train.betas=[0.9, x]", "train.betas[1]='x': expected a number"),            # list elements are typed
    ("model.grid=[8, 0]", "model.grid[1]=0 is out of range; allowed: [H, W] or [T, H, W] of positive integers"),
    ("eval.classes=[1, a]", "eval.classes[1]='a': expected an integer"),
    ("train.steps=true", "train.steps=True: expected an integer"),                 # strict: no true -> 1
    ("deepspeed.zero_stage=true", "deepspeed.zero_stage=True: expected an integer"),
    ("train.ema_decay=1", "train.ema_decay=1 is out of range; allowed: >= 0 and < 1 (0 = off)"),
    ("train.lr=0", "train.lr=0 is out of range; allowed: > 0"),
])
def test_an_error_is_one_line_naming_file_key_value_and_allowed(override, line):
    with pytest.raises(RecipeError) as e:
        load_recipe(MASKED, [override])
    message = str(e.value)
    assert message.startswith(line) and message.endswith(f"; in {MASKED}") and "\n" not in message, message


def test_numbers_stay_what_yaml_and_the_command_line_mean(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("run:\n  name: 123\ntrain:\nmodel: {width: 32, heads: 2}\n")        # an empty section: defaults
    r = load_recipe(p, ["train.lr=1e-4", "data.io_timeout_s=5", "train.betas=[0, 0.9]"])
    assert r.run.name == "123" and r.train.steps == 300 and r.model.width == 32
    assert r.train.lr == 1e-4 and type(r.data.io_timeout_s) is float and r.train.betas == [0.0, 0.9]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipe_loads_what_it_says_and_round_trips_through_its_saved_form(path, tmp_path):
    recipe = load_recipe(path)
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            assert getattr(getattr(recipe, section), key) == value, f"{path.name}: {section}.{key}"
    save_recipe(recipe, tmp_path / "recipe.yaml")                    # what a run folder keeps for resume/sampling
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == recipe and recipe_to_dict(again) == recipe_to_dict(recipe)
    assert recipe_from_yaml(yaml.safe_dump(recipe_to_dict(recipe))) == recipe       # an export's metadata
