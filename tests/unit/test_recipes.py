"""Every recipe loads and builds on the meta device; paper-scale ones match the paper's parameter counts and
state, in their header, a cluster and a memory figure that agree with elt-plan."""
import math
import re

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine.resume import global_batch
from elt_scale.models import build_model, count_params
from elt_scale.plan import make_plan
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER = sorted(p for p in RECIPES if not p.name.startswith("digits_"))

# unique parameters the paper (arXiv 2604.09168) reports for each model, in millions
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

# Recipes fed by another tokenizer than the paper's: the paper's count assumes the paper's tokenizer, so it is
# checked there (these overrides), and the difference to the recipe as shipped is checked to be exactly the
# embedding, output head and positions the other codebook and grid need (test below).
PAPER_TOKENIZER = {
    # MAGVIT 3D VQ, 1024 codes, 16×128×128 -> 4×16×16 (not public); the recipe: Cosmos DV4x8x8, 64,000 codes, 5×16×16
    "ucf101_masked_elt_6x4": ("model.vocab_size=1024", "model.grid=[4,16,16]"),
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
    """At the paper's tokenizer (for the recipes in PAPER_TOKENIZER; every other recipe as shipped)."""
    params = meta_params(load_recipe(ROOT / "recipes" / f"{name}.yaml", PAPER_TOKENIZER.get(name, ()))) / 1e6
    assert abs(params - millions) <= 0.05 * millions, f"{name}: {params:.1f}M vs paper {millions}M"


@pytest.mark.parametrize("name", sorted(PAPER_TOKENIZER))
def test_another_tokenizer_changes_only_embedding_head_and_positions(name):
    """Shipped minus paper-tokenizer parameters = (ΔV)·d token embedding rows + (ΔV)·(d + 1) output head
    weights and biases + (Δn)·d position rows, where V is the codebook and n the tokens per sample."""
    shipped = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    paper = load_recipe(ROOT / "recipes" / f"{name}.yaml", PAPER_TOKENIZER[name])
    d = shipped.model.width
    dv = shipped.model.vocab_size - paper.model.vocab_size
    dn = math.prod(shipped.model.grid) - math.prod(paper.model.grid)
    assert meta_params(shipped) - meta_params(paper) == dv * d + dv * (d + 1) + dn * d
    assert (shipped.model.width, shipped.model.unique_layers, shipped.model.loops) == \
           (paper.model.width, paper.model.unique_layers, paper.model.loops)      # the same looped block


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
