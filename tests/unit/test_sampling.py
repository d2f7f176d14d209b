"""Samplers: determinism, shapes at every loop count (image and video), CFG, MaskGIT invariants,
loop schedules and adaptive loops, honest cost accounting. Untrained tiny models: fast, no training."""
import math

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.loopspec import Adaptive
from elt_scale.models import build_model
from elt_scale.flops import forward_flops
from elt_scale.sampling import generate, parse_loop_list, parse_loops
from elt_scale.sampling.loops import run_adaptive
from elt_scale.sampling.maskgit import choice_temperature, maskgit_sample
from elt_scale.sampling.predict import Cost, diffusion_x0, guided
from tests.conftest import ROOT

L_MAX = 3


def tiny(family: str, grid=(8, 8), **over):
    name = "digits_masked.yaml" if family == "masked" else "digits_diffusion.yaml"
    o = ["model.width=32", f"model.loops={L_MAX}", f"model.grid={list(grid)}", "model.unique_layers=1"]
    o += [f"{k}={v}" for k, v in over.items()]
    recipe = load_recipe(ROOT / "recipes" / name, o)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    with torch.no_grad():                  # DiT zero-inits its output and gates; untrained outputs would be 0
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model, recipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LABELS = torch.tensor([0, 3, 7, 9])


@pytest.mark.parametrize("family,grid", [("masked", (8, 8)), ("masked", (2, 4, 4)),
                                         ("diffusion", (8, 8)), ("diffusion", (2, 4, 4))])
def test_every_loop_count_gives_valid_output_and_is_deterministic(family, grid):
    over = {"model.patch_size": 2} if family == "diffusion" else {}
    model, recipe = tiny(family, grid, **over)
    outputs = {}
    for loops in range(1, L_MAX + 3):                       # 1 .. L_max + 2
        z, cost = generate(model, recipe, LABELS, str(loops), cfg=2.0, steps=4, sampler="ddim", generator=gen(1))
        if family == "masked":
            assert z.shape == (4, *grid) and z.dtype == torch.long
            assert int(z.min()) >= 0 and int(z.max()) < recipe.model.vocab_size   # no mask ids left
        else:
            assert z.shape == (4, 1, *grid) and torch.isfinite(z).all()
        assert cost.loops_per_step() == loops
        outputs[loops] = z
    again, _ = generate(model, recipe, LABELS, str(L_MAX), cfg=2.0, steps=4, sampler="ddim", generator=gen(1))
    other, _ = generate(model, recipe, LABELS, str(L_MAX), cfg=2.0, steps=4, sampler="ddim", generator=gen(2))
    assert torch.equal(again, outputs[L_MAX])
    assert not torch.equal(other, outputs[L_MAX])
    assert not torch.equal(outputs[1], outputs[L_MAX + 2])    # the loop count really changes the model


def test_ddpm_is_seeded_and_stochastic():
    model, recipe = tiny("diffusion", **{"model.patch_size": 2})
    a, _ = generate(model, recipe, LABELS, "2", steps=6, sampler="ddpm", generator=gen(0))
    b, _ = generate(model, recipe, LABELS, "2", steps=6, sampler="ddpm", generator=gen(0))
    c, _ = generate(model, recipe, LABELS, "2", steps=6, sampler="ddim", generator=gen(0))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_cfg_scale_one_equals_unguided(family):
    model, recipe = tiny(family, **({"model.patch_size": 2} if family == "diffusion" else {}))
    # the doubled (cond + null) batch at scale 1 gives the conditional output exactly as a single pass
    if family == "masked":
        from elt_scale.sampling.predict import masked_logits
        inputs = (torch.randint(0, 17, (4, 64)),)
        predict = lambda t, y: masked_logits(model, t, y, 2)
    else:
        inputs = (torch.randn(4, 1, 8, 8), torch.full((4,), 0.5))
        predict = lambda x, t, y: diffusion_x0(model, x, t, y, 2)
    single = guided(predict, inputs, LABELS, model.null_class, 1.0, Cost())
    both, _ = predict(*(torch.cat([x, x]) for x in inputs), torch.cat([LABELS, torch.full_like(LABELS, 10)]))
    from elt_scale.sampling.predict import guide
    assert torch.allclose(guide(both[:4], both[4:], 1.0), single, atol=1e-5)
    assert not torch.allclose(guide(both[:4], both[4:], 3.0), single, atol=1e-3)
    # and end to end: cfg=1 is the unguided sampler, with half the passes of a guided one
    z1, c1 = generate(model, recipe, LABELS, "2", cfg=1.0, steps=4, sampler="ddim", generator=gen(0))
    z3, c3 = generate(model, recipe, LABELS, "2", cfg=3.0, steps=4, sampler="ddim", generator=gen(0))
    assert c1.passes == 4 and c3.passes == 8 and not torch.equal(z1, z3)


def test_maskgit_unmasks_everything_and_never_remasks():
    model, _ = tiny("masked")
    trace = []
    steps = 8
    maskgit_sample(model, LABELS, parse_loops("2", L_MAX), steps=steps, cfg=2.0, generator=gen(0), trace=trace)
    assert len(trace) == steps
    n = model.seq_len
    masked_counts = [(t == model.mask_id).sum(1) for t in trace]
    for k, count in enumerate(masked_counts):               # cosine schedule, >= 1 new token per step
        assert (count <= math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))).all()
    assert (masked_counts[-1] == 0).all()
    for before, after in zip(trace, trace[1:]):
        fixed = before != model.mask_id
        assert torch.equal(after[fixed], before[fixed])   # committed tokens never change or re-mask
        assert ((after != model.mask_id).sum(1) > fixed.sum(1)).all()


def test_choice_temperature_formula():
    k_steps = 12
    assert [choice_temperature(k, k_steps) for k in range(k_steps)] == pytest.approx(
        [0.5 + 0.8 * (1 - (k + 1) / k_steps) for k in range(k_steps)])
    assert choice_temperature(k_steps - 1, k_steps) == pytest.approx(0.5)
    assert choice_temperature(0, 1) == pytest.approx(0.5)


def test_loop_specs():
    assert [s.spec for s in parse_loop_list("1-3,6>2,auto:0.05", 4)] == ["1", "2", "3", "6>2", "auto:0.05"]
    ramp = parse_loops("6>2", 4)
    assert [ramp.at(k, 5) for k in range(5)] == [6, 5, 4, 3, 2]
    piece = parse_loops("6/4/2", 4)
    assert [piece.at(k, 6) for k in range(6)] == [6, 6, 4, 4, 2, 2]
    assert parse_loops("auto:0.05", 4).at(0, 10) == Adaptive(0.05, 6)       # cap L_max + 2
    assert parse_loops("auto:0.05:9", 4).adaptive.max_loops == 9
    assert [parse_loops(x, 4).label for x in ("6>2", "6/4/2", "auto:0.02:8")] == ["L6to2", "L6-4-2", "Lauto_0.02_8"]
    for bad in ("0", "x", "auto:-1", "auto:", "3>0", "5-2", "-1", "1-2-3", "2-"):
        with pytest.raises(ValueError, match="loop"):
            parse_loop_list(bad, 4)


def test_ramp_schedule_runs_the_scheduled_loops():
    model, recipe = tiny("masked")
    _, cost = generate(model, recipe, LABELS, "5>1", steps=5, generator=gen(0))
    assert cost.loops.tolist() == [5 + 4 + 3 + 2 + 1] * 4


def test_adaptive_loops_stop_per_sample_and_match_fixed_loops():
    model, _ = tiny("masked")
    x = model.embed(torch.full((4, 64), model.mask_id), LABELS)
    with torch.no_grad():
        h_all, spent_all = run_adaptive(model.trunk, x, None, tau=1e-9, max_loops=5)
        h_one, spent_one = run_adaptive(model.trunk, x, None, tau=1e9, max_loops=5)
        fixed5 = model.trunk(x, exits=(5,))[0]
        fixed1 = model.trunk(x, exits=(1,))[0]
        assert spent_all.tolist() == [5] * 4 and spent_one.tolist() == [1] * 4
        assert torch.allclose(h_all, fixed5, atol=1e-5) and torch.allclose(h_one, fixed1, atol=1e-5)
        # a threshold between the samples' changes stops some samples earlier than others
        changes = []
        prev = x
        for _ in range(3):
            nxt = model.trunk.step(prev)
            changes.append((nxt - prev).flatten(1).norm(dim=1) / prev.flatten(1).norm(dim=1))
            prev = nxt
        tau = float(changes[1].median())
        _, spent = run_adaptive(model.trunk, x, None, tau=tau, max_loops=3)
        expect = [2 if float(changes[1][i]) < tau else 3 for i in range(4)]
        expect = [1 if float(changes[0][i]) < tau else e for i, e in enumerate(expect)]
        assert spent.tolist() == expect


def test_cost_is_steps_times_passes_times_forward_flops():
    for family in ("masked", "diffusion"):
        model, recipe = tiny(family, **({"model.patch_size": 2} if family == "diffusion" else {}))
        for cfg, passes in ((1.0, 1), (2.0, 2)):
            _, cost = generate(model, recipe, LABELS, "3", cfg=cfg, steps=5, sampler="ddim", generator=gen(0))
            expect = 5 * passes * forward_flops(recipe.model, 3)
            assert cost.flops_per_sample(recipe.model).tolist() == pytest.approx([expect] * 4)


def test_gumbel_noise_is_finite_with_the_right_mean():
    from elt_scale.sampling.maskgit import gumbel
    g = gumbel((20000,), gen(0))
    assert torch.isfinite(g).all()
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.03)      # Euler–Mascheroni


def test_ddim_and_ddpm_steps_follow_the_training_schedule():
    from elt_scale.objectives import add_noise, alpha_sigma
    from elt_scale.sampling.diffusion import ddim_step, ddpm_step
    g = gen(0)
    x0 = torch.full((20000, 1), 0.7)
    eps = torch.randn(x0.shape, generator=g)
    t, s = torch.tensor(0.8), torch.tensor(0.5)
    x_t = add_noise(x0, t.expand(20000), eps, shift=2.0)
    (a_t, s_t), (a_s, s_s) = alpha_sigma(t, 2.0), alpha_sigma(s, 2.0)
    # DDIM with the true x0 moves along the same noise: exactly the forward process at s
    assert torch.allclose(ddim_step(x_t, x0, a_t, s_t, a_s, s_s), a_s * x0 + s_s * eps, atol=1e-5)
    # DDPM's posterior sample has the forward marginal at s: mean a_s·x0, std sigma_s
    x_s = ddpm_step(x_t, x0, a_t, s_t, a_s, s_s, torch.randn(x0.shape, generator=g))
    assert float(x_s.mean()) == pytest.approx(float(a_s * 0.7), abs=0.02)
    assert float(x_s.std()) == pytest.approx(float(s_s), rel=0.03)


# ---------------------------------------------------------------------------------------------
# elt-sample: a user's mistake is one line on stderr and exit 2, before anything is written

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import yaml
    from safetensors.torch import save_file

    from elt_scale.config import recipe_to_dict
    model, recipe = tiny("masked")
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"recipe": yaml.safe_dump(recipe_to_dict(recipe)), "ema": "false"})
    return path


@pytest.mark.parametrize("flag,value", [("--num", "0"), ("--batch-size", "0"), ("--steps", "0"),
                                        ("--temperature", "0")])
def test_elt_sample_bad_numbers_are_usage_errors(flag, value, tiny_export, tmp_path, capsys):
    from elt_scale import sample
    with pytest.raises(SystemExit) as e:
        sample.main([str(tiny_export), flag, value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"{flag} {value}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the message on a machine without CUDA")
def test_elt_sample_cuda_without_cuda_is_a_usage_error(tiny_export, tmp_path, capsys):
    from elt_scale import sample
    with pytest.raises(SystemExit) as e:
        sample.main([str(tiny_export), "--device", "cuda:1", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--device cuda:1: this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("model,args,words", [
    ("missing", [], "no such run directory or .safetensors file"),
    ("not_safetensors", [], "not a safetensors file"),
    ("run_without_ckpt", [], "no 'latest' checkpoint pointer"),
    ("export", ["--ema"], "exported without --ema"),
    ("export", ["--loops", "0"], "loop spec '0'"),
    ("export", ["--class", "10"], "--class 10: the model has classes 0..9"),
])
def test_elt_sample_user_errors_are_one_line_exit_2(model, args, words, tiny_export, digits_shards, tmp_path,
                                                     capsys):
    from elt_scale import sample
    from elt_scale.config import save_recipe
    path = {"missing": tmp_path / "nope", "not_safetensors": tmp_path / "x.npz",
            "run_without_ckpt": tmp_path / "run", "export": tiny_export}[model]
    if model == "not_safetensors":
        path.write_bytes(b"PK\x03\x04 not a safetensors header")
    if model == "run_without_ckpt":
        path.mkdir()
        save_recipe(tiny("masked")[1], path / "recipe.yaml")
    rc = sample.main([str(path), *args, "--shards", str(digits_shards), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert err.startswith("elt-sample: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
