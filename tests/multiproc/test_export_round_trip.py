"""Export round trip: a DeepSpeed ZeRO-2 run with EMA -> elt-export (raw and --ema) -> inference.load
without DeepSpeed gives the same outputs as the DeepSpeed engine (and its EMA) that the run restores.
elt-export's one-line errors: tests/unit/test_export.py."""
import subprocess
import sys

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine import checkpoint as ckpt
from tests.conftest import ROOT, run_train


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, digits_shards):
    out = tmp_path_factory.mktemp("export")
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={out}", "run.name=ex",
                  "model.width=32", "train.micro_batch=8", "train.steps=3", "train.warmup_steps=1",
                  "train.save_every=0", "train.ema_decay=0.5", "deepspeed.zero_stage=2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "ex"


def engine_outputs(run_dir, inputs, monkeypatch):
    """Outputs of the DeepSpeed engine restored from the run's checkpoint, and of its EMA weights."""
    import deepspeed
    import torch.distributed as dist

    from elt_scale.dist import free_port
    from elt_scale.engine.resume import make_ds_config, make_optimizer
    from elt_scale.engine.ema import ShardedEMA
    from elt_scale.models import build_model

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
        model = build_model(recipe)
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(recipe, model),
                                          config=make_ds_config(recipe, 1))
        folder = run_dir / "ckpt" / ckpt.read_pointer(run_dir / "ckpt")
        ckpt.load_same_world(engine, folder)
        engine.eval()
        with torch.no_grad():
            raw = engine(*inputs, exits=(1, 4))
            ema = ShardedEMA(engine.module, recipe.train.ema_decay, 0, 1)
            ema.load(folder)
            averaged = build_model(recipe).eval()
            averaged.load_state_dict({n: t.view(ema.shapes[n]) for n, (_, t) in ema.shadow.items()}, strict=False)
            return raw, averaged(*inputs, exits=(1, 4))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_export_round_trip_raw_and_ema(ema_run, tmp_path, monkeypatch):
    from safetensors import safe_open

    from elt_scale.inference.load import load
    tokens, labels = torch.randint(0, 18, (4, 8, 8), generator=torch.Generator().manual_seed(1)), torch.arange(4)
    want_raw, want_ema = engine_outputs(ema_run, (tokens, labels), monkeypatch)
    for flag, want in (([], want_raw), (["--ema"], want_ema)):
        out = tmp_path / f"model{''.join(flag)}.safetensors"
        r = subprocess.run([sys.executable, "-m", "elt_scale.export", str(ema_run), *flag, "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        with safe_open(str(out), framework="pt") as f:                  # plain safetensors, recipe inside
            assert f.metadata()["ema"] == ("true" if flag else "false") and "recipe" in f.metadata()
        model = load(out, ema=bool(flag)).model
        with torch.no_grad():
            got = model(tokens, labels, exits=(1, 4))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), flag
    assert not torch.equal(want_raw[1], want_ema[1])                     # the EMA really is other weights
