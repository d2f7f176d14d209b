"""elt-plan's memory model against the bytes small models really hold on CPU (fp32).

Activations are counted with saved-tensor hooks: every tensor autograd keeps for backward, each storage
once, parameters excluded. Non-reentrant checkpointing saves its inputs through the same hooks, so what a
forward pass leaves for backward is measured the same way under every policy (the checkpointed inputs plus
the last unit's internals: it is not checkpointed); one unit's internals ('recompute') are measured by
running a loop, or a layer, un-checkpointed under the hooks."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.objectives import ilsd_loss
from elt_scale.models import build_model
from elt_scale.objectives import build_objective
from elt_scale.plan import PRECISIONS, GiB, activation_parts, make_plan, memory, parameter_counts, state_bytes
from elt_scale.plan import main as plan_main
from elt_scale.schedules import Schedules
from tests.conftest import ROOT

FP32 = PRECISIONS["fp32"]
B = 8


class SavedBytes:
    """Sum of distinct storages autograd saves for backward inside the context, parameters excluded."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def small_recipe(family: str, policy: str, ilsd: bool = True, **model):
    over = [f"train.checkpointing={policy}", f"ilsd.enabled={str(ilsd).lower()}", "model.unique_layers=2",
            "model.loops=3"] + [f"model.{k}={v}" for k, v in model.items()]
    return load_recipe(ROOT / "recipes" / f"digits_{family}.yaml", over)


def batch(recipe):
    g = torch.Generator().manual_seed(0)
    m = recipe.model
    if m.family == "masked":
        x = torch.randint(0, m.vocab_size, (B, *m.grid), generator=g)
    else:
        x = torch.randn(B, m.channels, *m.grid, generator=g)
    return x, torch.randint(0, m.num_classes, (B,), generator=g)


def forward_loss(model, objective, recipe, x, labels):
    prepared = objective.prepare(x, labels, torch.Generator().manual_seed(1))
    L = recipe.model.loops
    if recipe.ilsd.enabled:
        student, teacher = model(*prepared.inputs, exits=(1, L))
    else:
        (teacher,), student = model(*prepared.inputs, exits=(L,)), None
    return ilsd_loss(teacher, student, objective, prepared, 0.5)[0]


def measure_recompute(model, recipe, policy):
    """Bytes one checkpointed unit saves while it is recomputed: run it un-checkpointed under the hooks."""
    trunk, m = model.trunk, recipe.model
    n = model.seq_len + 1 if m.family == "masked" else model.pos_emb.shape[1]
    x = torch.randn(B, n, m.width, requires_grad=True)
    cond = torch.randn(B, m.width, requires_grad=True) if m.family == "diffusion" else None
    trunk.checkpointing = "none"
    try:
        with SavedBytes(model) as saved:
            trunk.block(x, cond) if policy == "loop" else trunk.layers[0](x, cond)
    finally:
        trunk.checkpointing = policy
    return saved.total


def within(estimate, measured, tol=0.10):
    return abs(estimate - measured) <= tol * measured


CASES = [("masked", True), ("masked", False), ("diffusion", True)]


@pytest.mark.parametrize("family,ilsd", CASES)
@pytest.mark.parametrize("policy", ["none", "loop", "layer"])
def test_activation_estimate_matches_saved_tensors(family, ilsd, policy):
    recipe = small_recipe(family, policy, ilsd)
    torch.manual_seed(0)
    model, objective = build_model(recipe), build_objective(recipe)
    x, labels = batch(recipe)
    with SavedBytes(model) as saved:
        loss = forward_loss(model, objective, recipe, x, labels)
    loss.backward()                                   # the graph was real: backward must still work
    est = activation_parts(recipe, B, policy, FP32)
    assert within(est["kept"] + est["recompute"], saved.total), (est, saved.total)
    if policy != "none":
        measured = measure_recompute(model, recipe, policy)
        assert within(est["recompute"], measured), (est["recompute"], measured)


def test_checkpointing_policies_order_as_measured():
    """The point of the policies: layer < loop < none for what is kept between forward and backward."""
    kept = {}
    for policy in ("none", "loop", "layer"):
        recipe = small_recipe("masked", policy, loops=4, unique_layers=1)
        model, objective = build_model(recipe), build_objective(recipe)
        with SavedBytes(model) as saved:
            forward_loss(model, objective, recipe, *batch(recipe))
        kept[policy] = saved.total
    assert kept["loop"] <= kept["layer"] < kept["none"]   # N=1: a loop is a layer
    recipe = small_recipe("masked", "loop", loops=4)
    assert activation_parts(recipe, B, "loop", FP32)["kept"] < activation_parts(recipe, B, "layer", FP32)["kept"]


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_weights_grads_and_adam_state_match_bytes(family):
    recipe = small_recipe(family, "none")
    model, objective = build_model(recipe), build_objective(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward_loss(model, objective, recipe, *batch(recipe)).backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)   # noqa: E731
    weights = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    adam = nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step")
    est = state_bytes(parameter_counts(recipe), 0, 1, FP32)
    assert within(est["weights"], weights) and within(est["grads"], grads) and within(est["optimizer"], adam)


def test_zero_stages_shard_what_they_claim():
    recipe = small_recipe("masked", "none")
    params = parameter_counts(recipe)
    bf16 = PRECISIONS["bf16"]
    s = {z: state_bytes(params, z, 8, bf16) for z in range(4)}
    assert s[0]["optimizer"] == 12 * params["unique"] and s[1]["optimizer"] == s[0]["optimizer"] / 8
    assert s[1]["grads"] == s[0]["grads"] and s[2]["grads"] == s[0]["grads"] / 8
    assert s[2]["weights"] == s[0]["weights"] > s[3]["weights"]


def test_largest_micro_batch_is_the_boundary():
    recipe = load_recipe(ROOT / "recipes" / "imagenet256_masked_elt_l_8x3.yaml")
    plan = make_plan(recipe, gpus=16, gpu_mem_gib=80)
    params = plan["params"]
    budget = plan["usable_gib"] * GiB
    for row in plan["memory"]:
        mb = row["max_micro_batch"]
        args = (row["zero_stage"], row["checkpointing"], 16, PRECISIONS["bf16"])
        assert memory(recipe, params, mb, *args)["total"] <= budget < memory(recipe, params, mb + 1, *args)["total"]
    rows = {(r["zero_stage"], r["checkpointing"]): r for r in plan["memory"]}
    assert rows[(0, "loop")]["max_micro_batch"] > rows[(0, "none")]["max_micro_batch"]
    assert rows[(3, "none")]["total"] < rows[(0, "none")]["total"]


def test_cli_prints_plan_and_json(capsys):
    recipe = str(ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml")
    assert plan_main([recipe, "--gpus", "64", "--gpu-mem", "80", "--mfu", "0.4", "--peak-tflops", "989"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "unique" in out and "ZeRO" in out
    assert plan_main([recipe, "--gpus", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["memory"]) == 12 and plan["gpu_hours"] > 0
    assert plan_main([recipe, "model.widht=3"]) == 2
    assert "widht" in capsys.readouterr().err


def test_other_gpu_count_keeps_the_recipes_global_batch():
    recipe = load_recipe(ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml")   # 32 GPUs × 16
    same, more = make_plan(recipe, gpus=32, gpu_mem_gib=80), make_plan(recipe, gpus=64, gpu_mem_gib=80)
    assert (same["micro_batch"], same["global_batch"], same["batch_note"]) == (16, 512, "")
    assert (more["micro_batch"], more["global_batch"]) == (8, 512) and "train.micro_batch=8" in more["batch_note"]
    assert more["memory"][0]["activations"] < same["memory"][0]["activations"]
    fewer = make_plan(recipe, gpus=8, gpu_mem_gib=80)            # never a larger micro-batch than the recipe's
    assert (fewer["micro_batch"], fewer["grad_accum"], fewer["global_batch"]) == (16, 4, 512)
    assert make_plan(recipe, gpus=48, gpu_mem_gib=80)["batch_note"].startswith(
        "train.global_batch=512 cannot be split over 48 ranks; world sizes that can: 1, 2, 4, 8, 16, 32, 64, 128")


# ---------------------------------------------------------------------------------------------
# elt-plan --schedules

ROW = re.compile(r"^\s+([\d,]+)\s+(\S+e[-+]\d+)\s+([\d.]+)\s+([\d.]+)(\s+← end of warm-up)?$")


def elt_plan(*args: str) -> subprocess.CompletedProcess:
    """The installed console script (what a user types); `python -m` where the venv has none."""
    script = Path(sys.executable).with_name("elt-plan")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "elt_scale.plan"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def schedule_rows(out: str) -> dict[int, tuple[float, float, float]]:
    return {int(m[1].replace(",", "")): (float(m[2]), float(m[3]), float(m[4]))
            for m in map(ROW.match, out.splitlines()) if m}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    assert data[-8:-4] == b"IEND", "PNG is truncated"
    return struct.unpack(">II", data[16:24])


def test_schedules_cli_prints_the_trainers_schedules_and_draws_them(tmp_path):
    png = tmp_path / "figs" / "schedules.png"
    r = elt_plan("recipes/digits_masked.yaml", "--schedules", "--schedules-png", str(png))
    assert r.returncode == 0, r.stderr
    s = Schedules.of(load_recipe(ROOT / "recipes" / "digits_masked.yaml"))
    rows = schedule_rows(r.stdout)
    assert len(rows) >= 10 and min(rows) == 1 and max(rows) == s.steps == 300, r.stdout
    for step, (lr, factor, lam) in rows.items():        # the printed numbers are the trainer's functions
        assert lr == pytest.approx(s.lr(step), rel=1e-4), step
        assert factor == pytest.approx(s.lr_factor(step), abs=1e-4), step
        assert lam == pytest.approx(s.lam(step), abs=1e-3), step
    w = s.warmup_steps
    assert rows[w // 2][0] == pytest.approx(s.peak_lr / 2, rel=1e-4)     # linear warm-up: half-way, half the peak
    assert rows[w][1] == 1.0 and f"{w:>9,}" in next(line for line in r.stdout.splitlines() if "end of warm-up" in line)
    assert all(f == pytest.approx(k / w, abs=1e-4) for k, (_, f, _) in rows.items() if k <= w)
    assert rows[s.steps][1] == pytest.approx(s.min_lr_ratio)             # cosine down to min_lr_ratio
    lams = [rows[k][2] for k in sorted(rows)]
    assert lams[0] == 1.0 and lams[-1] <= 1 / s.steps + 1e-3 and lams == sorted(lams, reverse=True)
    assert "L_int ~ Uniform{1..3} per step" in r.stdout and "L_max 4 is the teacher" in r.stdout
    assert "mask ratio cos(π/2·r), r ~ U(0,1) per sample: mean 0.64" in r.stdout
    width, height = png_size(png)
    assert 800 <= width <= 3000 and 500 <= height <= 2500 and png.stat().st_size > 20_000


def test_schedules_need_no_data_and_follow_the_family(tmp_path, capsys):
    """Paper-scale recipes whose shards are not on this machine; diffusion has no masking ratio."""
    paper = str(ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml")
    assert plan_main([paper, "--schedules"]) == 0
    rows = schedule_rows(capsys.readouterr().out)
    assert max(rows) == 675_616 and rows[5000][1] == 1.0 and rows[2500][1] == 0.5
    diffusion = str(ROOT / "recipes" / "digits_diffusion.yaml")
    assert plan_main([diffusion, "ilsd.enabled=false", "--schedules", "--schedules-png", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "mask ratio" not in out and "no ILSD: every step runs L_max = 4" in out
    assert {lam for _, _, lam in schedule_rows(out).values()} == {1.0}
    assert png_size(tmp_path / "d.png")[0] > png_size(tmp_path / "d.png")[1]      # one row of three panels
    assert plan_main([diffusion, "--schedules", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["l_int"] == {"low": 1, "high": 3, "p": pytest.approx(1 / 3)} and summary["mask_ratio_mean"] is None


def test_save_interval_is_young_daly_from_a_measured_ledger(tmp_path):
    """√(2δM): δ and the step time from a run's goodput.json, M = per-GPU MTBF / GPUs."""
    import math

    from elt_scale.plan import save_interval
    (tmp_path / "goodput.json").write_text(json.dumps({"total": {"training_s": 200.0, "steps_trained": 100,
                                                                 "save_s": 30.0, "saves": 3}}))
    plan = {"wall_hours": 1.0, "steps": 1000, "gpus": 100, "memory": [], "recipe_setting": {}}
    s = save_interval(plan, mtbf_gpu_hours=1000.0, from_run=tmp_path)
    mtbf_s = 1000.0 * 3600 / 100
    assert s["save_s"] == 10.0 and s["step_s"] == 2.0 and s["mtbf_hours"] == 10.0
    assert s["interval_s"] == pytest.approx(math.sqrt(2 * 10.0 * mtbf_s))
    assert s["save_every"] == round(math.sqrt(2 * 10.0 * mtbf_s) / 2.0)
    assert s["expected_loss"] == pytest.approx(10.0 / s["interval_s"] + s["interval_s"] / (2 * mtbf_s))
    with pytest.raises(FileNotFoundError, match="goodput"):
        save_interval(plan, 1000.0, from_run=tmp_path / "nowhere")


def test_checkpoint_bytes_by_stage_world_and_ema():
    """What a save writes (engine/checkpoint.py): the module once (rank 0), 12Ψ of fp32 master + Adam over the
    ZeRO files (1/W each), the fp32 EMA shards; fp32 at stage 0 keeps only m, v (8Ψ), all in rank 0's file.
    bench/rehearsal.py holds the masked XL figure against a real folder (measured/plan 1.0000)."""
    from elt_scale.plan import checkpoint_bytes, format_plan
    psi = 1000
    params = {"unique": psi}
    z1 = checkpoint_bytes(params, 1, 4, "fp32", ema=True)
    assert (z1["module"], z1["optimizer"], z1["ema"], z1["total"]) == (4 * psi, 12 * psi, 4 * psi, 20 * psi)
    assert z1["per_rank_max"] == 4 * psi + 3 * psi + psi
    assert checkpoint_bytes(params, 2, 4, "bf16", ema=False)["total"] == 14 * psi
    assert checkpoint_bytes(params, 3, 4, "bf16", ema=False)["module"] == 0
    z0 = checkpoint_bytes(params, 0, 4, "fp32", ema=False)
    assert z0["optimizer"] == 8 * psi and z0["per_rank_max"] == 12 * psi
    recipe = load_recipe(ROOT / "recipes" / "imagenet256_masked_elt_xl_7x4.yaml")
    plan = make_plan(recipe, gpus=32, gpu_mem_gib=80)
    assert plan["checkpoint"]["total"] == 14 * plan["params"]["unique"]     # bf16 module + 12Ψ, no EMA
    assert "checkpoint (ZeRO-1, bf16)" in format_plan(plan)
