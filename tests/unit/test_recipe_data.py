"""The data contract of every recipe: the tokenize command its header names writes shards that the recipe's
start-up check accepts.

Every recipe header holds two machine-readable lines:

    # data: python data_prep/tokenize.py ARGS                      the command that writes data.shards
    # tokenizer: NAME, compression [Tx]SxS, vocab V | channels C   what the model --tokenizer-path names is

At full size the recipe's grid must be the command's clip (--frames, causal 1 + (F - 1)/T when the
tokenizer compresses time) and --resolution through that compression, its vocab_size / channels the
tokenizer's, data.shards the command's --out and data.split its --split. Then the real command runs, parsed
by tokenize.py's own argument parser, on a generated tree at a resolution shrunk by a factor k, with a tiny
random tokenizer of the same class and compression (tests/tiny_tokenizers.py), and the trainer's start-up
check (`check_manifest`: kind, shape, dtype, vocabulary, classes) judges its manifest against the recipe with
its spatial grid divided by the same k. A recipe whose grid disagrees with its command fails both ways."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_prep import tokenize
from elt_scale.config import load_recipe
from elt_scale.data import check_manifest
from tests.conftest import ROOT
from tests.tiny_tokenizers import (make_imagenet_tree, make_ucf_tree, write_diffusers_tokenizer, write_jit_tokenizer,
                                   write_maskgit_vq)

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DATA_LINE = re.compile(r"^# data: python data_prep/tokenize\.py (?P<args>.+)$", re.M)
TOKENIZER_LINE = re.compile(r"^# tokenizer: (?P<name>[\w-]+), compression (?P<compression>\d+(?:x\d+){1,2}), "
                            r"(?P<what>vocab|channels) (?P<n>\d+)\b", re.M)
DIGITS_SIDE = 8                      # the built-in digits source is 8×8 whatever --resolution says
TINY_SIDE = 2                        # tokens per side in the shrunk run


@dataclass
class Contract:
    argv: list[str]                  # tokenize.py's arguments, as the header gives them
    args: object                     # ... parsed by tokenize.py's own parser
    tokenizer: str
    temporal: int                    # 1: the tokenizer does not compress time (image tokenizers, per frame)
    spatial: int
    vocab: int | None
    channels: int | None


def read_contract(text: str, where: str) -> Contract:
    data, tok = DATA_LINE.findall(text), list(TOKENIZER_LINE.finditer(text))
    assert len(data) == 1 and len(tok) == 1, (
        f"{where}: the header needs exactly one '# data: python data_prep/tokenize.py ...' line and one "
        f"'# tokenizer: NAME, compression [Tx]SxS, vocab V|channels C' line (found {len(data)} and {len(tok)})")
    argv = shlex.split(data[0])
    try:
        args = tokenize.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: tokenize.py refuses the header's arguments: {data[0]}") from None
    t = tok[0]
    factors = [int(f) for f in t["compression"].split("x")]
    assert factors[-1] == factors[-2], f"{where}: compression {t['compression']}: spatial factors differ"
    n = int(t["n"])
    return Contract(argv, args, t["name"], factors[0] if len(factors) == 3 else 1, factors[-1],
                    n if t["what"] == "vocab" else None, n if t["what"] == "channels" else None)


def full_size_grid(c: Contract) -> tuple[list[int] | None, list[str]]:
    """The token/latent grid the command yields at full size, or the reasons it yields none."""
    a, problems = c.args, []
    side = DIGITS_SIDE if a.source == "digits" else a.resolution
    if side % c.spatial:
        problems.append(f"--resolution {side} is not divisible by the tokenizer's {c.spatial}x spatial compression")
    grid = [side // c.spatial] * 2
    if a.source == "ucf101":
        if (a.frames - 1) % c.temporal:
            problems.append(f"--frames {a.frames}: a causal {c.temporal}x time compression takes "
                            f"1 + {c.temporal}k frames")
        grid = [1 + (a.frames - 1) // c.temporal if c.temporal > 1 else a.frames] + grid
    return (None if problems else grid), problems


def full_size_problems(recipe, c: Contract) -> list[str]:
    m, a = recipe.model, c.args
    grid, problems = full_size_grid(c)
    if grid is not None and list(m.grid) != grid:
        problems.append(f"model.grid {list(m.grid)} != {grid}, what the tokenize command gives "
                        f"({a.source}, --resolution {a.resolution}, --frames {a.frames}, compression "
                        f"{c.temporal}x{c.spatial}x{c.spatial})")
    if c.tokenizer != a.tokenizer:
        problems.append(f"'# tokenizer: {c.tokenizer}' but the command says --tokenizer {a.tokenizer}")
    if m.family == "masked" and c.vocab != m.vocab_size:
        problems.append(f"model.vocab_size {m.vocab_size} != the tokenizer's vocab {c.vocab}")
    if m.family == "diffusion" and c.channels != m.channels:
        problems.append(f"model.channels {m.channels} != the tokenizer's channels {c.channels}")
    if a.tokenizer == "jit":          # flags the command passes must say what the tokenizer line says
        if a.vocab_size not in (None, c.vocab):
            problems.append(f"--vocab-size {a.vocab_size} != the tokenizer's vocab {c.vocab}")
        if a.compression not in (None, f"{c.temporal}x{c.spatial}x{c.spatial}"):
            problems.append(f"--compression {a.compression} != {c.temporal}x{c.spatial}x{c.spatial}")
    if a.out != recipe.data.shards:
        problems.append(f"the command writes --out {a.out}, the recipe reads data.shards={recipe.data.shards}")
    if a.split != recipe.data.split:
        problems.append(f"the command writes split {a.split}, the recipe reads data.split={recipe.data.split}")
    return problems


# ---------------------------------------------------------------------------------------------
# the shrunk run

class Workshop:
    """Trees, stand-in tokenizers and tokenize runs, each made once per session and shared by recipes."""

    def __init__(self, root: Path):
        self.root, self.made, self.runs = root, {}, {}

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def tree(self, c: Contract) -> dict[str, str]:
        """Replacements for the command's dataset flags."""
        a = c.args
        if a.source == "digits":
            return {}
        if a.source == "ucf101":
            frames = (a.frames - 1) * a.frame_stride + 3
            videos, ann = self.once(("ucf", frames), lambda: make_ucf_tree(self.root / f"ucf{frames}", frames=frames))
            return {"--input": str(videos), "--annotations": str(ann)}
        return {"--input": str(self.once("imagenet", lambda: make_imagenet_tree(self.root / "imagenet")))}

    def tokenizer(self, c: Contract) -> dict[str, str]:
        if c.tokenizer == "pixels":
            return {}
        key = (c.tokenizer, c.temporal, c.spatial, c.vocab, c.channels, c.args.tokenizer_subfolder)

        def make():
            top = self.root / "tok" / "-".join(map(str, key))
            where = top / c.args.tokenizer_subfolder if c.args.tokenizer_subfolder else top
            if c.tokenizer == "jit":   # one channel quantised to V levels: V codes
                write_jit_tokenizer(where, c.temporal, c.spatial, (c.vocab, 1, 1))
            elif c.tokenizer == "maskgit-vq":      # the state dict file, in the directory the command names
                write_maskgit_vq(where, c.spatial, c.vocab)
            else:
                write_diffusers_tokenizer(c.tokenizer, where, c.temporal, c.spatial, c.vocab, c.channels)
            return top
        return {"--tokenizer-path": str(self.once(key, make))}

    def tokenize(self, c: Contract, k: int) -> dict | str:
        """Run the header's command with the dataset, tokenizer, resolution and --out replaced: its manifest,
        or why it failed."""
        swap = {**self.tree(c), **self.tokenizer(c)}
        if c.args.source != "digits":
            swap["--resolution"] = str(c.args.resolution // k)
        argv = list(c.argv)
        for flag, value in swap.items():
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        key = tuple(argv)
        if key not in self.runs:
            out = self.root / "shards" / str(len(self.runs))
            argv[argv.index("--out") + 1] = str(out)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = tokenize.main([*argv, "--workers", "0", "--device", "cpu"])
            self.runs[key] = json.loads((out / "manifest.json").read_text()) if rc == 0 else \
                f"tokenize.py exits {rc} on the header's command (shrunk): {err.getvalue().strip()[-500:]}"
        return self.runs[key]


def shrink(c: Contract) -> int:
    """k: the command runs at --resolution / k, where its grid is TINY_SIDE tokens a side."""
    if c.args.source == "digits" or c.args.resolution % (TINY_SIDE * c.spatial):
        return 1
    return c.args.resolution // (TINY_SIDE * c.spatial)


def contract_problems(path: Path, workshop: Workshop) -> list[str]:
    text = path.read_text()
    recipe = load_recipe(path)
    c = read_contract(text, path.name)
    problems = full_size_problems(recipe, c)
    k = shrink(c)
    grid = list(recipe.model.grid)
    if any(g % k for g in grid[-2:]):
        return problems + [f"model.grid {grid} cannot be shrunk by {k} like --resolution {c.args.resolution}"]
    small = grid[:-2] + [g // k for g in grid[-2:]]
    manifest = workshop.tokenize(c, k)
    if isinstance(manifest, str):
        return problems + [manifest]
    try:
        check_manifest(manifest, load_recipe(path, [f"model.grid={small}"]), f"{path.name} at 1/{k} size")
    except ValueError as e:
        problems.append(str(e))
    if recipe.model.family == "masked" and manifest["sample"]["vocab_size"] != recipe.model.vocab_size:
        problems.append(f"shards' vocab_size {manifest['sample']['vocab_size']} != model.vocab_size "
                        f"{recipe.model.vocab_size} (a larger model vocabulary is wasted parameters)")
    return problems


@pytest.fixture(scope="module")
def workshop(tmp_path_factory):
    return Workshop(tmp_path_factory.mktemp("contract"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_the_header_command_feeds_the_recipe(path, workshop):
    problems = contract_problems(path, workshop)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------
# the contract catches what it is for

def edited(name: str, tmp_path: Path, *swaps: tuple[str, str]) -> Path:
    text = (ROOT / "recipes" / name).read_text()
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_pre_issue_ucf101_recipe_fails(tmp_path, workshop):
    """Issue 27: grid 4×16×16 of 1024 codes, but the command the README gave (16 frames at 128², a per-frame
    8× VQ) writes 16×16×16 codes, elsewhere."""
    data = DATA_LINE.search((ROOT / "recipes" / "ucf101_masked_elt_6x4.yaml").read_text())[0]
    path = edited("ucf101_masked_elt_6x4.yaml", tmp_path,
                  (data, "# data: python data_prep/tokenize.py --source ucf101 --input /data/UCF-101 --annotations "
                         "/data/ucfTrainTestlist --split train --split-id 1 --frames 16 --resolution 128 --tokenizer "
                         "vq --tokenizer-path /models/vq --out /data/shards/ucf-vq"),
                  ("# tokenizer: jit, compression 4x8x8, vocab 64000", "# tokenizer: vq, compression 8x8, vocab 1024"),
                  ("grid: [5, 16, 16]", "grid: [4, 16, 16]"), ("vocab_size: 64000", "vocab_size: 1024"),
                  ("shards: /data/shards/ucf101-dv4x8x8", "shards: /data/shards/ucf101-vq"))
    problems = contract_problems(path, workshop)
    assert any("model.grid [4, 16, 16] != [16, 16, 16]" in p for p in problems), problems
    assert any("--out /data/shards/ucf-vq" in p for p in problems), problems
    assert any("shape [16, 2, 2] != recipe's [4, 2, 2]" in p for p in problems), problems   # the shrunk run too


def test_a_clip_length_the_tokenizer_cannot_take_fails(tmp_path, workshop):
    path = edited("ucf101_masked_elt_6x4.yaml", tmp_path, ("--frames 17", "--frames 16"))
    problems = contract_problems(path, workshop)
    assert any("--frames 16: a causal 4x time compression takes 1 + 4k frames" in p for p in problems), problems
    assert any("tokenize.py exits 2" in p and "takes clips of 1 + 4k frames" in p for p in problems), problems


def test_shards_of_the_wrong_kind_fail_the_startup_check(tmp_path, workshop):
    """Arithmetic alone cannot see this one: without --pixel-mode identity the digits are written as codes."""
    path = edited("digits_diffusion.yaml", tmp_path, (" --pixel-mode identity", ""))
    problems = contract_problems(path, workshop)
    assert any("shards hold codes but model.family=diffusion needs latents" in p for p in problems), problems


def test_startup_check_refuses_codes_in_a_float_or_too_narrow_dtype():
    recipe = load_recipe(ROOT / "recipes" / "digits_masked.yaml")
    manifest = {"sample": {"kind": "codes", "shape": [8, 8], "dtype": "float16", "vocab_size": 17}, "num_classes": 10}
    with pytest.raises(ValueError, match="dtype float16 is not an integer type"):
        check_manifest(manifest, recipe, "x")
    manifest["sample"].update(dtype="int8", vocab_size=300)
    with pytest.raises(ValueError, match=r"dtype int8 cannot hold their codes 0\.\.299"):
        check_manifest(manifest, load_recipe(ROOT / "recipes" / "digits_masked.yaml", ["model.vocab_size=300"]), "x")


DATA_PAGE = ROOT / "docs" / "data.md"          # the README's 'Data' section moved there (issue 32)


def data_page_commands() -> set[tuple[str, ...]]:
    """Every `python data_prep/tokenize.py ...` command in docs/data.md, its continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DATA_PAGE.read_text())
    found = re.findall(r"^\s*python data_prep/tokenize\.py (.+)$", text, re.M)
    return {tuple(shlex.split(m, comments=True)) for m in found}


@pytest.mark.parametrize("path", [p for p in RECIPES if not p.name.startswith("digits_")], ids=lambda p: p.stem)
def test_data_page_gives_the_recipe_command(path):
    argv = read_contract(path.read_text(), path.name).argv
    assert tuple(argv) in data_page_commands(), f"docs/data.md lacks {path.name}'s command: {shlex.join(argv)}"
