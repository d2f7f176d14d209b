"""Every command README.md and docs/*.md show runs as written (issue 38), on this CPU.

The catalogue, the substitutions (paths and sizes only, each with its reason) and the launch arithmetic are in
tests/docs_commands.py; tests/unit/test_docs_commands.py checks, without running anything, that every command
is catalogued. Here each RUN command runs once (a command two pages show alike runs once), through bash, in a
workspace laid out like the checkout (slurm/, bench/, studies/ linked, data_prep/ copied; recipes/ copied with
/data/ pointing into the workspace) with:

  PATH     the venv's python and its console scripts (elt-train, ... as `python -m` of the checkout's package),
           `deepspeed` (the launcher, on a free port), torchrun (the venv's; PET_MASTER_PORT a free port) and
           `sbatch` (tests/loopback_sbatch.py: the job's dry run, then rank 0 at world 1);
  sizes    2 training steps, shrunk paper models, 4 samples and 4 sampling steps (tests/docs_commands.py: SIZES,
           SHRINK, SAMPLING_STEPS);
  stand-ins tiny random tokenizers of each class and compression, a tiny Inception and I3D, generated
           ImageNet- and UCF-101-shaped trees, ADM-layout references (tests/docs_commands.py: STANDINS).

Order: the data first (array jobs, then the other tokenize lines, then merge and reshuffle, each in page
order: the docs assume the data exists when they train), then every other command in page order. A tokenize
line that writes a split an earlier line of another tokenizer or rank layout wrote (a documented alternative)
writes beside it. Each command is a test of its own, run in that order (a command may read what an earlier one
wrote: run the module, not one test of it); a failure shows the command as run and the tail of its output."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.docs_commands import RUN, STANDINS, all_commands, launch_of, needs_missing_tokenizer, substitute

VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 600


def runnable() -> list[tuple[str, str]]:
    """(page, command) of every RUN command on every page that shows it, in the order they run."""
    seen, found = set(), []
    for page, command in all_commands():
        if command in RUN and (page, command) not in seen:
            seen.add((page, command))
            found.append((page, command))

    def stage(item):
        c = item[1]
        if c.startswith("sbatch") and "slurm/tokenize.sh" in c:
            return 0
        if c.startswith("python data_prep/tokenize.py") and "--merge" not in c:
            return 1
        if "--merge" in c or "data_prep/reshuffle.py" in c:
            return 2
        return 3
    return sorted(found, key=stage)               # stable: page order within a stage


# ---------------------------------------------------------------------------------------------
# the workspace

def console_scripts() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)[1]
    return {name: target.split(":")[0] for name, target in re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', section, re.M)}


def write_shims(bin_dir: Path) -> None:
    bin_dir.mkdir()
    shims = {"python": f'exec {sys.executable} "$@"', "python3": f'exec {sys.executable} "$@"',
             "sbatch": f'exec {sys.executable} {ROOT / "tests" / "loopback_sbatch.py"} "$@"',
             "deepspeed": f'exec {sys.executable} -m deepspeed.launcher.runner --master_port '
                          f'"$({sys.executable} -c "from elt_scale.dist import free_port; print(free_port())")" "$@"'}
    shims.update({name: f'exec {sys.executable} -m {module} "$@"' for name, module in console_scripts().items()})
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def write_standins(w: Path) -> None:
    from tests.datasets import save_image
    from tests.tiny_models import TinyI3D, TinyInception, scripted
    from tests.tiny_tokenizers import make_ucf_tree, write_diffusers_tokenizer, write_jit_tokenizer

    for c, syn in enumerate(["n01440764", "n01443537"]):        # a global batch of 512 fits (elt-plan checks it)
        for i in range(256):
            save_image(w / "data" / "imagenet" / "train" / syn / f"{syn}_{i}.JPEG", size=(40, 32), seed=1000 * c + i)
    labels = []
    for i, syn in enumerate(["n01440764", "n01443537"] * 4):
        name = f"ILSVRC2012_val_{i:08d}"
        save_image(w / "data" / "imagenet" / "val" / f"{name}.JPEG", seed=100 + i)
        labels.append(f"{name},{syn} 1 2 3 4")
    (w / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(labels) + "\n")
    make_ucf_tree(w / "data", frames=20)

    write_diffusers_tokenizer("sd-vae", w / "hub" / "sd-vae-ft-ema", 1, 8, None, 4)
    write_diffusers_tokenizer("vq", w / "models" / "vqgan-f16-1024", 1, 16, 1024, None)
    write_diffusers_tokenizer("video-vae", w / "hub" / "Wan2.1-T2V-1.3B-Diffusers" / "vae", 4, 8, None, 16)
    write_jit_tokenizer(w / "models" / "Cosmos-0.1-Tokenizer-DV4x8x8", 4, 8, (64000, 1, 1))
    from elt_scale.tokenizers import REGISTRY
    if "maskgit-vq" in REGISTRY:
        import tests.tiny_tokenizers as tiny
        assert hasattr(tiny, "write_maskgit_vq"), (
            "maskgit-vq is in the registry: tests/tiny_tokenizers.py needs write_maskgit_vq(path), a tiny random "
            "MaskGIT VQGAN saved as maskgit-vqgan-imagenet-f16-256.bin is, for the docs' masked tokenize line")
        tiny.write_maskgit_vq(w / "maskgit-vqgan-imagenet-f16-256.bin")

    for name in ("W", "W.pt", "inception-2015-12-05.pt"):
        scripted(TinyInception(), w / name)
    scripted(TinyI3D(), w / "i3d_torchscript.pt")
    rng = np.random.default_rng(0)
    for name in ("REF.npz", "VIRTUAL_imagenet256_labeled.npz", "data/ref/imagenet256.npz"):
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez(w / name, arr_0=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    (w / "ucf_samples").mkdir()
    np.savez(w / "ucf_samples" / "samples_L4.npz", arr_0=rng.integers(0, 256, (4, 17, 16, 16, 3), dtype=np.uint8),
             arr_1=np.arange(4) % 3)
    missing = [name for name in STANDINS if not (w / name).exists() and name != "maskgit-vqgan-imagenet-f16-256.bin"]
    assert not missing, missing


@dataclass
class Workspace:
    root: Path
    env: dict


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    from torch.utils.cpp_extension import get_default_build_root

    from elt_scale.dist import free_port
    w = tmp_path_factory.mktemp("docs")
    for name in ("slurm", "bench", "studies"):
        (w / name).symlink_to(ROOT / name)
    # a copy: run as a script from a symlinked folder, tokenize.py would not find its folder on sys.path (it
    # compares abspath with Python's resolved path) and would shadow the stdlib module of its name
    shutil.copytree(ROOT / "data_prep", w / "data_prep", ignore=shutil.ignore_patterns("__pycache__"))
    (w / "recipes").mkdir()
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        (w / "recipes" / recipe.name).write_text(re.sub(r"(?<![\w./-])/data/", f"{w}/data/", recipe.read_text()))
    write_shims(w / "bin")
    write_standins(w)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "ELT_ENV_FILE", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(w / "bin"), str(VENV_BIN), env.get("PATH", "")]), PYTHONPATH=str(ROOT),
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PET_MASTER_PORT=str(free_port()),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", get_default_build_root()),
               XDG_CACHE_HOME=str(w / "cache"), ELT_LOG_DIR=str(w / "logs"),
               ELT_LOOPBACK_SBATCH_QUEUE=str(w / "sbatch-queue.json"))
    return Workspace(w, env)


# ---------------------------------------------------------------------------------------------
# running

@dataclass
class Result:
    ran: str                       # the command as run
    rc: int
    output: str
    seconds: float
    note: str = ""


def tokenize_target(command: str) -> tuple[str, str, tuple] | None:
    """(out, split, (tokenizer, world)) of a command that writes shards, else None."""
    if not ("data_prep/tokenize.py" in command or "slurm/tokenize.sh" in command) or "--merge" in command:
        return None
    t = shlex.split(command)
    get = lambda flag, default: t[t.index(flag) + 1] if flag in t else default  # noqa: E731
    array = next((a.split("=")[1] for a in t if a.startswith("--array=")), None)
    if array:
        lo, hi = map(int, array.split("%")[0].split("-"))
        world = hi - lo + 1
    else:
        world = int(get("--world-size", 1))
    return get("--out", ""), get("--split", "train"), (get("--tokenizer", "pixels"), world)


class Runner:
    """Runs the docs' commands one by one in the workspace, remembering what each wrote and ran."""

    def __init__(self, workspace: Workspace):
        self.w, self.written, self.done, self.log = workspace, {}, {}, []

    def run(self, page: str, command: str) -> Result:
        why = needs_missing_tokenizer(command)
        if why:
            return Result("", 0, "", 0.0, why)
        line, note = substitute(page, command, str(self.w.root)), ""
        target = tokenize_target(line)
        if target:
            out, split, signature = target
            first = self.written.setdefault((out, split), signature)
            if first != signature:             # an alternative to an earlier line: write beside it
                alt = f"{out}+{signature[0]}-w{signature[1]}"
                line = line.replace(f"--out {out}", f"--out {alt}")
                note = f"an alternative to an earlier line writing {out} ({split}): written to {alt}"
        if line not in self.done:
            t0 = time.monotonic()
            try:
                r = subprocess.run(["bash", "-c", line], cwd=self.w.root, env=self.w.env, capture_output=True,
                                   text=True, timeout=TIMEOUT_S)
                rc, output = r.returncode, r.stdout + r.stderr
            except subprocess.TimeoutExpired as e:
                rc, output = 124, f"timed out after {TIMEOUT_S} s\n{e.stdout or ''}{e.stderr or ''}"
            self.done[line] = Result(line, rc, output, time.monotonic() - t0, note)
        self.log.append((page, command, self.done[line]))
        return self.done[line]


@pytest.fixture(scope="module")
def runner(workspace):
    r = Runner(workspace)
    yield r
    for page, command, result in r.log:               # what each cost, for the next person sizing this
        print(f"{result.seconds:6.1f} s  rc {result.rc}  {page}: {command}")


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@pytest.mark.parametrize("page, command", runnable(), ids=[f"{p}:{c[:60]}" for p, c in runnable()])
def test_command_runs_as_written(runner, page, command):
    """In the order of runnable(): a command may read what an earlier one wrote (run the module, not one test)."""
    r = runner.run(page, command)
    if r.note and not r.ran:
        pytest.skip(r.note)
    assert r.rc == 0, f"{page}: `{command}`\nran: {r.ran}\nexit {r.rc}; output ends:\n{tail(r.output)}"
    launch = launch_of(command if "RECIPE.yaml" not in command else command.replace("RECIPE.yaml", "recipes/x.yaml"))
    if launch and "slurm/train_large.sh" in command:     # the job's ranks, as the script itself prints them
        ranks = [line for line in r.output.splitlines() if line.startswith("dry-run ")]
        assert len(ranks) == launch.world, f"{command}: {len(ranks)} rank lines, {launch.how} = {launch.world}"
        assert all(f"WORLD_SIZE={launch.world} " in line for line in ranks), ranks[:2]
    if command.startswith("elt-sample runs/imagenet256_diffusion") or "runs/NAME" in command and page == "README.md" \
            and command.startswith("elt-sample"):
        assert "(EMA weights)" in r.output, tail(r.output)   # the diffusion recipes keep an EMA: sampled from it
