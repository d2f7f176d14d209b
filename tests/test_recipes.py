"""Every recipe loads and builds on the meta device; paper-scale ones match the paper's parameter counts and
state, in their header, a cluster and a memory figure that agree with elt-plan."""
import re

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine.ds_config import global_batch
from elt_scale.models import build_model, count_params
from elt_scale.plan import make_plan

from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER = sorted(p for p in RECIPES if not p.name.startswith("digits_"))

# unique parameters the paper reports (DESIGN.md), in millions
PAPER_PARAMS = {
    "imagenet256_masked_elt_l_8x3": 101,
    "imagenet256_masked_elt_l_12x2": 152,
    "imagenet256_masked_elt_xl_7x4": 111,
    "imagenet256_masked_maskgit_l_24": 303,
    "imagenet256_masked_maskgit_xl_28": 446,
    "ucf101_masked_elt_6x4": 76,
    "imagenet256_diffusion_elt_16x2": 1100,
    "imagenet256_diffusion_dit_32": 2100,
}

HEADER = re.compile(r"= (?P<gpus>\d+) GPUs, ZeRO-(?P<zero>\d), micro-batch (?P<mb>\d+) .*checkpointing: (?P<ckpt>\w+)\.")
MEMORY = re.compile(r"Memory \(elt-plan, bf16\): (?P<gib>[\d.]+) GiB per GPU")


def meta_params(recipe) -> int:
    with torch.device("meta"):
        return count_params(build_model(recipe))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_builds_on_meta(path):
    recipe = load_recipe(path)
    assert recipe.run.name == path.stem
    assert meta_params(recipe) > 0


def test_paper_recipes_cover_the_issue():
    names = {p.stem for p in PAPER}
    assert set(PAPER_PARAMS) <= names
    assert {"imagenet256_diffusion_elt_4x8", "imagenet256_diffusion_elt_8x4", "imagenet256_diffusion_dit_16",
            "ucf101_diffusion_elt_8x4"} <= names


@pytest.mark.parametrize("name,millions", sorted(PAPER_PARAMS.items()))
def test_parameter_counts_match_the_paper(name, millions):
    params = meta_params(load_recipe(ROOT / "recipes" / f"{name}.yaml")) / 1e6
    assert abs(params - millions) <= 0.05 * millions, f"{name}: {params:.1f}M vs paper {millions}M"


def test_looped_and_baseline_recipes_are_one_swap_apart():
    """Baselines are loops=1 with N = the ELT's effective depth and ILSD off; everything else is shared."""
    load = lambda n: load_recipe(ROOT / "recipes" / f"{n}.yaml")   # noqa: E731
    for elt, base in [("imagenet256_masked_elt_l_8x3", "imagenet256_masked_maskgit_l_24"),
                      ("imagenet256_masked_elt_xl_7x4", "imagenet256_masked_maskgit_xl_28"),
                      ("imagenet256_diffusion_elt_16x2", "imagenet256_diffusion_dit_32")]:
        e, b = load(elt), load(base)
        assert b.model.loops == 1 and not b.ilsd.enabled and e.ilsd.enabled
        assert b.model.unique_layers == e.model.unique_layers * e.model.loops
        assert (b.model.width, b.model.grid, b.train.lr, b.train.global_batch) == \
               (e.model.width, e.model.grid, e.train.lr, e.train.global_batch)
    for n in ("imagenet256_diffusion_elt_4x8", "imagenet256_diffusion_elt_8x4", "imagenet256_diffusion_elt_16x2"):
        m = load(n).model
        assert m.unique_layers * m.loops == 32


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_header_states_cluster_and_memory_that_elt_plan_confirms(path):
    text = path.read_text()
    cluster, mem = HEADER.search(text), MEMORY.search(text)
    assert cluster and mem, f"{path.name}: header must state the cluster and the per-GPU memory"
    recipe = load_recipe(path)
    gpus = int(cluster["gpus"])
    assert global_batch(recipe, gpus) == recipe.train.global_batch          # micro × accum × GPUs adds up
    assert (recipe.deepspeed.zero_stage, recipe.train.micro_batch, recipe.train.checkpointing) == \
           (int(cluster["zero"]), int(cluster["mb"]), cluster["ckpt"])
    plan = make_plan(recipe, gpus=gpus, gpu_mem_gib=80)
    row = next(r for r in plan["memory"] if (r["zero_stage"], r["checkpointing"]) ==
               (recipe.deepspeed.zero_stage, recipe.train.checkpointing))
    assert row["fits"] and abs(row["total"] - float(mem["gib"])) < 0.1, (row["total"], mem["gib"])
