"""data_prep/tokenize.py on tiny ImageNet- and UCF-101-shaped trees: messy inputs, skipped list, ranks,
merge, resume after a crash or a kill."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import tokenize
from data_prep.shard_plan import plan_shards, rank_from_env
from tests.conftest import ROOT
from tests.datasets import make_ucf, read_samples, save_image


def tok(*args: str) -> int:
    return tokenize.main([*args, "--workers", "0"])


def make_imagenet(root: Path) -> dict:
    """train/nXXXXXXXX/*.JPEG with one CMYK, one greyscale, one PNG named .JPEG, one truncated file and a
    README that is no image; val/ flat with a label file. Returns what a correct run must produce."""
    synsets = ["n01000001", "n01000002", "n02000003"]
    for c, syn in enumerate(synsets):
        for i in range(3):
            save_image(root / "train" / syn / f"{syn}_{i}.JPEG", size=(40 + 8 * i, 30), seed=10 * c + i)
    save_image(root / "train" / synsets[0] / "cmyk.JPEG", mode="CMYK")
    save_image(root / "train" / synsets[1] / "grey.JPEG", mode="L")
    save_image(root / "train" / synsets[2] / "png_in_disguise.JPEG", fmt="PNG")
    good = root / "train" / synsets[2] / f"{synsets[2]}_0.JPEG"
    (root / "train" / synsets[2] / "truncated.JPEG").write_bytes(good.read_bytes()[:300])
    (root / "train" / synsets[0] / "README.txt").write_text("not an image")
    labels = []
    for i, syn in enumerate(synsets * 2):
        name = f"ILSVRC2012_val_{i:08d}"
        save_image(root / "val" / f"{name}.JPEG", seed=100 + i)
        labels.append(f"{name},{syn} 1 2 3 4")
    save_image(root / "val" / "unlabelled.JPEG")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(labels) + "\n")
    return {"synsets": synsets, "readable": 12, "unreadable": ["n02000003/truncated.JPEG"]}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    return root, make_ucf(root)


def test_imagenet_train_messy_inputs(imagenet, tmp_path):
    root, truth = imagenet
    out = tmp_path / "shards"
    # --keep-source-order: the shard sizes below place the unreadable input in the last shard (issue 26)
    assert tok("--source", "imagenet", "--input", str(root / "train"), "--resolution", "16", "--keep-source-order",
               "--pixel-mode", "identity", "--samples-per-shard", "5", "--out", str(out)) == 0
    m = json.loads((out / "manifest.json").read_text())
    samples = read_samples(out)
    # every readable input is exactly one sample, the unreadable one is listed with a reason
    assert len(samples) == m["splits"]["train"]["num_samples"] == truth["readable"]
    assert [s["source"] for s in m["skipped"]] == truth["unreadable"]
    assert "truncated" in m["skipped"][0]["reason"].lower() or "OSError" in m["skipped"][0]["reason"]
    assert m["class_names"] == truth["synsets"] and m["num_classes"] == 3
    assert m["sample"] == {"kind": "latents", "shape": [3, 16, 16], "dtype": "float16", "vocab_size": None,
                           "scaling_factor": 1.0}
    assert sum(m["splits"]["train"]["class_counts"].values()) == truth["readable"]
    assert m["splits"]["train"]["shard_sizes"] == [5, 5, 2]   # 13 items in shards of 5; one unreadable
    for key, (label, x, src) in samples.items():
        assert src.split("/")[0] == truth["synsets"][label], key
        assert x.shape == (3, 16, 16) and x.dtype == np.float16 and -1 <= x.min() and x.max() <= 1
    grey = next(x for _, x, src in samples.values() if src.endswith("grey.JPEG"))
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_flip_copies_are_mirror_images(imagenet, tmp_path):
    root, truth = imagenet
    out = tmp_path / "flip"
    assert tok("--source", "folder", "--input", str(root / "train"), "--resolution", "16", "--flip",
               "--pixel-mode", "identity", "--out", str(out)) == 0
    samples = read_samples(out)
    assert len(samples) == 2 * truth["readable"]
    for key, (label, x, _) in samples.items():
        if key.endswith("_flip"):
            assert np.array_equal(samples[key[:-5]][1][..., ::-1], x) and samples[key[:-5]][0] == label


def test_imagenet_val_layout_with_label_file(imagenet, tmp_path):
    root, truth = imagenet
    out = tmp_path / "val"
    assert tok("--source", "imagenet", "--input", str(root / "val"), "--labels", str(root / "LOC_val_solution.csv"),
               "--split", "val", "--resolution", "16", "--pixel-mode", "identity", "--out", str(out)) == 0
    m = json.loads((out / "manifest.json").read_text())
    samples = read_samples(out, "val")
    assert len(samples) == 6 and m["splits"]["val"]["class_counts"] == {"0": 2, "1": 2, "2": 2}
    assert [s["source"] for s in m["skipped"]] == ["unlabelled.JPEG"]
    for label, _, src in samples.values():
        assert label == int(src.split("_")[-1].split(".")[0]) % 3


def test_two_ranks_equal_one_rank_and_merge(imagenet, tmp_path, monkeypatch, capsys):
    root, _ = imagenet
    common = ["--source", "imagenet", "--input", str(root / "train"), "--resolution", "12",
              "--pixel-mode", "identity", "--samples-per-shard", "2"]
    assert tok(*common, "--out", str(tmp_path / "one")) == 0
    for rank in (1, 0):
        assert tok(*common, "--rank", str(rank), "--world-size", "2", "--out", str(tmp_path / "two")) == 0
    assert not (tmp_path / "two" / "manifest.json").exists()
    assert tokenize.main(["--merge", "--split", "val", "--out", str(tmp_path / "two")]) == 2   # --split narrows
    assert "split 'val'" in capsys.readouterr().err                                             # a merge
    assert tokenize.main(["--merge", "--out", str(tmp_path / "two")]) == 0
    one, two = read_samples(tmp_path / "one"), read_samples(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for k in one:
        assert one[k][0] == two[k][0] and np.array_equal(one[k][1], two[k][1])
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["splits"]["train"]["class_counts"] == m2["splits"]["train"]["class_counts"]
    assert m1["skipped"] == m2["skipped"] and m1["config_hash"] == m2["config_hash"]
    # a merge with a rank missing names it, and writes nothing
    assert tok(*common, "--rank", "2", "--world-size", "3", "--out", str(tmp_path / "three")) == 0
    with pytest.raises(RuntimeError, match=r"missing ranks \[0, 1\]"):
        tokenize.main(["--merge", "--out", str(tmp_path / "three")])
    assert not (tmp_path / "three" / "manifest.json").exists()


def test_slurm_array_defaults_and_shard_ranges(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert rank_from_env() == (2, 4)
    plans = [p for r in range(4) for p in plan_shards(23, 3, r, 4)]
    assert [p.index for p in plans] == list(range(len(plans)))              # disjoint, contiguous ranges
    assert [(p.start, p.end) for p in plans][:3] == [(0, 3), (3, 5), (5, 8)]
    assert sorted(i for p in plans for i in range(p.start, p.end)) == list(range(23))


def test_crash_mid_shard_then_rerun_completes_without_duplicates(tmp_path, monkeypatch):
    out = tmp_path / "crash"
    args = ["--source", "digits", "--split", "val", "--samples-per-shard", "30", "--batch-size", "10",
            "--out", str(out)]
    from elt_scale.tokenizers.pixels import PixelTokenizer
    real, calls = PixelTokenizer.encode, []

    def failing(self, images, seeds=None):
        calls.append(1)
        if len(calls) == 7:            # batch 7 = items 60..69, inside the third shard
            raise RuntimeError("simulated crash")
        return real(self, images, seeds)
    monkeypatch.setattr(PixelTokenizer, "encode", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tok(*args)
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(PixelTokenizer, "encode", real)
    assert tok(*args) == 0
    samples = read_samples(out, "val")
    assert len(samples) == 180 and json.loads((out / "manifest.json").read_text())["splits"]["val"][
        "num_samples"] == 180


def test_sigkill_mid_run_then_rerun(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data_prep" / "tokenize.py"), "--source", "digits", "--samples-per-shard", "50",
           "--workers", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "train-000002.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "run finished before it could be killed"
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    r = subprocess.run(cmd + ["--batch-size", "64"], capture_output=True, text=True)   # batch size: not a setting
    assert r.returncode == 0, r.stderr
    assert f"{len(done_before)} already done" in r.stdout
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in done_before.items())   # kept, not rewritten
    assert len(read_samples(out)) == 1617 and not list(out.glob("*.tmp"))


def test_a_complete_shard_cut_short_later_is_written_again(tmp_path, capsys):
    out = tmp_path / "cut"
    args = ["--source", "digits", "--split", "val", "--samples-per-shard", "60", "--out", str(out)]
    assert tok(*args) == 0
    whole = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    cut = out / "val-000001.tar"
    cut.write_bytes(whole[cut.name][:4096])                      # e.g. a copy that stopped half-way
    capsys.readouterr()
    assert tok(*args) == 0
    captured = capsys.readouterr()
    assert f"{cut} has 4096 bytes, its sidecar says {len(whole[cut.name])}: writing it again" in captured.err
    assert "2 already done" in captured.out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == whole
    assert len(read_samples(out, "val")) == 180


def test_rerun_with_other_settings_refuses_to_mix(tmp_path):
    out = tmp_path / "mixed"
    rank = ["--rank", "0", "--world-size", "2"]        # no manifest.json yet: the shards' sidecars catch it
    assert tok("--source", "digits", "--split", "val", *rank, "--out", str(out)) == 0
    with pytest.raises(RuntimeError, match="different input list or settings"):
        tok("--source", "digits", "--split", "val", "--levels", "9", *rank, "--out", str(out))


def test_ucf101_splits_case_mismatch_and_bad_clips(ucf, tmp_path):
    root, truth = ucf
    out = tmp_path / "ucf"
    common = ["--source", "ucf101", "--input", str(root / "UCF-101"), "--resolution", "16", "--frames", "4",
              "--frame-stride", "2", "--pixel-mode", "identity", "--out", str(out)]
    assert tok(*common, "--split", "train") == 0
    assert tok(*common, "--split", "test") == 0
    m = json.loads((out / "manifest.json").read_text())
    train, test = read_samples(out, "train"), read_samples(out, "test")
    assert m["class_names"] == truth["classes"]
    assert sorted(s for _, _, s in train.values()) == sorted(truth["train"])
    assert sorted(s for _, _, s in test.values()) == sorted(truth["test"])
    for label, x, src in list(train.values()) + list(test.values()):
        assert x.shape == (3, 4, 16, 16) and truth["classes"][label].lower() == src.split("/")[0].lower()
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"YoYo/v_YoYo_g03_c01.avi", "YoYo/v_YoYo_g09_c01.avi"}
    assert "not found" in reasons["YoYo/v_YoYo_g09_c01.avi"]
    assert m["splits"]["train"]["num_samples"] + len(reasons) == len(truth["train"]) + 2
    assert m["source"]["frames"] == 4 and m["sample"]["shape"] == [3, 4, 16, 16]
    # a clip too short for the frame window is skipped with the reason, not padded
    assert tok(*common[:-1], str(tmp_path / "short"), "--frames", "8", "--split", "test") == 0
    short = json.loads((tmp_path / "short" / "manifest.json").read_text())
    assert short["splits"]["test"]["num_samples"] == 0 and "needs 15" in short["skipped"][0]["reason"]


def test_cli_help_and_workers(imagenet, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize.parse_args(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--world-size" in text and "--merge" in text and "SLURM_ARRAY_TASK_ID" in text
    root, truth = imagenet
    out = tmp_path / "workers"
    assert tokenize.main(["--source", "folder", "--input", str(root / "train"), "--resolution", "8",
                          "--pixel-mode", "identity", "--workers", "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert len(read_samples(out)) == truth["readable"]


def test_adm_center_crop_keeps_the_centre():
    from data_prep.decode import center_crop_arr
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :16, 0], arr[:, 16:48, 1], arr[:, 48:, 2] = 255, 255, 255     # red | green (centre) | blue
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    assert (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()


def test_out_dir_from_other_settings_and_empty_input_fail_early(tmp_path, capsys):
    out = tmp_path / "o"
    assert tok("--source", "digits", "--split", "val", "--out", str(out)) == 0
    capsys.readouterr()
    assert tok("--source", "digits", "--split", "train", "--levels", "9", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("elt-tokenize: error: ") and "was written with other settings" in err, err
    assert not list(out.glob("train-*"))                            # before any shard is written
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert tok("--source", "folder", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "e")) == 2
    assert "elt-tokenize: error: no inputs for folder/train" in capsys.readouterr().err


@pytest.mark.parametrize("args,words", [
    (["--source", "imagenet", "--input", "{tmp}/nope"], "--input {tmp}/nope: not a directory"),
    (["--source", "imagenet"], "--source imagenet needs --input PATH"),
    (["--source", "digits", "--split", "test"], "digits has splits train and val, not 'test'"),
    (["--source", "digits", "--rank", "3", "--world-size", "2"], "--rank 3 --world-size 2: need 0 <= rank"),
    (["--merge"], "no manifest.*.rank*.json to merge"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert tok(*[a.format(tmp=tmp_path) for a in args], "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("elt-tokenize: error: ") and words.format(tmp=tmp_path) in err and "Traceback" not in err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("flag,value", [("--samples-per-shard", "0"), ("--batch-size", "0"), ("--workers", "-1")])
def test_bad_numbers_are_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize.main(["--source", "digits", flag, value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"{flag} {value}: must be >=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
