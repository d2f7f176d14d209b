"""Source readers: list one split of a dataset as Items (decoded later, in DataLoader workers).

Every source returns the full sorted item list for its split, so every rank of an array job sees the
same list and takes its own slice. Inputs that cannot even be listed (a symlink out of the tree, a
file the split list names but the disk lacks, an image outside any class folder) go to `skipped`
with the reason; inputs that fail to decode are added to it later by tokenize.py.

    imagenet  train layout  ROOT/nXXXXXXXX/*.JPEG; classes in the standard ILSVRC-2012 order, which
              is the sorted order of the 1000 synset ids (n01440764 = 0 ... n15075141 = 999). That
              order is what sorting the folders gives; with fewer folders, pass --class-index
              (e.g. LOC_synset_mapping.txt: one synset per line, first token) to keep the 1000 labels.
              val layout   ROOT/*.JPEG + --labels FILE: lines `FILE SYNSET` or `FILE LABEL`
              (space or comma separated; LOC_val_solution.csv works as is).
    ucf101    ROOT/<Class>/v_<Class>_gXX_cXX.avi with classInd.txt and trainlist0K/testlist0K.txt
              (in ROOT, ROOT/ucfTrainTestlist, or --annotations DIR); --split train|test, --split-id K.
    folder    ROOT/<class>/**/<image>, classes in sorted folder order.
    digits    scikit-learn's 8x8 digits (no --input).
    digit-mosaic  a proxy task where relating distant tokens matters: R x C of those digits tiled into one
              (8R) x (8C) image whose class is a rule over all of its digits (--mosaic-*; no --input).
Class names are matched case-insensitively between index files and folders (UCF-101's classInd.txt
says HandStandPushups, its folder says HandstandPushups).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .decode import ArrayDecoder, ImageDecoder, VideoDecoder
from .files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, strip_suffix, unique_keys, walk_files

SYNSET = re.compile(r"n\d{8}")


@dataclass(slots=True)        # ImageNet lists 1.28M of these
class Item:
    name: str                   # raw name the key derives from (sanitised + made unique by assign_keys)
    ref: Any                    # what `Source.decode` reads: a path or an index
    label: int
    source: str                 # original file name, for the manifest and error messages
    flip: bool = False
    key: str = ""


@dataclass
class Source:
    items: list[Item]
    class_names: list[str]
    channels: int
    grid: list[int]                          # [H, W] or [T, H, W] of the decoded pixels
    decode: Callable                         # decode(ref, flip) -> (C, [T,] H, W) in [0, 1]
    skipped: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # extra manifest facts (resolution, frames, ...)


def add_flips(items: list[Item]) -> list[Item]:
    """Each item followed by its horizontally flipped copy."""
    out = []
    for it in items:
        out += [it, Item(it.name + "_flip", it.ref, it.label, it.source, flip=True)]
    return out


def assign_keys(items: list[Item]) -> None:
    for it, key in zip(items, unique_keys([it.name for it in items])):
        it.key = key


# ---------------------------------------------------------------------------------------------
# image sources

def _class_folder_items(root: Path, lookup: dict[str, int], skipped: list[dict]) -> list[Item]:
    """Items of a class-per-folder tree; `lookup` maps lower-case folder name -> label."""
    items = []
    for path in walk_files(root, IMAGE_EXTENSIONS, skipped):
        rel = path.relative_to(root).as_posix()
        folder = rel.split("/")[0] if "/" in rel else None
        if folder is None or folder.lower() not in lookup:
            why = "not inside a class folder" if folder is None else f"folder {folder!r} is not a known class"
            skipped.append({"source": rel, "reason": why})
            continue
        items.append(Item(strip_suffix(rel), str(path), lookup[folder.lower()], rel))
    return items


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink())


def _check_root(input: str | None, source: str) -> Path:
    if not input:
        raise ValueError(f"--source {source} needs --input PATH")
    root = Path(input)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {input}: not a directory")
    return root


def read_class_index(path: str) -> list[str]:
    """One class per line; the first token is the name (LOC_synset_mapping.txt, a plain list, or
    UCF-101's classInd.txt `1 ApplyEyeMakeup`, where a leading number gives the 1-based order)."""
    rows = [line.replace(",", " ").split() for line in Path(path).read_text().splitlines() if line.strip()]
    if rows and all(len(r) >= 2 and r[0].isdigit() for r in rows):
        return [name for _, name in sorted((int(r[0]), r[1]) for r in rows)]
    return [r[0] for r in rows]


def _lookup(class_names: list[str], where: str) -> dict[str, int]:
    lookup = {}
    for i, name in enumerate(class_names):
        if name.lower() in lookup:
            raise ValueError(f"{where}: class {name!r} appears twice (names are compared case-insensitively)")
        lookup[name.lower()] = i
    return lookup


def folder(input=None, resolution=256, **_) -> Source:
    root = _check_root(input, "folder")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"--input {root}: no class folders")
    skipped: list[dict] = []
    items = _class_folder_items(root, _lookup(classes, str(root)), skipped)
    return Source(items, classes, 3, [resolution, resolution], ImageDecoder(resolution), skipped,
                  {"resolution": resolution})


def imagenet(input=None, split="train", resolution=256, labels=None, class_index=None, **_) -> Source:
    root = _check_root(input, "imagenet")
    skipped: list[dict] = []
    folders = [d for d in _class_dirs(root) if SYNSET.fullmatch(d.lower())]
    classes = read_class_index(class_index) if class_index else None
    if folders and not labels:                        # train layout (or a val tree sorted into folders)
        classes = classes or sorted(folders)
        items = _class_folder_items(root, _lookup(classes, class_index or str(root)), skipped)
    else:                                             # flat val layout + label file
        if not labels:
            raise ValueError(f"--input {root} has no nXXXXXXXX class folders; for the flat val layout "
                             "pass --labels FILE (lines `FILE SYNSET` or `FILE LABEL`)")
        table = read_val_labels(labels)
        classes = classes or sorted({v for v in table.values() if isinstance(v, str)}) or \
            [str(i) for i in range(1000)]
        lookup = _lookup(classes, class_index or labels)
        items = []
        for path in walk_files(root, IMAGE_EXTENSIONS, skipped):
            rel = path.relative_to(root).as_posix()
            label = table.get(path.name.split(".")[0].lower())
            if isinstance(label, str):
                label = lookup.get(label.lower())
            if label is None or not 0 <= label < len(classes):
                skipped.append({"source": rel, "reason": f"no (known) label for it in {labels}"})
                continue
            items.append(Item(strip_suffix(rel), str(path), label, rel))
    if len(classes) != 1000:
        print(f"note: imagenet with {len(classes)} classes; labels follow "
              f"{'--class-index' if class_index else 'the sorted synset ids present'}")
    return Source(items, classes, 3, [resolution, resolution], ImageDecoder(resolution), skipped,
                  {"resolution": resolution, "split": split})


def read_val_labels(path: str) -> dict[str, str | int]:
    """File stem (lower case) -> synset id or integer label."""
    table: dict[str, str | int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        tok = line.replace(",", " ").split()
        if len(tok) < 2 or tok[0].lower() == "imageid":
            continue
        value = tok[1]
        table[tok[0].split(".")[0].lower()] = int(value) if value.isdigit() else value
    if not table:
        raise ValueError(f"--labels {path}: no `FILE LABEL` lines")
    return table


# ---------------------------------------------------------------------------------------------
# video

def _annotation_dir(root: Path, annotations: str | None) -> Path:
    candidates = [Path(annotations)] if annotations else [root, root / "ucfTrainTestlist",
                                                          root.parent / "ucfTrainTestlist"]
    for d in candidates:
        if (d / "classInd.txt").is_file():
            return d
    raise FileNotFoundError(f"classInd.txt not found in {', '.join(map(str, candidates))}; pass --annotations DIR")


def ucf101(input=None, split="train", split_id=1, resolution=128, frames=16, frame_stride=1,
           annotations=None, **_) -> Source:
    root = _check_root(input, "ucf101")
    if split not in ("train", "test"):
        raise ValueError(f"ucf101 has splits train and test, not {split!r}")
    if split_id not in (1, 2, 3):
        raise ValueError(f"--split-id {split_id}: UCF-101 has splits 1, 2, 3")
    ann = _annotation_dir(root, annotations)
    classes = read_class_index(str(ann / "classInd.txt"))
    lookup = _lookup(classes, str(ann / "classInd.txt"))
    list_file = ann / f"{split}list0{split_id}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: split list missing")
    walk_skipped: list[dict] = []
    on_disk = {p.relative_to(root).as_posix().lower(): p for p in walk_files(root, VIDEO_EXTENSIONS, walk_skipped)}
    refused = {s["source"].lower(): s for s in walk_skipped}
    items, skipped = [], []
    for line in list_file.read_text().splitlines():
        if not line.strip():
            continue
        rel = line.split()[0].replace("\\", "/")
        cls = rel.split("/")[0]
        if rel.lower() in refused:
            skipped.append(refused[rel.lower()])
        elif cls.lower() not in lookup:
            skipped.append({"source": rel, "reason": f"class {cls!r} not in classInd.txt"})
        elif rel.lower() not in on_disk:
            skipped.append({"source": rel, "reason": f"listed in {list_file.name}, not found under {root}"})
        else:
            items.append(Item(strip_suffix(rel), str(on_disk[rel.lower()]), lookup[cls.lower()], rel))
    items.sort(key=lambda it: it.source)
    return Source(items, classes, 3, [frames, resolution, resolution],
                  VideoDecoder(resolution, frames, frame_stride), skipped,
                  {"resolution": resolution, "frames": frames, "frame_stride": frame_stride,
                   "split_id": split_id})


# ---------------------------------------------------------------------------------------------

def digits(split="train", **_) -> Source:
    """scikit-learn's 8x8 digits (1797 images, 17 grey levels). Every 10th image is `val`, the rest `train`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if split not in ("train", "val"):
        raise ValueError(f"digits has splits train and val, not {split!r}")
    keep = [i for i in range(len(data.images)) if (i % 10 == 0) == (split == "val")]
    images = (data.images.astype(np.float32) / 16.0)[keep]
    items = [Item(f"digits_{i:05d}", j, int(data.target[i]), f"digits[{i}]") for j, i in enumerate(keep)]
    return Source(items, [str(c) for c in range(10)], 1, [8, 8], ArrayDecoder(images))


def _digits_split(split: str, source: str):
    """The 8x8 digits of one split in [0, 1] and their labels: every 10th image is `val`, the rest `train`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if split not in ("train", "val"):
        raise ValueError(f"{source} has splits train and val, not {split!r}")
    keep = np.array([i for i in range(len(data.images)) if (i % 10 == 0) == (split == "val")])
    return keep, (data.images.astype(np.float32) / 16.0)[keep], data.target[keep].astype(np.int64)


# the class of a mosaic from its digits (count, cells), read row by row. `sum`: the digits' sum mod 10, so a
# masked cell is fixed only by the class together with every other cell (attention across the canvas, then
# arithmetic on what it found: the composition depth is for). `first`: the top-left digit, a local control.
MOSAIC_RULES = {"sum": lambda d: d.sum(axis=1) % 10, "first": lambda d: d[:, 0]}
MOSAIC_COUNTS = {"train": 4000, "val": 500}


def parse_mosaic_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mosaic-grid {text!r}: expected ROWSxCOLS, e.g. 2x2") from None
    if rows < 1 or cols < 1 or rows * cols < 2:
        raise ValueError(f"--mosaic-grid {text!r}: needs at least two cells")
    return rows, cols


def mosaic_cells(split: str, count: int, cells: int, pool: int, seed: int) -> np.ndarray:
    """(count, cells) indices into the split's digit pool, drawn with replacement; one stream per split and
    seed, so a mosaic set is the same on every machine and rank and train and val draw independently."""
    from elt_scale.seeding import derive_seed
    return np.random.default_rng(derive_seed(seed, "digit-mosaic", split)).integers(0, pool, (count, cells))


def digit_mosaic(split="train", mosaic_grid="2x2", mosaic_rule="sum", mosaic_count=None, seed=0, **_) -> Source:
    """Mosaics of scikit-learn's digits. Train mosaics use train digits only and val mosaics val digits only
    (the digits source's split), so no source digit is seen in both; labels follow --mosaic-rule."""
    rows, cols = parse_mosaic_grid(mosaic_grid or "2x2")
    rule = mosaic_rule or "sum"
    if rule not in MOSAIC_RULES:
        raise ValueError(f"--mosaic-rule {rule!r}: one of {', '.join(sorted(MOSAIC_RULES))}")
    keep, images, targets = _digits_split(split, "digit-mosaic")
    count = MOSAIC_COUNTS[split] if mosaic_count is None else mosaic_count
    if count < 1:
        raise ValueError(f"--mosaic-count {count}: must be >= 1")
    idx = mosaic_cells(split, count, rows * cols, len(keep), seed)
    # (count, rows, cols, 8, 8) -> (count, rows, 8, cols, 8) -> one (8 rows) x (8 cols) canvas each
    canvas = images[idx].reshape(count, rows, cols, 8, 8).transpose(0, 1, 3, 2, 4).reshape(count, 8 * rows, 8 * cols)
    labels = MOSAIC_RULES[rule](targets[idx])
    items = [Item(f"mosaic_{j:06d}", j, int(labels[j]), "digits[" + ",".join(str(int(keep[i])) for i in idx[j]) + "]")
             for j in range(count)]
    return Source(items, [str(c) for c in range(10)], 1, [8 * rows, 8 * cols], ArrayDecoder(canvas), info={
        "mosaic_grid": f"{rows}x{cols}", "mosaic_rule": rule, "mosaic_count": count})


SOURCES = {"digits": digits, "digit-mosaic": digit_mosaic, "folder": folder, "imagenet": imagenet, "ucf101": ucf101}
