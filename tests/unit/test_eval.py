"""elt-sample and elt-eval: ADM .npz layout, FID/IS/FVD with tiny local feature networks, missing
weights fail fast without downloads, the digits classifier, the any-time sweep (multi-process sampling:
tests/multiproc/test_eval_ranks.py)."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from elt_scale import evaluate, sample
from elt_scale.inference.load import export_run
from elt_scale.inference.outputs import save_grid
from elt_scale.inference.reference import load_reference
from elt_scale.inference.samples import SampleSet, merge_sets, to_uint8
from elt_scale.inference.scoring import Scorer
from elt_scale.metrics import MissingWeightsError, fvd, load_i3d
from elt_scale.metrics.digits import digits_metrics, load_classifier, real_digits, real_digits_uint8
from tests.conftest import ROOT, run_train
from tests.tiny_models import TinyI3D, TinyInception, scripted

# ---------------------------------------------------------------------------------------------
# tiny stand-ins for Inception and I3D, saved as TorchScript and loaded through the real code path

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {"inception": scripted(TinyInception(), d / "inception.pt"), "i3d": scripted(TinyI3D(), d / "i3d.pt")}


def noise_images(n, shape=(8, 8), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# metrics

def test_fid_of_a_set_with_itself_is_zero_and_against_noise_large(weights):
    real = real_digits_uint8()[:300]
    scorer = Scorer(real, weights["inception"], device="cpu")
    same = scorer(real, None, "fid")
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    other_digits = scorer(real_digits_uint8()[300:600], None, "fid")
    noise = scorer(noise_images(300), None, "fid")
    assert noise["fid"] > 20 * other_digits["fid"] > 0 and noise["precision"] < other_digits["precision"]
    assert 1.0 <= same["is"] <= 10.0


def test_fvd_on_16_frame_clips(weights):
    rng = np.random.default_rng(0)
    level = rng.integers(0, 100, (24, 1, 1, 1, 1))
    smooth = np.broadcast_to(level, (24, 16, 8, 8, 3)).astype(np.uint8)        # flat dark videos
    i3d = load_i3d(weights["i3d"])
    assert abs(fvd(smooth, smooth, i3d)) < 1e-3
    assert fvd(rng.integers(0, 256, (24, 16, 8, 8, 3), dtype=np.uint8), smooth, i3d) > 0.1
    with pytest.raises(ValueError, match="16-frame"):
        fvd(smooth[:, :8], smooth[:, :8], i3d)


def test_missing_weights_fail_fast_without_download(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    real = real_digits_uint8()[:20]
    for weights_path in (None, tmp_path / "missing.pt"):
        with pytest.raises(MissingWeightsError, match="--inception-weights"):
            Scorer(real, inception_weights=weights_path)(real, None, "fid")
        with pytest.raises(MissingWeightsError, match="--i3d-weights"):
            Scorer(real, i3d_weights=weights_path)(np.zeros((2, 16, 8, 8, 3), np.uint8), None, "fvd")
    # the CLI: a clear message and exit code 2, quickly (the timeout would catch a hang)
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=real, arr_1=np.zeros(20, np.int64))
    r = subprocess.run([sys.executable, "-m", "elt_scale.evaluate", "fid", str(npz), "--reference", str(npz)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--inception-weights" in r.stderr and "never downloads" in r.stderr


def test_digits_classifier_is_cached_and_separates_digits_from_noise(tmp_path, monkeypatch):
    clf = load_classifier(tmp_path)
    assert (tmp_path / "digits_classifier_v1.npz").exists() and clf.val_accuracy > 0.9
    import elt_scale.metrics.digits as digits
    monkeypatch.setattr(digits, "train_classifier", lambda: pytest.fail("retrained despite the cache"))
    clf = load_classifier(tmp_path)
    _, labels = real_digits()
    good = digits_metrics(real_digits_uint8()[1::10], labels[1::10], clf)
    bad = digits_metrics(noise_images(180), labels[1::10], clf)
    assert good["class_acc"] > 0.95 and bad["class_acc"] < 0.3
    assert bad["fd_digits"] > 10 * good["fd_digits"]


def test_reference_images_from_shards_match_the_digits(digits_shards):
    ref = load_reference(digits_shards, limit=50)
    images, _ = real_digits()
    assert ref.dtype == np.uint8 and ref.shape == (50, 8, 8, 3)
    known = {np.round(im * 255).astype(np.uint8).tobytes() for im in images}
    assert all(r[..., 0].tobytes() in known for r in ref)              # decoded back to the real digits
    assert len({r.tobytes() for r in ref}) > 45


# ---------------------------------------------------------------------------------------------
# a tiny trained run: elt-sample and elt-eval anytime end to end

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_shards):
    out = tmp_path_factory.mktemp("runs")
    r = run_train("digits_masked.yaml", f"data.shards={digits_shards}", f"run.out_dir={out}", "train.steps=20",
                  "model.width=32", "train.log_every=10", "train.save_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "digits_masked"


def test_elt_sample_writes_adm_npz_and_grids(trained_run, tmp_path):
    out = tmp_path / "s"
    assert sample.main([str(trained_run), "--loops", "1,auto:0.1", "--num", "12", "--steps", "4",
                        "--batch-size", "8", "--cfg", "2", "--out", str(out)]) == 0
    for label in ("L1", "Lauto_0.1"):
        with np.load(out / f"samples_{label}.npz") as f:
            assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (12, 8, 8, 3)
            assert f["arr_1"].tolist() == [i % 10 for i in range(12)]
            assert np.array_equal(f["arr_0"][..., 0], f["arr_0"][..., 2])      # grey repeated to RGB
        from PIL import Image
        assert Image.open(out / f"grid_{label}.png").size[0] >= 64
    again = tmp_path / "again"
    sample.main([str(trained_run), "--loops", "1", "--num", "12", "--steps", "4", "--batch-size", "8", "--cfg", "2",
                 "--out", str(again)])
    assert np.array_equal(np.load(out / "samples_L1.npz")["arr_0"], np.load(again / "samples_L1.npz")["arr_0"])


def test_anytime_sweep_writes_csv_and_plot(trained_run, tmp_path):
    exported = export_run(trained_run, tmp_path / "model.safetensors")
    out = tmp_path / "anytime"
    rc = evaluate.main(["anytime", str(trained_run), "--compare", str(exported), "--loops", "1-2,auto:0.2",
                        "--num", "20", "--steps", "4", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "anytime.csv")))
    assert [(r["run"], r["L"]) for r in rows] == [(run, L) for run in ("digits_masked", "model")
                                                  for L in ("1", "2", "auto:0.2")]
    for r in rows:
        assert 0 <= float(r["class_acc"]) <= 1 and float(r["fd_digits"]) >= 0 and float(r["wall_s"]) > 0
    g = [float(r["gflops_per_sample"]) for r in rows[:2]]
    assert g[1] > 1.5 * g[0]                                            # twice the trunk loops
    assert rows[0]["fd_digits"] == rows[3]["fd_digits"]                 # the export is the same model
    assert 1.0 <= float(rows[2]["loops_per_step"]) <= 6.0              # auto: at most L_max + 2
    from PIL import Image
    assert Image.open(out / "anytime.png").size[0] > 500


def test_anytime_fid_rows_are_elt_eval_fid_of_the_same_samples(trained_run, digits_shards, weights, tmp_path,
                                                               monkeypatch, capsys):
    """One code path (Scorer): the sweep's ADM columns equal elt-eval fid on the same samples from elt-sample."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))      # the shard reference's statistics cache
    same = ["--loops", "2", "--num", "24", "--steps", "4", "--seed", "3", "--batch-size", "8"]
    assert evaluate.main(["anytime", str(trained_run), *same, "--metric", "fid", "--reference", str(digits_shards),
                          "--inception-weights", weights["inception"], "--out", str(tmp_path / "anytime")]) == 0
    row = next(csv.DictReader(open(tmp_path / "anytime" / "anytime.csv")))
    assert sample.main([str(trained_run), *same, "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert evaluate.main(["fid", str(tmp_path / "s" / "samples_L2.npz"), "--reference", str(digits_shards),
                          "--inception-weights", weights["inception"]]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["num_samples"] == 24
    for k in ("is", "fid", "sfid", "precision", "recall"):
        assert float(row[k]) == pytest.approx(record[k], abs=1e-6), k


def test_video_samples_become_channels_last_and_a_gif_grid(tmp_path):
    from PIL import Image
    video = torch.rand(5, 1, 4, 8, 8)                                   # (B, C, T, H, W) in [0, 1]
    u8 = to_uint8(video)
    assert u8.shape == (5, 4, 8, 8, 3) and u8.dtype == np.uint8
    path = save_grid(tmp_path / "grid_L2", u8)
    assert path.name == "grid_L2.gif" and Image.open(path).n_frames == 4


def test_merge_restores_global_order_and_skips_empty_ranks():
    parts = [SampleSet(np.array(idx, np.uint8).reshape(-1, 1, 1, 1).repeat(3, -1) if idx else np.zeros((0,), np.uint8),
                       np.array(idx, np.int64), 1.0, 2.0, 0.5, np.array(idx, np.int64))
             for idx in ([4, 5, 0, 1], [2, 3], [])]
    merged = merge_sets(parts)
    assert merged.labels.tolist() == [0, 1, 2, 3, 4, 5] and merged.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("case,words", [
    ("text", "not a readable .npz (ValueError)"),           # numpy's message spoke of pickles, named no file
    ("truncated", "not a readable .npz (BadZipFile)"),      # was a zipfile traceback
    ("npy", "holds one .npy array"),                        # was a TypeError traceback
    ("folder", "not a readable .npz (IsADirectoryError)"),  # was a traceback
])
def test_unreadable_samples_file_is_named_in_one_line(case, words, tmp_path, capsys):
    path = tmp_path / "samples.npz"
    if case == "text":
        path.write_text("arr_0: not numpy\n")
    elif case == "truncated":
        np.savez(path, arr_0=np.zeros((500, 8, 8, 3), np.uint8), arr_1=np.zeros(500, np.int64))
        path.write_bytes(path.read_bytes()[:50_000])
    elif case == "npy":
        path = tmp_path / "samples.npy"
        np.save(path, np.zeros((4, 8, 8, 3), np.uint8))
    else:
        path.mkdir()
    assert evaluate.main(["digits", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"elt-eval: error: {path}: {words}") and "Traceback" not in err and "pickle" not in err, err
