import pytest
import torch

from elt_scale.models import build_model, count_params
from elt_scale.models import LoopedTrunk
from tests.tiny_models import inputs, perturb, tiny


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_params_depend_on_n_not_l(family):
    torch.manual_seed(0)
    base = count_params(build_model(tiny(family, **{"model.loops": 2})))
    assert count_params(build_model(tiny(family, **{"model.loops": 8}))) == base
    assert count_params(build_model(tiny(family, **{"model.unique_layers": 3, "model.loops": 2}))) > base


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_exit_equals_separate_shorter_pass(family):
    r = tiny(family)
    torch.manual_seed(0)
    model = perturb(build_model(r)).eval()
    x = inputs(model, r)
    with torch.no_grad():
        outs = model(*x, exits=(1, 2, 3))
        for l, out in zip((1, 2, 3), outs):
            (alone,) = model(*x, exits=(l,))
            torch.testing.assert_close(out, alone, rtol=0, atol=0)
        assert not torch.allclose(outs[0], outs[2])


def test_trunk_runs_beyond_l_max():
    trunk = LoopedTrunk(16, 2, unique_layers=1, loops=2)
    h = torch.randn(2, 5, 16)
    a, b = trunk(h, exits=(2, 5))
    assert a.shape == b.shape == h.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_grads_reach_shared_layers_from_student_and_teacher(family):
    r = tiny(family)
    torch.manual_seed(0)
    model = perturb(build_model(r))
    x = inputs(model, r)
    for which in (0, 1):       # 0: student (exit 1) alone, 1: teacher (exit 3) alone
        model.zero_grad()
        outs = model(*x, exits=(1, 3))
        outs[which].float().pow(2).mean().backward()
        for layer in model.trunk.layers:
            g = layer.mlp.fc1.weight.grad
            assert g is not None and g.abs().sum() > 0, f"no grad from exit {which}"


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_checkpointing_policies_agree(family):
    results = []
    for policy in ("none", "loop", "layer"):
        r = tiny(family, **{"train.checkpointing": policy})
        torch.manual_seed(0)
        model = perturb(build_model(r))
        x = inputs(model, r)
        outs = model(*x, exits=(2, 3))
        loss = sum(o.float().pow(2).mean() for o in outs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy,recomputed", [("none", 0), ("loop", 2 * 2), ("layer", 2 * 3 - 1)])
def test_last_unit_is_not_recomputed(policy, recomputed):
    """2N×3L: backward reruns every checkpointed unit except the pass's last one (its activations are
    needed at once): loop → loops 1-2 (4 layer calls), layer → every layer call but the final one."""
    torch.manual_seed(0)
    model = build_model(tiny("masked", **{"train.checkpointing": policy}))
    calls = []
    for layer in model.trunk.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))   # a recompute may stop before the end
    outs = model(*inputs(model, tiny("masked")), exits=(1, 3))
    assert len(calls) == 2 * 3
    sum(o.float().pow(2).mean() for o in outs).backward()
    assert len(calls) - 2 * 3 == recomputed


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_video_inputs(family):
    r = tiny(family, grid=(2, 4, 4), **({"model.temporal_patch": 2} if family == "diffusion" else {}))
    torch.manual_seed(0)
    model = build_model(r)
    x = inputs(model, r, b=2)
    outs = model(*x, exits=(1, 3))
    if family == "masked":
        assert outs[1].shape == (2, 2 * 4 * 4, r.model.vocab_size)
    else:
        assert outs[1].shape == x[0].shape
    outs[1].float().mean().backward()


def test_flops_scale_with_loops_and_match_a_profiler():
    from torch.utils.flop_counter import FlopCounterMode

    from elt_scale.flops import forward_flops, sequence_length, trunk_flops
    for family in ("masked", "diffusion"):
        r = tiny(family)
        m = r.model
        assert trunk_flops(m, 4) == 2 * trunk_flops(m, 2)
        model = build_model(r).eval()
        x = inputs(model, r, b=1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*x, exits=(3,))
        measured = counter.get_total_flops()
        # torch's counter does not see SDPA on the CPU; add the attention matmuls (4·n²·d per layer) back
        attention = m.unique_layers * 3 * 4 * sequence_length(m) ** 2 * m.width
        assert abs(forward_flops(m, 3) - attention - measured) / measured < 0.02, (family, measured)
