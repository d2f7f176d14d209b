"""`--tokenizer jit`: a TorchScript discrete video tokenizer in the Cosmos DV convention (encoder.jit /
decoder.jit, written here by tests/tiny_tokenizers.py with DV4x8x8's compression) from raw UCF-101-shaped
clips to shards, through training the shrunk masked UCF-101 recipe, to 17-frame videos from elt-sample and
FVD against the shards."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import tokenize
from data_prep.decode import VideoDecoder
from elt_scale.config import load_recipe
from elt_scale.data import check_manifest
from elt_scale.tokenizers import build_tokenizer, tokenizer_from_manifest
from tests.conftest import ROOT, read_metrics, run_train, shrunk_masked_overrides
from tests.datasets import read_samples
from tests.tiny_models import TinyI3D, scripted
from tests.tiny_tokenizers import make_ucf_tree, write_jit_tokenizer

LEVELS = (40, 40, 40)            # 64,000 codes, Cosmos DV's vocabulary size: codes are stored as int32


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    return make_ucf_tree(tmp_path_factory.mktemp("ucf"), frames=20)


@pytest.fixture(scope="module")
def dv(tmp_path_factory):
    return write_jit_tokenizer(tmp_path_factory.mktemp("models") / "dv4x8x8", 4, 8, LEVELS)


def tokenize_ucf(ucf, tokenizer_dir, out, *extra, frames=17, resolution=16) -> int:
    videos, ann = ucf
    return tokenize.main(["--source", "ucf101", "--input", str(videos), "--annotations", str(ann),
                          "--frames", str(frames), "--resolution", str(resolution), "--tokenizer", "jit",
                          "--tokenizer-path", str(tokenizer_dir), *extra, "--out", str(out),
                          "--workers", "0", "--device", "cpu"])


@pytest.fixture(scope="module")
def shards(ucf, dv, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "ucf101-dv"
    assert tokenize_ucf(ucf, dv, out) == 0
    return out


def test_17_frame_clips_become_5_latent_frames_of_int_codes(shards, ucf, dv):
    m = json.loads((shards / "manifest.json").read_text())
    assert m["sample"] == {"kind": "codes", "shape": [5, 2, 2], "dtype": "int32", "vocab_size": 64000,
                           "scaling_factor": 1.0}
    assert m["tokenizer"] == {"name": "jit", "path": str(dv), "vocab_size": 64000, "compression": [4, 8, 8],
                              "precision": "fp32", "index_dtype": "int64"}
    samples = read_samples(shards)
    assert len(samples) == 6
    codes = torch.from_numpy(np.stack([x for _, x, _ in samples.values()]))
    assert codes.dtype == torch.int32 and 0 <= codes.min() and codes.max() < 64000
    # the stored codes are what encoder.jit gives for the clip tokenize.py decoded
    encoder = torch.jit.load(str(dv / "encoder.jit"))
    clips = torch.stack([VideoDecoder(16, 17, 1)(str(ucf[0] / src)) for _, _, src in samples.values()])
    assert torch.equal(encoder(clips * 2 - 1)[0], codes.long())
    # and decode through the tokenizer the manifest names, as elt-sample / FVD references do
    videos = tokenizer_from_manifest(m, device="cpu").decode(codes)
    assert videos.shape == (6, 3, 17, 16, 16) and 0 <= videos.min() and videos.max() <= 1
    ref = ((torch.jit.load(str(dv / "decoder.jit"))(codes.long()) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(videos, ref)


@pytest.mark.parametrize("frames,resolution,extra,words", [
    (16, 16, [], ["takes clips of 1 + 4k frames", "13, 17", "not 16", "--frames"]),
    (17, 20, [], ["divisible by 8", "20x20", "--resolution"]),
    (17, 16, ["--compression", "4x4x4"], ["turned a 17x16x16 clip into [5, 2, 2]", "[5, 4, 4]", "--compression"]),
    (17, 16, ["--vocab-size", "1000"], ["outside 0..999", "vocab_size 1000", "--vocab-size"]),
])
def test_what_the_tokenizer_cannot_take_is_one_line_exit_2(frames, resolution, extra, words, ucf, dv, tmp_path,
                                                           capsys):
    assert tokenize_ucf(ucf, dv, tmp_path / "out", *extra, frames=frames, resolution=resolution) == 2
    err = capsys.readouterr().err
    assert err.startswith("elt-tokenize: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_flags_stand_in_for_a_missing_config(ucf, tmp_path, capsys):
    """Cosmos' hub folders hold encoder.jit, decoder.jit and a small config.json of their own: vocabulary and
    compression then come from flags."""
    bare = write_jit_tokenizer(tmp_path / "bare", 4, 8, (4, 4, 4), config=False)
    (bare / "config.json").write_text('{"_class_name": "SomethingElse"}')
    assert tokenize_ucf(ucf, bare, tmp_path / "a") == 2
    assert "no codebook size (vocab_size or FSQ levels in config.json); pass --vocab-size N" in capsys.readouterr().err
    assert tokenize_ucf(ucf, bare, tmp_path / "a", "--vocab-size", "64") == 2
    assert "pass --compression TxSxS" in capsys.readouterr().err
    assert tokenize_ucf(ucf, bare, tmp_path / "b", "--vocab-size", "64", "--compression", "4x8x8") == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["sample"]["dtype"] == "int16" and m["tokenizer"]["vocab_size"] == 64


def test_images_and_remote_paths_are_refused(dv, tmp_path):
    tok = build_tokenizer("jit", path=str(dv), device="cpu")
    with pytest.raises(ValueError, match="video tokenizer; the source gives images"):
        tok.output_shape(3, [16, 16])
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_tokenizer("jit", path="nvidia/Cosmos-Tokenizer-DV4x8x8")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "encoder.jit").write_bytes(b"not a zip")
    tok = build_tokenizer("jit", path=str(tmp_path / "broken"), vocab_size=8, compression="4x8x8", device="cpu")
    with pytest.raises(ValueError, match="encoder.jit: not a TorchScript archive"):
        tok.encode(torch.zeros(1, 3, 5, 8, 8))


def test_bf16_from_config_and_lazy_loading(tmp_path):
    """`precision` in config.json picks the compute dtype (Cosmos runs in bf16); decoding never loads the encoder."""
    d = write_jit_tokenizer(tmp_path / "dv", 4, 8, (4, 4, 4), precision="bf16")
    tok = build_tokenizer("jit", path=str(d), device="cpu")
    codes = tok.encode(torch.rand(2, 3, 9, 16, 16))
    assert codes.shape == (2, 3, 2, 2) and tok.manifest_entry()["precision"] == "bf16"
    fresh = tokenizer_from_manifest({"tokenizer": tok.manifest_entry()}, device="cpu")
    assert fresh.decode(codes).shape == (2, 3, 9, 16, 16)
    assert fresh._encoder is None


def shrunk_recipe(shards: Path, out: Path) -> list[str]:
    """recipes/ucf101_masked_elt_6x4.yaml at 16² pixels instead of 128² (grid 5×2×2 instead of 5×16×16),
    a tiny trunk, and its 64,000-code vocabulary kept."""
    return shrunk_masked_overrides(shards, out, "[5,2,2]", steps=4)


def test_masked_ucf101_recipe_trains_and_samples_17_frame_videos(shards, tmp_path):
    overrides = shrunk_recipe(shards, tmp_path)
    recipe = load_recipe(ROOT / "recipes" / "ucf101_masked_elt_6x4.yaml", overrides)
    assert recipe.model.vocab_size == 64000
    check_manifest(json.loads((shards / "manifest.json").read_text()), recipe, str(shards))
    r = run_train("ucf101_masked_elt_6x4.yaml", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ucf101_masked_elt_6x4"
    rows = [row for row in read_metrics(run) if "loss" in row]
    assert len(rows) == 4 and all(np.isfinite(row["loss"]) for row in rows)
    grids = {p.name for p in (run / "samples" / "step_0000004").iterdir()}
    assert {"grid_L1.gif", "grid_L2.gif"} <= grids, grids                 # in-training grids: GIFs of video

    out = tmp_path / "samples"
    r = subprocess.run([sys.executable, "-m", "elt_scale.sample", str(run), "--loops", "1,2", "-n", "6",
                        "--steps", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out / "samples_L2.npz") as f:
        videos, labels = f["arr_0"], f["arr_1"]
    assert videos.dtype == np.uint8 and videos.shape == (6, 17, 16, 16, 3) and len(labels) == 6
    with Image.open(out / "grid_L2.gif") as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    # 17 frames of 125 ms; PIL merges identical neighbours (the tiny decoder repeats each latent frame 4×)
    # and GIF stores durations in 10 ms steps
    assert abs(sum(durations) - 17 * 125) <= 10 * len(durations), durations
    assert (out / "grid_L1.gif").exists()

    i3d = scripted(TinyI3D(), tmp_path / "i3d.pt")
    r = subprocess.run([sys.executable, "-m", "elt_scale.evaluate", "fvd", str(out / "samples_L2.npz"),
                        "--reference", str(shards), "--i3d-weights", i3d], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fvd=" in r.stdout and np.isfinite(float(r.stdout.split("fvd=")[1].split()[0]))
