"""Issue 26: tokenize.py writes items in a seeded random order, so shards hold most classes and the project's
order gives batches as mixed as an i.i.d. draw; the manifest's per-shard class counts give that figure
without reading data (elt_scale/data/mix.py, elt-plan), and training warns on a class-sorted shard set."""
import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep import tokenize
from elt_scale.config import load_recipe
from elt_scale.data import check_data, make_loader
from elt_scale.data.mix import expected_mix, iid_distinct, simulate_mix, sorted_within
from elt_scale.data.order import Order
from elt_scale.data.shards import decode_class_counts
from elt_scale.data.synthetic import synthetic_manifest
from elt_scale.plan import main as plan_main
from tests.conftest import ROOT
from tests.datasets import read_samples, save_image

CLASSES, PER_CLASS, PER_SHARD = 12, 24, 24         # the tree: 12 classes x 24 images, shards of 24
G, MICRO, BUFFER = 48, 8, 24                       # the recipe: one shard per shuffle window


def tok(*args: str) -> int:
    return tokenize.main([*args, "--workers", "0"])


def common(root: Path) -> list[str]:
    return ["--source", "imagenet", "--input", str(root), "--resolution", "8", "--pixel-mode", "identity",
            "--samples-per-shard", str(PER_SHARD)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in12")
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            save_image(root / f"n0100{c:04d}" / f"img_{i}.JPEG", size=(10, 8), seed=100 * c + i)
    return root


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> dict:
    """{"shuffled": dir, "sorted": dir} of the tree, one rank each."""
    out = {}
    for how, flags in (("shuffled", []), ("sorted", ["--keep-source-order"])):
        out[how] = tmp_path_factory.mktemp("shards") / how
        assert tok(*common(tree), *flags, "--out", str(out[how])) == 0
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_labels(out: Path) -> list[np.ndarray]:
    """Each listed shard's labels in sample order, read from the tar files themselves."""
    labels = []
    for name in manifest(out)["splits"]["train"]["shards"]:
        with tarfile.open(out / name) as tf:
            labels.append(np.array([int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")]))
    return labels


def test_shuffled_shards_each_hold_most_classes_and_say_how_they_were_written(shards):
    for how, least, most in (("shuffled", 8, CLASSES), ("sorted", 1, 1)):
        m = manifest(shards[how])
        entry = m["splits"]["train"]
        counts = decode_class_counts(entry["shard_class_counts"])
        labels = shard_labels(shards[how])
        assert len(labels) == CLASSES and counts.shape == (CLASSES, CLASSES)
        for row, lab in zip(counts, labels):                       # the manifest's counts are the shards'
            assert row.tolist() == np.bincount(lab, minlength=CLASSES).tolist()
        held = (counts > 0).sum(axis=1)
        assert least <= held.min() and held.max() <= most, (how, held)
        assert entry["item_order"] == ({"shuffled": True, "seed": 0} if how == "shuffled"
                                       else {"shuffled": False, "class_runs": CLASSES})
        assert sorted_within(m, "train") == (how == "sorted")
    # a source order that is not grouped by class (digits) counts parts of shards in proportion
    digits = {"splits": {"train": {"item_order": {"shuffled": False, "class_runs": 1465},
                                   "class_counts": {str(c): 160 for c in range(10)}}}}
    assert not sorted_within(digits, "train")
    # the same items either way, each once
    a, b = read_samples(shards["shuffled"]), read_samples(shards["sorted"])
    assert sorted(a) == sorted(b) and len(a) == CLASSES * PER_CLASS
    assert all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


def test_flip_copies_spread_over_shards(tree, tmp_path):
    out = tmp_path / "flip"
    assert tok(*common(tree), "--flip", "--out", str(out)) == 0
    shard_of = {}
    for name in manifest(out)["splits"]["train"]["shards"]:
        with tarfile.open(out / name) as tf:
            shard_of.update({m.name.split(".")[0]: name for m in tf.getmembers() if m.name.endswith(".cls")})
    pairs = [(k, k + "_flip") for k in shard_of if not k.endswith("_flip")]
    assert len(pairs) == CLASSES * PER_CLASS and all(f in shard_of for _, f in pairs)
    together = sum(shard_of[a] == shard_of[b] for a, b in pairs)
    assert together < len(pairs) / 4, together                    # 1 in 24 shards by chance; all in source order


def test_two_ranks_write_each_item_once_and_the_same_manifest_as_one(tree, shards, tmp_path):
    two = tmp_path / "two"
    for rank in (1, 0):
        assert tok(*common(tree), "--rank", str(rank), "--world-size", "2", "--out", str(two)) == 0
    assert tokenize.main(["--merge", "--out", str(two)]) == 0
    one = shards["shuffled"]
    assert manifest(two) == manifest(one)
    assert len(read_samples(two)) == CLASSES * PER_CLASS               # fails on a key written twice
    for name in manifest(one)["splits"]["train"]["shards"]:            # 144 items per rank: the same cuts
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_rerun_after_a_rank_died_skips_its_finished_shards(tree, shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "died"
    rank0 = [*common(tree), "--rank", "0", "--world-size", "2", "--batch-size", "12", "--out", str(out)]
    from elt_scale.tokenizers.pixels import PixelTokenizer
    real, calls = PixelTokenizer.encode, []

    def dies(self, images, seeds=None):
        calls.append(1)
        if len(calls) == 6:            # batch 6 = items 60..71: inside rank 0's third shard
            raise RuntimeError("rank died")
        return real(self, images, seeds)
    monkeypatch.setattr(PixelTokenizer, "encode", dies)
    with pytest.raises(RuntimeError, match="rank died"):
        tok(*rank0)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(done) == ["train-000000.tar", "train-000001.tar"] and not list(out.glob("*.tmp"))
    monkeypatch.setattr(PixelTokenizer, "encode", real)
    capsys.readouterr()
    assert tok(*rank0) == 0
    assert "2 already done" in capsys.readouterr().out
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items())    # kept, not rewritten
    assert tok(*common(tree), "--rank", "1", "--world-size", "2", "--out", str(out)) == 0
    assert tokenize.main(["--merge", "--out", str(out)]) == 0
    assert manifest(out) == manifest(shards["shuffled"]) and len(read_samples(out)) == CLASSES * PER_CLASS


def test_rerun_with_the_other_order_into_the_same_out_is_refused(tree, tmp_path):
    out = tmp_path / "o"
    rank0 = [*common(tree), "--rank", "0", "--world-size", "2", "--out", str(out)]
    assert tok(*rank0) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    with pytest.raises(RuntimeError, match="--keep-source-order"):       # names the setting among others
        tok(*rank0, "--keep-source-order")
    with pytest.raises(RuntimeError, match="split_hash"):
        tok(*rank0, "--seed", "1")
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_project_order_on_shuffled_shards_is_as_mixed_as_an_iid_draw(shards):
    iid_global = iid_distinct(np.full(CLASSES, PER_CLASS), G)
    iid_micro = iid_distinct(np.full(CLASSES, PER_CLASS), MICRO)
    assert iid_global == pytest.approx(11.8, abs=0.05)                     # the issue says 11.9
    measured = {}
    for how in ("shuffled", "sorted"):
        labels = shard_labels(shards[how])
        order = Order(tuple(len(x) for x in labels), 0, G, MICRO, BUFFER)
        batches = list(range(10 * order.batches_per_epoch))           # 10 epochs, every batch
        measured[how] = sim = simulate_mix(order, labels, batches)
        # the estimate from the manifest's counts alone agrees with the order drawn over real labels
        entry = manifest(shards[how])["splits"]["train"]
        est = expected_mix(decode_class_counts(entry["shard_class_counts"]), entry["shard_sizes"], 0, G, MICRO,
                           BUFFER, sorted_within=how == "sorted")
        assert est["global"] == pytest.approx(sim["global"], rel=0.05), (how, est, sim)
        assert est["micro"] == pytest.approx(sim["micro"], rel=0.05), (how, est, sim)
    assert measured["shuffled"]["global"] >= 0.9 * iid_global, measured        # within 10% of i.i.d.
    assert measured["shuffled"]["micro"] >= 0.9 * iid_micro, measured
    assert measured["sorted"]["global"] <= 0.6 * iid_global, measured          # the 6.0 of 11.9


def recipe(shards_dir, *overrides):
    return load_recipe(None, [f"data.shards={shards_dir}", "model.family=diffusion", "model.channels=3",
                              f"model.num_classes={CLASSES}", f"train.micro_batch={MICRO}",
                              f"train.grad_accum={G // MICRO}", f"data.shuffle_buffer={BUFFER}", *overrides])


def test_start_up_check_warns_on_class_sorted_shards_and_notes_when_it_cannot_tell(shards, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_data(recipe(shards["shuffled"]))
    assert capsys.readouterr().err == ""                                 # mixed: silent
    check_data(recipe(shards["sorted"]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"elt-train: WARNING data.shards={shards['sorted']}"), err
    assert "per global batch of 48" in err and "i.i.d. draw 11.8" in err and "--keep-source-order" in err
    # a shard set of an older tokenize.py: no counts in the manifest, the sidecars still tell
    old = tmp_path / "old"
    old.mkdir()
    for p in shards["sorted"].iterdir():
        (old / p.name).write_bytes(p.read_bytes())
    m = manifest(old)
    for key in ("shard_class_counts", "item_order"):
        del m["splits"]["train"][key]
    (old / "manifest.json").write_text(json.dumps(m))
    check_data(recipe(old))
    err = capsys.readouterr().err
    assert "WARNING" in err and "write order not recorded" in err and err.count("\n") == 1
    # another tool's shards: nothing to count from -> one quiet note, and the run goes on
    for p in old.glob("*.tar.json"):
        p.unlink()
    check_data(recipe(old))
    err = capsys.readouterr().err
    assert err.startswith("elt-train: note:") and "no per-shard class counts" in err and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")                                      # other ranks stay silent
    check_data(recipe(shards["sorted"]))
    assert capsys.readouterr().err == ""


def test_the_trainers_data_path_warns_once(shards, capsys, monkeypatch):
    """train.main runs check_data before anything else, then make_loader: one warning in all. (A real
    `elt-train` start costs DeepSpeed's start-up, 25-90 s here; its stderr shows the same single line.)"""
    monkeypatch.delenv("RANK", raising=False)
    r = recipe(shards["sorted"])
    check_data(r)
    x, y = next(make_loader(r))
    assert x.shape == (MICRO, 3, 8, 8) and len(set(y.tolist())) == 1       # one class per micro-batch
    err = capsys.readouterr().err
    assert err.count("WARNING data.shards=") == 1 and err.count("\n") == 1, err


def test_elt_plan_prints_the_mix_from_a_manifest_or_a_synthetic_one(shards, capsys):
    over = [f"data.shards={shards['sorted']}", "model.family=diffusion", "model.channels=3",
            f"model.num_classes={CLASSES}", f"train.micro_batch={MICRO}", f"train.grad_accum={G // MICRO}",
            f"data.shuffle_buffer={BUFFER}"]
    assert plan_main([str(ROOT / "recipes" / "digits_diffusion.yaml"), *over, "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch class mix" in out and "per global batch of 48" in out and "far from an i.i.d. draw" in out
    assert plan_main([str(ROOT / "recipes" / "imagenet256_masked_elt_l_8x3.yaml"), "--gpus", "16",
                      "--manifest", "synthetic:imagenet-sorted", "--json"]) == 0
    mix = json.loads(capsys.readouterr().out)["batch_mix"]["mix"]
    assert (mix["global_batch"], mix["micro_batch"], mix["shards"], mix["classes"]) == (512, 32, 1282, 1000)
    assert 195 < mix["global"] < 215 and mix["global_iid"] == pytest.approx(400.5, abs=0.1)   # the issue: 206


def test_reshuffle_turns_a_class_sorted_set_into_the_shuffled_one_without_encoding(shards, tmp_path, capsys,
                                                                                  monkeypatch):
    from data_prep import reshuffle
    out = tmp_path / "mixed"
    assert reshuffle.main(["--input", str(shards["sorted"]), "--out", str(out)]) == 0
    new, direct = manifest(out), manifest(shards["shuffled"])
    assert new["splits"]["train"]["item_order"] == {"shuffled": True, "seed": 0,
                                                    "reshuffled_from": str(shards["sorted"])}
    for m in (new, direct):
        del m["splits"]["train"]["item_order"]
    assert new == direct                       # no input skipped: tokenize's own permutation, the same cuts
    for name in direct["splits"]["train"]["shards"]:
        assert (out / name).read_bytes() == (shards["shuffled"] / name).read_bytes(), name
    monkeypatch.delenv("RANK", raising=False)
    capsys.readouterr()
    check_data(recipe(out))
    assert capsys.readouterr().err == ""
    # a rerun keeps the complete shards, and the input is never the output
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert reshuffle.main(["--input", str(shards["sorted"]), "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == done
    assert reshuffle.main(["--input", str(out), "--out", str(out)]) == 2
    assert "write the reshuffled shards to a new directory" in capsys.readouterr().err


def test_data_page_batch_mix_table_comes_from_docs_and_docs_are_current():
    """docs/batch_mix.csv is bench/batch_mix.py's output: its cheap rows (class-sorted, UCF-101) recompute to
    the same expected figures, and docs/data.md's table quotes every (G, m) row of it."""
    rows = list(csv.DictReader((ROOT / "docs" / "batch_mix.csv").open()))
    assert {(r["dataset"], r["layout"]) for r in rows} == {(d, h) for d in ("imagenet", "ucf101")
                                                          for h in ("sorted", "shuffled")}
    entries = {}
    for row in rows:
        if row["layout"] == "shuffled" and row["dataset"] == "imagenet":
            continue                                        # a 1.28M-item Python shuffle: bench/batch_mix.py's job
        key = f"{row['dataset']}-{row['layout']}"
        entries.setdefault(key, synthetic_manifest(key)[0]["splits"]["train"])
        e = entries[key]
        mix = expected_mix(decode_class_counts(e["shard_class_counts"]), e["shard_sizes"], 0, int(row["G"]),
                           int(row["m"]), int(row["buffer"]), sorted_within=row["layout"] == "sorted")
        assert mix["global"] == pytest.approx(float(row["global"]), abs=1e-3), row
        assert mix["micro"] == pytest.approx(float(row["micro"]), abs=1e-3), row
    page = (ROOT / "docs" / "data.md").read_text()     # the README's Data section moved there (issue 32)
    by = {(r["dataset"], r["G"], r["m"], r["layout"]): r for r in rows}
    for dataset, g, m, _ in {k for k in by if k[3] == "sorted"}:
        s, h = by[dataset, g, m, "sorted"], by[dataset, g, m, "shuffled"]
        cell = "{:.0f} / {:.1f}".format
        cells = [cell(float(r[a]), float(r[b])) for r, a, b in ((s, "global", "micro"), (h, "global", "micro"),
                                                                 (s, "global_iid", "micro_iid"))]
        line = f"| {g} | {m} | " + " | ".join(cells) + " |"
        assert line in page, line
