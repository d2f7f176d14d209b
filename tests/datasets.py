"""Generated datasets for tests: ImageNet/UCF-101-shaped source files, shard sets written directly, and a
reader of what tokenize.py wrote."""
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from elt_scale.data.shards import FORMAT, ShardWriter, decode_npy, write_manifest


def read_samples(out: Path, split: str = "train") -> dict[str, tuple[int, np.ndarray, str]]:
    """key -> (label, array, source) over the shards the manifest lists; fails on a duplicate key."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for name in manifest["splits"][split]["shards"]:
        with tarfile.open(out / name) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for member in sorted(members):
            key, ext = member.split(".", 1)
            if ext == "cls":
                assert key not in samples, f"duplicate key {key}"
                samples[key] = (int(members[member]), decode_npy(members[f"{key}.input.npy"]),
                                members[f"{key}.key.txt"].decode())
    return samples


def save_image(path: Path, size=(40, 30), mode="RGB", fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, fmt)


def write_avi(path: Path, frames=12, size=(32, 24), seed=0):
    import av
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_ucf(root: Path) -> dict:
    """UCF-101 layout; classInd says HandStandPushups where the folder says HandstandPushups (as in the
    real archive); the train list names one clip that is missing and one that is corrupt."""
    classes = ["ApplyEyeMakeup", "HandStandPushups", "YoYo"]
    folders = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    train, test = [], []
    for c, (cls, folder) in enumerate(zip(classes, folders)):
        for g in (1, 2):
            rel = f"{folder}/v_{cls}_g{g:02d}_c01.avi"
            write_avi(root / "UCF-101" / rel, seed=10 * c + g)
            (train if g == 1 else test).append(rel)
    (root / "UCF-101" / "YoYo" / "v_YoYo_g03_c01.avi").write_bytes(b"\x00not a video" * 50)
    ann = root / "ucfTrainTestlist"
    ann.mkdir()
    (ann / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    lines = [f"{rel} {classes.index(next(c for c in classes if c.lower() == rel.split('/')[0].lower())) + 1}"
             for rel in train]
    lines += ["YoYo/v_YoYo_g03_c01.avi 3", "YoYo/v_YoYo_g09_c01.avi 3"]
    (ann / "trainlist01.txt").write_text("\n".join(lines) + "\n")
    (ann / "testlist01.txt").write_text("\n".join(test) + "\n")
    return {"classes": classes, "train": train, "test": test}


def write_shards(out, n=300, per_shard=50, shape=(8, 8)):
    """Digits-like codes shards whose sample i holds the value i, so batches are easy to compare."""
    with ShardWriter(out, "train", per_shard) as w:
        for i in range(n):
            w.write(f"s{i:05d}", np.full(shape, i, np.int16), i % 10, f"src{i}")   # value i: traceable
    write_manifest(out, {"format": FORMAT, "tokenizer": {"name": "pixels", "mode": "quantized", "levels": 17},
                         "sample": {"kind": "codes", "shape": list(shape), "dtype": "int16", "vocab_size": 17,
                                    "scaling_factor": 1.0},
                         "num_classes": 10, "class_names": [str(i) for i in range(10)],
                         "splits": {"train": {"num_samples": n, "shards": w.written, "class_counts": {},
                                              "shard_sizes": [min(per_shard, n - i) for i in range(0, n, per_shard)]}},
                         "config_hash": "test", "skipped": []})
    return out
