"""The eval.* keys of a recipe name the key when wrong, and the live evaluation's digits scorer gives what
elt-eval digits gives. In-training evaluation on real runs: tests/e2e/test_live_eval.py."""
import pytest


@pytest.mark.parametrize("override,key", [("eval.every=-1", "eval.every"), ("eval.num=0", "eval.num"),
                                          ("eval.cfg=-0.5", "eval.cfg"), ("eval.classes=[3,10]", "eval.classes"),
                                          ("eval.loops=0", "eval.loops"), ("eval.loops=4-1", "eval.loops"),
                                          ("eval.reference=ref.npz", "eval.reference"),
                                          ("eval.sampler=euler", "eval.sampler"), ("eval.evry=10", "evry")])
def test_bad_eval_keys_name_the_key(override, key):
    from elt_scale.config import RecipeError, load_recipe
    from tests.conftest import ROOT
    with pytest.raises(RecipeError, match=key):
        load_recipe(ROOT / "recipes" / "digits_masked.yaml", [override])


def test_digits_scorer_matches_elt_eval_digits():
    from elt_scale.metrics.digits import DigitsScorer, digits_metrics, real_digits, real_digits_uint8
    images, labels = real_digits_uint8()[:40], real_digits()[1][:40]
    labels[:10] = (labels[:10] + 1) % 10                      # a quarter misclassified on purpose
    scorer, expected = DigitsScorer(), digits_metrics(images, labels)
    for _ in range(2):                                        # the cached real features survive a reset
        got = scorer(images, labels)
        assert got["class_acc"] == expected["class_acc"] <= 0.75
        assert got["fd_digits"] == pytest.approx(expected["fd_digits"], rel=1e-5)
