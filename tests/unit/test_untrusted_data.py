"""Issue 9, data side: hostile shards never execute code, hostile file names never escape or collide."""
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep import tokenize
from elt_scale.config import load_recipe
from elt_scale.data import ShardError, make_loader
from elt_scale.data.shards import FORMAT, encode_npy, write_manifest


class CreatesFile:
    """Unpickling this object creates `path` (what a malicious shard would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            key = sample["__key__"]
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def good(i: int) -> dict:
    return {"__key__": f"ok{i:03d}", "input.npy": encode_npy(np.full((8, 8), i % 17, np.int16)), "cls": b"1"}


def hostile_shards(tmp_path: Path, bad: dict) -> Path:
    out = tmp_path / "shards"
    out.mkdir()
    write_tar(out / "train-000000.tar", [good(i) for i in range(20)] + [bad] + [good(i) for i in range(20, 40)])
    write_manifest(out, {"format": FORMAT, "tokenizer": {"name": "pixels"}, "num_classes": 10,
                         "sample": {"kind": "codes", "shape": [8, 8], "dtype": "int16", "vocab_size": 17,
                                    "scaling_factor": 1.0}, "class_names": [str(i) for i in range(10)],
                         "splits": {"train": {"num_samples": 41, "shards": ["train-000000.tar"],
                                              "class_counts": {}}}, "config_hash": "x", "skipped": []})
    return out


def read_all(shards: Path, strict: bool, workers: int = 0):
    loader = make_loader(load_recipe(None, [f"data.shards={shards}", f"data.strict={str(strict).lower()}",
                                            "train.micro_batch=8", "data.shuffle_buffer=0",
                                            f"data.num_workers={workers}"]))
    batches = [next(loader) for _ in range(5)]
    return loader, batches


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth"])
def test_pickle_member_never_unpickled_strict(tmp_path, ext):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(CreatesFile(marker))
    bad = {**good(99), "__key__": "evil", ext: payload}
    shards = hostile_shards(tmp_path, bad)
    with pytest.raises(ShardError) as e:
        read_all(shards, strict=True)
    assert "train-000000.tar" in str(e.value) and "'evil'" in str(e.value) and ext in str(e.value)
    assert not marker.exists()
    # control: the payload really is live, so the assertion above could have failed
    pickle.loads(payload)
    assert marker.exists()


def test_pickle_member_skipped_and_counted_when_not_strict(tmp_path):
    marker = tmp_path / "MARKER"
    shards = hostile_shards(tmp_path, {**good(99), "__key__": "evil", "pyd": pickle.dumps(CreatesFile(marker))})
    loader, batches = read_all(shards, strict=False, workers=1)
    assert loader.bad_samples >= 1 and not marker.exists()
    assert all(x.shape == (8, 8, 8) for x, _ in batches)


def test_object_npy_refused(tmp_path):
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    np.save(buf, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
    shards = hostile_shards(tmp_path, {"__key__": "objarr", "input.npy": buf.getvalue(), "cls": b"1"})
    with pytest.raises(ShardError, match=r"'objarr'.*(allow_pickle|object)"):
        read_all(shards, strict=True)
    assert not marker.exists()
    loader, _ = read_all(shards, strict=False)
    assert loader.bad_samples == 1 and not marker.exists()


SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def test_hostile_file_names_become_safe_unique_keys_and_outside_symlinks_are_skipped(tmp_path):
    from PIL import Image
    root = tmp_path / "in"
    (root / "cls").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    names = ["..JPEG", "a..b.JPEG", "a_b.JPEG", "-rf.JPEG", "new\nline.JPEG", "new_line.JPEG", ".hidden.JPEG"]
    for i, name in enumerate(names):
        Image.new("RGB", (12, 10), (20 * i, 0, 0)).save(root / "cls" / name, "JPEG")
    Image.new("RGB", (12, 10)).save(outside / "passwd.JPEG", "JPEG")
    os.symlink(outside / "passwd.JPEG", root / "cls" / "link.JPEG")
    os.symlink(outside, root / "cls" / "linkdir")
    os.symlink(root / "cls" / "a_b.JPEG", root / "cls" / "inside_link.JPEG")      # inside the tree: kept
    out = tmp_path / "out"
    assert tokenize.main(["--source", "folder", "--input", str(root), "--resolution", "8", "--pixel-mode",
                          "identity", "--workers", "0", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    with tarfile.open(out / manifest["splits"]["train"]["shards"][0]) as tf:
        members = tf.getnames()
        sources = {tf.extractfile(m).read().decode(): m.name.split(".")[0] for m in tf.getmembers()
                   if m.name.endswith(".key.txt")}
    keys = list(sources.values())
    assert sorted(sources) == sorted(f"cls/{n}" for n in names + ["inside_link.JPEG"])
    assert len(set(keys)) == len(keys) == len(names) + 1
    assert all(SAFE_KEY.fullmatch(k) for k in keys), keys
    assert all("/" not in m and ".." not in m and "\n" not in m for m in members)
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "outside the input tree" in skipped["cls/link.JPEG"] and "cls/linkdir" in skipped
    assert manifest["splits"]["train"]["num_samples"] == len(names) + 1
