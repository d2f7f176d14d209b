"""Every command README.md and docs/*.md show, as a user would type it (issue 38): found, catalogued, checked.

A command is a line of a fenced shell block (```bash, sh, shell, console; continuation lines joined, a trailing
`  # comment` dropped). Each one is in exactly one of two tables:

  RUN      tests/e2e/test_docs_commands.py runs it, with the same program and flags, in a workspace laid out
           like the checkout, after the substitutions below (paths and sizes only) and with stand-ins for what
           needs a GPU, a Slurm cluster, a Hub download or the real ImageNet;
  NOT_RUN  the reason it is not run.

A command in neither (a new line in the docs) fails tests/unit/test_docs_commands.py, and so does an entry
that no page shows any more. That test also checks, without running anything, the arithmetic of every launch
line (its GPUs must divide the recipe's train.global_batch), that every tokenize line writing a shard
directory agrees on its settings with the others writing it, that a walk-through page tokenizes the shards of
every recipe it launches, and that each RUN command is left with no path the substitutions do not cover.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def page_commands(text: str) -> list[str]:
    """The commands of a page's shell blocks, in order: continuations joined, comments dropped, spaces squeezed."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in SHELL:
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.split(r"(?:^|\s)#\s", line, maxsplit=1)[0]
            line = " ".join(line.split())
            if line:
                out.append(line)
    return out


def all_commands() -> list[tuple[str, str]]:
    """(page, command) for every page, README.md first."""
    return [(rel(p), c) for p in PAGES for c in page_commands(p.read_text())]


# ---------------------------------------------------------------------------------------------
# the catalogue

TOKENIZER_BRANCH = "needs the maskgit-vq tokenizer (lands from branch maskgit-vq); runs here once it is in the registry"
SUITE = "runs the test suite (or a file of it) this test belongs to; CI runs it"
DOWNLOAD = "downloads from the network (tests have none); the tests use tiny random stand-ins at the same paths"
BENCH = ("a benchmark: a measurement with a fixed protocol, not a test (DESIGN.md); tests/unit/test_bench.py runs "
         "train_throughput.py and sample_throughput.py with --tiny")

NOT_RUN: dict[str, str] = {
    "make demo": "the 4-minute demo; tests/e2e/test_demo.py runs it shortened (studies.demo --quick)",
    "make test": SUITE,
    "make test-fast": SUITE,
    "make test-multiproc | test-e2e | test-cluster": SUITE + " (three targets, one per tier)",
    "bash .ci/run": SUITE + " from a fresh clone, installing Slurm as root",
    "python -m pytest -q tests/unit/test_ilsd.py": SUITE,
    "python -m pytest -q tests/unit/test_layers.py": SUITE,
    "make reproduce": "17 minutes; tests/e2e/test_reproduce.py runs the study shortened",
    "python -m studies.demo --results docs && python -m studies.readme":
        "rewrites the committed results in docs/ and takes 4 minutes; tests/e2e/test_demo.py runs the study shortened",
    "python -m studies.reproduce --results docs && python -m studies.readme":
        "rewrites the committed results in docs/ and takes 17 minutes; tests/e2e/test_reproduce.py runs it shortened",
    "source .venv/bin/activate": "changes the shell the next lines run in; the test runs them with the venv's python "
                                 "and console scripts first on PATH, which is what it does",
    "scancel --signal=USR1 JOBID": "needs a running Slurm job; tests/cluster/test_slurm.py sends it on the loopback "
                                   "two-node cluster (checkpoint, exit 75, requeue, resume)",
    "make TORCH=torch setup": "installs a CUDA torch and the extras from the package index: " + DOWNLOAD,
    'pip install -e ".[tokenizers,eval,wandb]"': "installs from the package index: " + DOWNLOAD,
    "huggingface-cli download stabilityai/sd-vae-ft-ema": DOWNLOAD,
    "huggingface-cli download fun-research/TiTok maskgit-vqgan-imagenet-f16-256.bin --local-dir .": DOWNLOAD,
    "python bench/train_throughput.py --preset elt-l-masked --compare vanilla,ilsd,baseline --out train.json": BENCH,
    "python bench/sample_throughput.py --out sample.json": BENCH,
    "OUT=/path/to/results bash bench/gpu.sh": BENCH + "; the GPU suite (its --cpu form takes minutes)",
    "python bench/summarize.py OUT_DIR > summary.md": BENCH + "; reads a GPU suite's output directory",
    "python bench/gpu_check.py --out OUT": BENCH + "; a GPU correctness run (bench/RESULTS.md)",
    "python bench/host_syncs.py": BENCH,
    "python bench/live_eval_overhead.py": BENCH + "; 300 training steps",
    "python bench/dataloader.py": BENCH + "; minutes of streaming",
    "python bench/batch_mix.py": BENCH + "; rewrites docs/batch_mix.{md,csv}",
    "python data_prep/convert_maskgit_flax.py tokenizer_imagenet256_checkpoint --out "
    "/models/maskgit-vqgan-imagenet-f16-256.safetensors":
        "needs Google's Flax checkpoint (a download); tests/unit/test_maskgit_flax.py converts a tiny checkpoint in "
        "its format through the same main() and checks the codes and pixels against Google's network",
}

RUN: set[str] = {
    # README.md
    "elt-train recipes/digits_masked.yaml train.steps=300",
    "elt-sample runs/digits_masked --loops 1,2,4 --num 64 --out samples/",
    "python data_prep/tokenize.py --source digits --out shards/digits",
    "python data_prep/tokenize.py --source digits --pixel-mode identity --out shards/digits-pixels",
    "python data_prep/tokenize.py --source imagenet --input /data/imagenet/train --resolution 256 --tokenizer sd-vae "
    "--tokenizer-path stabilityai/sd-vae-ft-ema --samples-per-shard 1000 --out /data/shards/in256-sdvae",
    "python data_prep/tokenize.py --source imagenet --input /data/imagenet/train --resolution 256 --tokenizer maskgit-vq "
    "--tokenizer-path maskgit-vqgan-imagenet-f16-256.bin --samples-per-shard 1000 --out /data/shards/in256-vq",
    "elt-train recipes/digits_masked.yaml train.steps=200",
    "deepspeed --num_gpus 8 --module elt_scale.train recipes/imagenet256_diffusion_elt_8x4.yaml train.steps=400000",
    "sbatch --nodes 16 slurm/train_large.sh recipes/imagenet256_masked_elt_xl_7x4.yaml",
    "elt-sample runs/NAME --loops 1,2,4 --num 64 --cfg 2.0 --out samples/",
    "elt-eval anytime runs/NAME --loops 1-6 --num 10000 --reference /data/ref/imagenet256.npz --inception-weights W.pt",
    "elt-export runs/NAME --ema --out model.safetensors",
    "elt-plan recipes/imagenet256_masked_elt_xl_7x4.yaml --gpus 32 --gpu-mem 80 --mfu 0.4",
    "sbatch slurm/train_large.sh recipes/imagenet256_masked_elt_xl_7x4.yaml",
    "sbatch --nodes 16 slurm/train_large.sh recipes/imagenet256_masked_elt_xl_7x4.yaml train.steps=400000",
    "ELT_DRY_RUN=1 bash slurm/train_large.sh RECIPE.yaml ...",
    "sbatch --array=0-15 slurm/tokenize.sh --source imagenet --input /data/imagenet/train --resolution 256 "
    "--tokenizer sd-vae --tokenizer-path stabilityai/sd-vae-ft-ema --samples-per-shard 1000 --out /data/shards/in256-sdvae",
    # docs/cluster.md
    "torchrun --standalone --nproc-per-node 8 --max-restarts 3 -m elt_scale.train RECIPE.yaml ...",
    # docs/data.md
    "python data_prep/tokenize.py --source imagenet --input /data/imagenet/train --resolution 256 --tokenizer vq "
    "--tokenizer-path /models/vqgan-f16-1024 --samples-per-shard 1000 --out /data/shards/in256-vqmodel",
    "python data_prep/tokenize.py --source digit-mosaic --mosaic-grid 2x2 --mosaic-rule sum --split train --out "
    "shards/mosaic",
    "python data_prep/tokenize.py --source imagenet --input /data/imagenet/val --labels LOC_val_solution.csv --split val "
    "--resolution 256 --tokenizer sd-vae --tokenizer-path stabilityai/sd-vae-ft-ema --samples-per-shard 1000 "
    "--out /data/shards/in256-sdvae",
    "python data_prep/tokenize.py --source ucf101 --input /data/UCF-101 --annotations /data/ucfTrainTestlist --split "
    "train --split-id 1 --frames 17 --resolution 128 --tokenizer jit --tokenizer-path "
    "/models/Cosmos-0.1-Tokenizer-DV4x8x8 --vocab-size 64000 --compression 4x8x8 --out /data/shards/ucf101-dv4x8x8",
    "python data_prep/tokenize.py --source ucf101 --input /data/UCF-101 --annotations /data/ucfTrainTestlist --split "
    "train --split-id 1 --frames 17 --resolution 128 --tokenizer video-vae --tokenizer-path "
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers --tokenizer-subfolder vae --out /data/shards/ucf101-vae3d",
    "python data_prep/tokenize.py --merge --out DIR",
    "python data_prep/reshuffle.py --input OLD --out NEW --seed 0",
    "elt-plan RECIPE.yaml --manifest DIR",
    # docs/evaluation.md
    "elt-sample runs/NAME --loops 1,2,4 --num 64 --cfg 2.0 --seed 0 --out samples/",
    "torchrun --nproc_per_node 8 -m elt_scale.sample runs/NAME --loops 1-4 -n 50000 --out samples/",
    "elt-eval digits samples/samples_L4.npz",
    "elt-eval fid samples/samples_L4.npz --reference REF.npz --inception-weights inception-2015-12-05.pt",
    "elt-train recipes/digits_masked.yaml ilsd.enabled=false run.name=digits_vanilla",
    "elt-eval anytime runs/NAME --loops 1-6,auto:0.3 --num 1000 --compare runs/digits_vanilla --out anytime/",
    "elt-eval reference SHARDS_DIR --inception-weights W --out REF.npz",
    "elt-eval fvd ucf_samples/samples_L4.npz --reference /data/shards/ucf101-dv4x8x8 --i3d-weights i3d_torchscript.pt",
    "elt-train recipes/digits_masked.yaml eval.every=100",
    # docs/gpu_quickstart.md
    "elt-plan recipes/imagenet256_diffusion_elt_8x4.yaml --gpus 64",
    "sbatch --nodes 8 slurm/train_large.sh recipes/imagenet256_diffusion_elt_8x4.yaml",
    "elt-sample runs/imagenet256_diffusion_elt_8x4 --loops 1,2,4 --num 64 --cfg 3.0 --out samples/",
    "torchrun --nproc_per_node 8 -m elt_scale.sample runs/imagenet256_diffusion_elt_8x4 --loops 4 -n 50000 --cfg 3.0 "
    "--out samples50k/",
    "torchrun --nproc_per_node 8 -m elt_scale.evaluate fid samples50k/samples_L4.npz --reference "
    "VIRTUAL_imagenet256_labeled.npz --inception-weights inception-2015-12-05.pt",
    # docs/layout.md
    "elt-train --help",
    # docs/results.md
    "python -m studies.readme --check",
    # docs/training.md
    "elt-plan recipes/imagenet256_masked_elt_xl_7x4.yaml --schedules --schedules-png schedules.png",
    "elt-plan recipes/imagenet256_masked_elt_xl_7x4.yaml --gpus 32 --from-run runs/NAME",
}


def needs_missing_tokenizer(command: str) -> str | None:
    """Why a RUN command cannot run on this checkout yet (a tokenizer it names is not in the registry), or None."""
    from elt_scale.tokenizers import REGISTRY
    m = re.search(r"--tokenizer ([\w-]+)", command)
    if m and m[1] not in REGISTRY:
        return TOKENIZER_BRANCH if m[1] == "maskgit-vq" else f"tokenizer {m[1]!r} is not in the registry"
    return None


# ---------------------------------------------------------------------------------------------
# substitutions: paths and sizes only, each with its reason

@dataclass(frozen=True)
class Sub:
    pattern: str                     # a regular expression over the command
    replacement: str                 # {W}: the workspace
    why: str


SIZES = [
    Sub(r"--resolution 256\b", "--resolution 32", "ImageNet at 32 px: 4×4 SD-VAE latents, 2×2 VQ codes"),
    Sub(r"--resolution 128\b", "--resolution 16", "UCF-101 at 16 px: 2×2 latents or codes per frame group"),
    Sub(r"--samples-per-shard 1000\b", "--samples-per-shard 64", "8 shards from 512 images"),
    Sub(r"\btrain\.steps=\d+", "train.steps=2", "2 steps"),
    Sub(r"(--num|-n) \d+\b", r"\1 4", "4 samples per loop spec"),
    Sub(r"--num_gpus 8\b", "--num_gpus 1", "one CPU rank for 8 GPUs (their arithmetic: tests/unit/test_docs_commands.py)"),
    Sub(r"--nproc([-_])per([-_])node 8\b", r"--nproc\1per\2node 1", "one CPU rank for 8 GPUs (as above)"),
    Sub(r"--array=0-15\b", "--array=0-1", "two array tasks"),
    Sub(r"\beval\.every=100\b", "eval.every=1 eval.num=2 run.name=digits_masked_eval",
        "an evaluation at both steps, 2 samples per L, in a run of its own (runs/digits_masked is trained already)"),
]

PATHS = [
    Sub(r"(?<![\w./-])/data/", "{W}/data/", "generated stand-ins: an ImageNet-shaped train tree (2 synsets × 256 JPEGs), "
        "a flat val folder, a UCF-101-shaped tree, an ADM-layout reference; shards written by the commands"),
    Sub(r"(?<![\w./-])/models/", "{W}/models/", "tiny random tokenizers of the same class and compression"),
    Sub(r"\bstabilityai/sd-vae-ft-ema\b", "{W}/hub/sd-vae-ft-ema", "a Hub id: a tiny random AutoencoderKL (8×, 4 channels)"),
    Sub(r"\bWan-AI/Wan2\.1-T2V-1\.3B-Diffusers\b", "{W}/hub/Wan2.1-T2V-1.3B-Diffusers",
        "a Hub id: a tiny random AutoencoderKLWan (4×8×8, 16 channels) in vae/"),
]

# Placeholders the docs leave to the reader (runs/NAME, RECIPE.yaml, DIR, ...): what each page's stands for here.
# A trailing ' ...' (more overrides of your choice) stands for none.
PLACEHOLDERS: dict[str, dict[str, str]] = {
    "README.md": {"runs/NAME": "runs/imagenet256_diffusion_elt_8x4", "RECIPE.yaml": "recipes/imagenet256_masked_elt_xl_7x4.yaml"},
    "docs/cluster.md": {"RECIPE.yaml": "recipes/digits_masked.yaml"},
    "docs/data.md": {"DIR": "/data/shards/in256-sdvae", "OLD": "/data/shards/in256-sdvae",
                     "NEW": "/data/shards/in256-sdvae-shuffled", "RECIPE.yaml": "recipes/imagenet256_diffusion_elt_8x4.yaml"},
    "docs/evaluation.md": {"runs/NAME": "runs/digits_masked", "SHARDS_DIR": "/data/shards/in256-sdvae"},
    "docs/training.md": {"runs/NAME": "runs/imagenet256_diffusion_elt_8x4"},
}

# Files the commands name in the working directory, made before anything runs (the reference and sample sets
# that are not written by an earlier command of the docs).
STANDINS = {
    "W": "a tiny TorchScript Inception (the call signature of NVIDIA's inception-2015-12-05.pt)",
    "W.pt": "the same",
    "inception-2015-12-05.pt": "the same",
    "i3d_torchscript.pt": "a tiny TorchScript I3D (StyleGAN-V's call signature)",
    "REF.npz": "an ADM-layout reference (arr_0: 16 random 32×32 images; later rewritten by `elt-eval reference`)",
    "VIRTUAL_imagenet256_labeled.npz": "the same",
    "data/ref/imagenet256.npz": "the same",
    "LOC_val_solution.csv": "the labels of the generated flat val folder",
    "ucf_samples/samples_L4.npz": "elt-sample's video layout (N×T×H×W×3, 17 frames): no UCF-101 model is trained here",
    "maskgit-vqgan-imagenet-f16-256.bin": "a tiny random MaskGIT VQGAN (tests/tiny_tokenizers.py), once maskgit-vq exists",
}

# Appended to every command that starts the trainer on a paper recipe (sizes only; the recipe's micro-batch
# is kept, so with one rank the trainer must derive the gradient accumulation from train.global_batch).
SHRINK = {
    "diffusion": ["model.width=32", "model.heads=2", "model.unique_layers=2", "model.grid=[4,4]",
                  "train.global_batch=32", "data.num_workers=0"],
    "masked": ["model.width=32", "model.heads=2", "model.unique_layers=2", "model.grid=[2,2]",
               "train.global_batch=32", "data.num_workers=0"],
}
# Appended to every command that samples (elt-sample, elt_scale.sample under torchrun, elt-eval anytime) and gives
# no --steps: the samplers' default is 512 DDPM steps (24 MaskGIT), which a tiny diffusion model on this CPU takes
# minutes over (measured here: 130-190 s per command for 3-6 loop specs of 4 samples).
SAMPLING_STEPS = "--steps 4"
SAMPLES = re.compile(r"^(elt-sample |elt-eval anytime |torchrun .*-m elt_scale\.sample )")

SHRINK_WHY = ("the paper recipes at width 32, 2 unique layers (their loops kept), the grid of 32-px images, a "
              "global batch of 32 (the recipe's micro-batch kept: one rank must accumulate), no loader workers")


def substitute(page: str, command: str, workspace: str) -> str:
    """The command as the e2e test runs it."""
    for placeholder, value in PLACEHOLDERS.get(page, {}).items():
        command = re.sub(rf"(?<![\w/.-]){re.escape(placeholder)}(?![\w.-])", value, command)
    command = re.sub(r" \.\.\.$", "", command)
    for sub in SIZES + PATHS:
        command = re.sub(sub.pattern, sub.replacement.replace("{W}", workspace), command)
    if SAMPLES.match(command) and "--steps" not in command:
        command = f"{command} {SAMPLING_STEPS}"
    recipe = trained_recipe(command)
    if recipe is not None:
        from elt_scale.config import load_recipe
        r = load_recipe(ROOT / recipe)
        extra = [] if recipe.startswith("recipes/digits_") else list(SHRINK[r.model.family])
        if "train.steps=" not in command:
            extra.append("train.steps=2")
        command = " ".join([command, *extra])
    return command


def trained_recipe(command: str) -> str | None:
    """The recipe a command starts the trainer on (elt-train, python -m elt_scale.train, deepspeed, torchrun, sbatch
    slurm/train_large.sh), else None."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    trains = (tokens[:1] == ["elt-train"] or "elt_scale.train" in tokens
              or any(t.endswith("slurm/train_large.sh") for t in tokens))
    if not trains or "--help" in tokens:
        return None
    return next((t for t in tokens if t.startswith("recipes/") and t.endswith(".yaml")), None)


LEFT = re.compile(r"(?<![\w{}/.-])(/data/|/models/|[\w-]+/[\w.-]+-Diffusers\b|stabilityai/|\bNAME\b|\bRECIPE\b|"
                  r"\bDIR\b|\bOLD\b|\bNEW\b|\bSHARDS_DIR\b|…)")


def unsubstituted(page: str, command: str) -> list[str]:
    """What a RUN command still names that the workspace cannot have: an absolute data/model path, a Hub id, a
    placeholder."""
    return LEFT.findall(substitute(page, command, "{W}"))


# ---------------------------------------------------------------------------------------------
# launch arithmetic

def sbatch_default(script: Path, option: str) -> int:
    return int(re.search(rf"^#SBATCH --{option}=(\d+)$", script.read_text(), re.M)[1])


@dataclass
class Launch:
    world: int                     # processes (GPUs) the line starts
    recipe: str | None             # None: a placeholder recipe (RECIPE.yaml): any paper recipe
    how: str


def launch_of(command: str) -> Launch | None:
    """The world size and recipe of a training launch line, or None for any other command."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        env[k] = v
    if not tokens:
        return None
    recipe = next((t for t in tokens if t.endswith(".yaml")), None)
    recipe = recipe if recipe and recipe.startswith("recipes/") else None
    script = next((t for t in tokens if t.endswith("slurm/train_large.sh")), None)
    if script:
        path = ROOT / "slurm" / "train_large.sh"
        nodes = int(env.get("SLURM_JOB_NUM_NODES", sbatch_default(path, "nodes")))
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", sbatch_default(path, "ntasks-per-node")))
        before = tokens[:tokens.index(script)]
        for i, t in enumerate(before):
            if t in ("--nodes", "-N") and i + 1 < len(before):
                nodes = int(before[i + 1])
            elif re.fullmatch(r"(--nodes=|-N)\d+", t):
                nodes = int(re.sub(r"\D", "", t))
            elif t.startswith("--ntasks-per-node="):
                per_node = int(t.split("=")[1])
        return Launch(nodes * per_node, recipe, f"{nodes} node(s) × {per_node} GPUs (slurm/train_large.sh)")
    if tokens[0] == "deepspeed" or tokens[:3] == ["python", "-m", "deepspeed.launcher.runner"]:
        g = _flag(tokens, ("--num_gpus",))
        return Launch(g or 1, recipe, f"deepspeed --num_gpus {g}")
    if tokens[0] == "torchrun" and "elt_scale.train" in tokens:
        g = _flag(tokens, ("--nproc-per-node", "--nproc_per_node"))
        n = _flag(tokens, ("--nnodes",)) or 1
        return Launch((g or 1) * n, recipe, f"torchrun {n} node(s) × {g}")
    if tokens[0] == "elt-train" or tokens[:3] == ["python", "-m", "elt_scale.train"]:
        return Launch(1, recipe, "one process") if "--help" not in tokens else None
    return None


def _flag(tokens: list[str], names: tuple[str, ...]) -> int | None:
    for i, t in enumerate(tokens):
        for name in names:
            if t == name and i + 1 < len(tokens):
                return int(tokens[i + 1])
            if t.startswith(name + "="):
                return int(t.split("=", 1)[1])
    return None


def batch_problem(world: int, global_batch: int) -> str | None:
    """The rule (issue 38, item 1): a recipe that fixes train.global_batch trains on any world size that divides it."""
    if global_batch and global_batch % world:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        return f"{world} ranks do not divide train.global_batch={global_batch} (these do: {fits})"
    return None
