"""ELT from Python: from_pretrained on a run directory, an export and a save_pretrained folder samples what
elt-sample samples for the same seed, loops and cfg; bad input gets a clear error."""
import json

import numpy as np
import pytest

from tests.conftest import run_train

ARGS = dict(cfg=2.0, steps=4, seed=3)
CLASSES = list(range(10))          # elt-sample -n 10 gives sample i the class i % 10


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_shards):
    out = tmp_path_factory.mktemp("api")
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={out}", "run.name=api",
                  "model.width=32", "train.micro_batch=8", "train.steps=3", "train.warmup_steps=1",
                  "train.save_every=1", "train.keep_last=3", "train.ema_decay=0.5", "deepspeed.zero_stage=2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "api"


@pytest.fixture(scope="module")
def cli_samples(run, tmp_path_factory):
    """elt-sample with no weights flag (the EMA: the run keeps one) at L=2 and adaptive loops."""
    from elt_scale import sample
    out = tmp_path_factory.mktemp("cli")
    assert sample.main([str(run), "--loops", "2,auto:0.05", "-n", "10", "--cfg", "2.0", "--steps", "4",
                        "--seed", "3", "--out", str(out)]) == 0
    return {spec: np.load(out / f"samples_{label}.npz")["arr_0"] for spec, label in
            (("2", "L2"), ("auto:0.05", "Lauto_0.05"))}


def test_run_dir_export_and_saved_folder_sample_like_elt_sample(run, cli_samples, tmp_path):
    from elt_scale import ELT
    from elt_scale.inference.load import export_run as export

    from_run = ELT.from_pretrained(run)                              # EMA: the run keeps one
    for loops, expected in cli_samples.items():
        assert np.array_equal(from_run.generate(CLASSES, loops=loops, **ARGS), expected), loops

    exported = export(run, tmp_path / "model.safetensors", ema=True)
    assert np.array_equal(ELT.from_pretrained(exported).generate(CLASSES, loops=2, **ARGS), cli_samples["2"])

    from_run.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tokenizer"]["name"]
    saved = ELT.from_pretrained(tmp_path / "saved", ema=True)               # it knows it holds the EMA
    saved.recipe.data.shards = str(tmp_path / "gone")                 # decodes from config.json, not the shards
    assert np.array_equal(saved.generate(CLASSES, loops="auto:0.05", **ARGS), cli_samples["auto:0.05"])

    pil = saved.generate([1, 7], loops=2, output="pil", **ARGS)
    assert [im.size for im in pil] == [(8, 8)] * 2
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), saved.generate([1, 7], loops=2, **ARGS))


def test_elt_sample_takes_the_ema_by_default_as_the_api_does(run, cli_samples, tmp_path):
    """Issue 38: elt-sample took the raw weights unless --ema, from_pretrained the EMA; one rule now."""
    from elt_scale import sample
    flags = {"ema": ["--ema"], "raw": ["--no-ema"]}
    got = {}
    for name, flag in flags.items():
        assert sample.main([str(run), *flag, "--loops", "2", "-n", "10", "--cfg", "2.0", "--steps", "4", "--seed", "3",
                            "--out", str(tmp_path / name)]) == 0
        got[name] = np.load(tmp_path / name / "samples_L2.npz")["arr_0"]
    assert np.array_equal(got["ema"], cli_samples["2"]) and not np.array_equal(got["raw"], cli_samples["2"])


def test_checkpoint_and_raw_weights_are_selectable(run):
    from elt_scale import ELT
    first = ELT.from_pretrained(run, ckpt="step_00000001", ema=False).model.state_dict()
    last = ELT.from_pretrained(run, ema=False).model.state_dict()
    ema = ELT.from_pretrained(run, ema=True).model.state_dict()
    assert any(not first[k].equal(last[k]) for k in last) and any(not ema[k].equal(last[k]) for k in last)


@pytest.mark.parametrize("kind,words", [("missing", "no such run directory"), ("empty_dir", "neither a run directory"),
                                        ("text_file", "not a safetensors file")])
def test_a_path_that_is_none_of_the_three_is_a_clear_error(kind, words, tmp_path):
    from elt_scale import ELT
    path = tmp_path / kind
    if kind == "empty_dir":
        path.mkdir()
    if kind == "text_file":
        path.write_text("hello")
    with pytest.raises((FileNotFoundError, ValueError), match=words):
        ELT.from_pretrained(path)


@pytest.mark.parametrize("kwargs,words", [(dict(loops=0), "loops=0: must be >= 1"),
                                          (dict(loops="0"), "loop counts must be >= 1"),
                                          (dict(classes=[1, 10]), r"classes \[10\]: the model has classes 0..9"),
                                          (dict(cfg=-1.0), "cfg=-1.0: must be >= 0")])
def test_bad_generate_arguments_are_clear_errors(kwargs, words, run):
    from elt_scale import ELT
    model = ELT.from_pretrained(run)
    with pytest.raises(ValueError, match=words):
        model.generate(**{"classes": [1, 7], "loops": 2, **kwargs})
