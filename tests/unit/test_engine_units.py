"""Engine pieces that need no process group: checkpoint pointer/prune/resume lookup, metrics rewrite on
resume, throughput/MFU, EMA shards consolidated and re-sliced across world sizes."""
import json

import pytest
import torch

from elt_scale.config import load_recipe
from elt_scale.engine import checkpoint as ckpt
from elt_scale.engine.ema import ShardedEMA
from elt_scale.engine.logger import MetricsLog, Throughput
from elt_scale.inference.weights import consolidated_ema as consolidate
from tests.conftest import ROOT


def fake_checkpoint(ckpt_dir, step, complete=True):
    folder = ckpt_dir / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / ckpt.CLIENT_STATE).write_text(json.dumps({"step": step}))
    return folder


def test_prune_keeps_last_complete_and_drops_unfinished_saves(tmp_path):
    for s in (1, 2, 3):
        fake_checkpoint(tmp_path, s)
    ckpt.write_pointer(tmp_path, ckpt.tag_for(3))
    fake_checkpoint(tmp_path, 4, complete=False)              # killed before the pointer moved
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert ckpt.read_pointer(tmp_path) == "step_00000003" and not list(tmp_path.glob(".latest.tmp"))


def test_find_resume_auto_never_and_path(tmp_path):
    run_ckpt = tmp_path / "run" / "ckpt"
    assert ckpt.find_resume("auto", run_ckpt) is None         # fresh run
    folder = fake_checkpoint(run_ckpt, 5)
    ckpt.write_pointer(run_ckpt, folder.name)
    assert ckpt.find_resume("auto", run_ckpt) == folder
    with pytest.raises(ValueError, match="already holds a checkpoint \\(step_00000005\\)"):
        ckpt.find_resume("never", run_ckpt)                    # a fresh start would overwrite it
    assert ckpt.find_resume("never", tmp_path / "fresh" / "ckpt") is None
    assert ckpt.find_resume(str(run_ckpt), tmp_path / "other" / "ckpt") == folder   # a ckpt/ dir: follow pointer
    assert ckpt.find_resume(str(folder), tmp_path / "other" / "ckpt") == folder     # one step_* folder
    with pytest.raises(FileNotFoundError, match="train.resume="):
        ckpt.find_resume(str(tmp_path / "nothing"), run_ckpt)


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    log = MetricsLog(tmp_path, resume_step=4)
    log.write({"step": 5, "loss": float("nan")})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] is None   # strict JSON: NaN -> null


def test_throughput_reports_tflops_and_mfu():
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml", ["logging.peak_tflops=0.5"])
    meter = Throughput(recipe, world=2)
    meter.add(1000)
    row = meter.read()
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 65)             # 64 tokens + class
    assert row["mfu"] == pytest.approx(row["tflops"] / 1.0) and row["peak_mem_gb"] > 0


def test_ema_shards_consolidate_and_reslice_across_world_sizes(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    shards = [ShardedEMA(module, 0.9, r, 3) for r in range(3)]          # stage-0 slicing, world 3
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    for e in shards:
        e.update()
        e.save(tmp_path)
    full = consolidate(tmp_path)
    for n, p in module.named_parameters():
        torch.testing.assert_close(full[n], p.detach() - 0.9)           # 0.9·w0 + 0.1·(w0 + 1) = (w0 + 1) - 0.9
    two = [ShardedEMA(module, 0.9, r, 2) for r in range(2)]             # resume on world 2
    for e in two:
        e.load(tmp_path)
    for n in full:
        got = torch.cat([e.shadow[n][1] for e in two if n in e.shadow])
        assert torch.equal(got, full[n].view(-1))
    (tmp_path / "ema_rank00001.safetensors").unlink()
    with pytest.raises(ValueError, match="cover only part"):
        consolidate(tmp_path)
    with pytest.raises(KeyError, match="lack \\(part of\\) parameter"):   # a resume finds the hole too
        ShardedEMA(module, 0.9, 0, 1).load(tmp_path)


def test_ema_load_reads_only_the_slices_a_rank_owns(tmp_path, monkeypatch):
    """A resume's EMA load holds this rank's share, not the whole EMA: no shard is read whole, and the slices
    read add up to the rank's own fragments (it consolidated every shard on every rank before issue 38)."""
    import safetensors
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))
    for r in range(2):                                                  # saved on 2 ranks
        ShardedEMA(module, 0.9, r, 2).save(tmp_path)
    real_open, read = safetensors.safe_open, []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            raise AssertionError(f"a whole EMA shard was read ({name})")

        def get_slice(self, name):
            inner = self.inner.get_slice(name)

            class Slice:
                get_shape = inner.get_shape

                def __getitem__(self, index):
                    t = inner[index]
                    read.append(t.numel())
                    return t
            return Slice()

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    for r in range(3):                                                  # resumed on 3 ranks
        read.clear()
        e = ShardedEMA(module, 0.9, r, 3)
        e.load(tmp_path)
        assert sum(read) == sum(t.numel() for _, t in e.shadow.values())
        for name, (start, t) in e.shadow.items():
            want = dict(module.named_parameters())[name].detach().reshape(-1)[start:start + t.numel()]
            assert torch.equal(t, want)


def test_poison_turns_a_bad_loss_into_nan_gradients_and_leaves_a_good_one_exact():
    from elt_scale.engine.guard import poison
    w = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    (w.pow(3).sum() * 0.7).backward()
    clean = w.grad.clone()
    w.grad = None
    poison(w.pow(3).sum() * 0.7).backward()
    assert torch.equal(w.grad, clean)
    for bad in (float("nan"), float("inf")):       # a non-finite constant: plain backward gives finite grads
        w.grad = None
        poison(w.pow(3).sum() + bad).backward()
        assert torch.isnan(w.grad).all(), bad


def test_term_flags_name_the_bad_term_without_a_host_read():
    from elt_scale.engine.guard import TERMS, term_flags
    terms = {"loss_teacher": torch.tensor(1.0), "loss_student": torch.tensor(float("nan")),
             "loss_distill": torch.tensor(float("-inf"))}
    flags = term_flags(terms)
    assert isinstance(flags, torch.Tensor) and flags.tolist() == [0.0, 1.0, 1.0]
    assert term_flags({"loss_teacher": torch.tensor(2.0)}).tolist() == [0.0] * len(TERMS)   # vanilla: one term


def test_shape_mismatch_names_a_parameter():
    saved = {"a.weight": [4, 8], "a.bias": [4], "b.weight": [2, 2]}
    assert ckpt.shape_mismatch(saved, dict(saved)) is None
    assert ckpt.shape_mismatch(None, saved) is None                  # checkpoints that predate the record
    why = ckpt.shape_mismatch(saved, {"a.weight": [4, 16], "a.bias": [4], "c.weight": [2, 2]})
    assert why.startswith("3 of 4 parameters differ") and "a.weight: [4, 8] there, [4, 16] here" in why
    assert "b.weight" not in why                                       # one example, not the list


@pytest.mark.parametrize("offload", [False, True])
def test_optimizer_keeps_norms_and_biases_out_of_weight_decay(offload):
    from elt_scale.engine.resume import make_optimizer
    from elt_scale.models import build_model
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml",
                         ["deepspeed.zero_stage=2", f"deepspeed.offload_optimizer={str(offload).lower()}"])
    model = build_model(recipe)
    opt = make_optimizer(recipe, model)
    assert type(opt).__name__ == ("DeepSpeedCPUAdam" if offload else "AdamW")   # Offload accepts only its own
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == recipe.train.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}


@pytest.mark.parametrize("version", ["0.18.2", "0.20.0", "1.0.0"])
def test_deepspeed_outside_the_tested_range_stops_the_run_in_one_line(version, monkeypatch, tmp_path, digits_shards,
                                                                      capsys):
    import deepspeed

    from elt_scale import train
    from tests.conftest import ROOT
    monkeypatch.setattr(deepspeed, "__version__", version)
    rc = train.main([str(ROOT / "recipes" / "digits_masked.yaml"), f"data.shards={digits_shards}",
                     f"run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"DeepSpeed {version} is installed; elt-scale needs deepspeed>=0.19.8,<0.20" in err
    assert not (tmp_path / "digits_masked").exists()                   # nothing started


def test_deepspeed_missing_an_internal_we_use_is_named(monkeypatch):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from elt_scale.engine import ds_internals
    ds_internals.check()                                               # the installed one passes
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "update_lp_params")
    with pytest.raises(ds_internals.DeepSpeedMismatch, match="has no deepspeed.runtime.zero.stage_1_and_2."
                                                             "DeepSpeedZeroOptimizer.update_lp_params"):
        ds_internals.check()


def test_pyproject_declares_the_tested_deepspeed_range():
    from elt_scale.engine.ds_internals import TESTED_TEXT
    from tests.conftest import ROOT
    assert f'"deepspeed{TESTED_TEXT}"' in (ROOT / "pyproject.toml").read_text()


def test_cross_layout_weights_load_one_parameter_at_a_time(tmp_path, monkeypatch):
    """Before deepspeed.initialize, a rank resuming on another layout reads each parameter's fp32 file of the
    universal conversion once, and nothing larger: no consolidated copy of the model (issue 38 item 3)."""
    from elt_scale.engine import universal
    from elt_scale.models import build_model
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml", ["model.width=32"])
    torch.manual_seed(1)
    saved = {n: torch.randn_like(p) for n, p in build_model(recipe).named_parameters()}
    folder = tmp_path / "step_00000002"
    (folder / universal.UNIVERSAL / "zero").mkdir(parents=True)         # converted already (cached)
    (folder / ckpt.CLIENT_STATE).write_text(json.dumps({"step": 2, "zero_stage": 2}))
    for name, t in saved.items():
        (folder / universal.UNIVERSAL / "zero" / name).mkdir()
        torch.save({"param": t}, folder / universal.UNIVERSAL / "zero" / name / "fp32.pt")
    loaded, real_load = [], torch.load

    def counting_load(f, *args, **kwargs):
        out = real_load(f, *args, **kwargs)
        loaded.append((str(f), sum(t.numel() for t in out.values() if torch.is_tensor(t))))
        return out
    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(universal, "consolidated_weights", lambda *a: pytest.fail("consolidated the whole model"))
    model = build_model(recipe)
    universal.load_weights(model, folder, deadline_s=60)
    assert sorted(f for f, _ in loaded) == sorted(str(folder / "universal" / "zero" / n / "fp32.pt") for n in saved)
    assert max(n for _, n in loaded) == max(t.numel() for t in saved.values())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[name])
