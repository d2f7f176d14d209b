"""Smoke tests of the benchmark scripts in their CPU (--tiny) mode: they run the real trainer path end to
end and write JSON whose numbers are consistent. Speed itself is measured on a GPU (bench/gpu.sh), not here."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_train_throughput_tiny_compares_variants_and_fast_paths(tmp_path):
    out = tmp_path / "train.json"
    r = run_bench("train_throughput.py", "--preset", "elt-l-masked", "--tiny", "--steps", "1", "--warmup", "1",
                  "--cases", "vanilla:none:off,ilsd:none:off,baseline:none:off,ilsd:loop:off,"
                             "ilsd:none:off:no-fused-adamw,ilsd:none:off:loop-sync", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {c["name"]: c for c in result["cases"]}
    assert len(cases) == 6 and not [c for c in cases.values() if "error" in c or "skipped" in c], cases
    assert result["meta"]["matmul_peak"]["tflops"] > 0 and result["meta"]["commit"]
    for c in cases.values():
        for key in ("step_time_s", "img_per_s", "tokens_per_s", "trunk_tflops", "model_tflops", "mfu", "loss"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["name"], key, c[key])
        assert c["img_per_s"] == pytest.approx(c["batch"] / c["step_time_s"])
    vanilla, ilsd = cases["vanilla/ckpt=none/compile=off"], cases["ilsd/ckpt=none/compile=off"]
    baseline = cases["baseline/ckpt=none/compile=off"]
    # tiny preset: 2 unique layers x 3 loops; the baseline has 6 unique layers and the same trunk FLOPs
    assert vanilla["shape"].startswith("2Nx3L") and baseline["shape"].startswith("6Nx1L")
    assert baseline["params_m"] > vanilla["params_m"] == ilsd["params_m"]
    assert baseline["trunk_tflops"] * baseline["step_time_s"] == pytest.approx(
        vanilla["trunk_tflops"] * vanilla["step_time_s"])
    ratios = result["ratios"]
    assert ratios["ilsd / vanilla [ckpt=none compile=off]"] == pytest.approx(
        ilsd["step_time_s"] / vanilla["step_time_s"])
    for key in ("baseline / vanilla [ckpt=none compile=off]", "ckpt=loop / none [ilsd compile=off]",
                "no-fused-adamw / fast paths on [ilsd ckpt=none compile=off]"):
        assert ratios[key] > 0, key
    assert "train_throughput: 6/6 cases measured" in r.stdout


def test_sample_throughput_tiny_every_loop_count_and_baseline(tmp_path):
    out = tmp_path / "sample.json"
    r = run_bench("sample_throughput.py", "--tiny", "--modes", "eager", "--batch", "2", "--loops", "1,3",
                  "--baseline", "--warmup", "1", "--repeats", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = sorted((row["family"], row["model"], row["loops"]) for row in rows)
    assert got == [("diffusion", "baseline", 1), ("diffusion", "looped", 1), ("diffusion", "looped", 3),
                   ("masked", "baseline", 1), ("masked", "looped", 1), ("masked", "looped", 3)]
    for row in rows:
        assert "error" not in row, row
        assert row["model_batch"] == 4                       # classifier-free guidance doubles the batch
        assert row["img_per_s"] == pytest.approx(2 / (row["steps"] * row["forward_ms"] / 1e3))
        assert row["tflops"] > 0
    assert {row["steps"] for row in rows if row["family"] == "masked"} == {24}


def test_bad_case_is_rejected_before_any_work(tmp_path):
    r = run_bench("train_throughput.py", "--preset", "elt-l-masked", "--cases", "ilsd:sometimes:off",
                  "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--cases" in r.stderr and "ilsd:sometimes:off" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_script_is_valid_bash_and_uses_only_carried_wheels():
    script = (BENCH / "gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    assert "--no-index" in script and "pip install" in script.replace("-m pip install", "pip install")
    assert "TORCH_CUDA_ARCH_LIST=9.0" in script


@pytest.mark.parametrize("family", ["masked", "diffusion"])
def test_bf16_weights_take_the_trainers_fp32_inputs(family):
    """On a GPU DeepSpeed's bf16 mode casts the weights, not the inputs: the models must accept the
    objective's fp32 latents / int tokens (the GPU training benchmark runs exactly this)."""
    import torch

    from elt_scale.config import load_recipe
    from elt_scale.models import build_model
    from elt_scale.objectives import build_objective

    recipe = load_recipe(ROOT / "recipes" / f"digits_{family}.yaml", ["model.width=32", "model.heads=2"])
    model = build_model(recipe).to(torch.bfloat16)
    m = recipe.model
    x = torch.randint(0, m.vocab_size, (2, *m.grid)) if family == "masked" else torch.randn(2, m.channels, *m.grid)
    prepared = build_objective(recipe).prepare(x, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    student, teacher = model(*prepared.inputs, exits=(1, m.loops))
    assert teacher.dtype == torch.bfloat16 and torch.isfinite(teacher.float()).all()


def test_maskgit_tokenize_tiny_times_encode_and_decode(tmp_path):
    out = tmp_path / "mg.json"
    r = run_bench("maskgit_tokenize.py", "--tiny", "--batch", "2", "--batches", "1", "--warmup", "0", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["tiny"] and result["meta"]["side"] == 64 and result["meta"]["precision"] == "torch.float32"
    for what in ("encode", "decode"):
        assert result[what]["images_per_s"] == pytest.approx(2 / result[what]["batch_s"][0])
    assert result["imagenet_train_encode_hours"] == pytest.approx(1_281_167 / result["encode"]["images_per_s"] / 3600)
    assert "maskgit_tokenize:" in r.stdout and "would take" in r.stdout
