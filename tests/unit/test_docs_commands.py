"""The commands of README.md and docs/*.md, checked without running them (issue 38; running them:
tests/e2e/test_docs_commands.py; the catalogue and the rules: tests/docs_commands.py).

- every command is run by the e2e test or listed with the reason it is not, and every entry still exists;
- every command the e2e test runs is left with no path its substitutions do not cover;
- every launch line (deepspeed --num_gpus G, torchrun --nproc-per-node G, sbatch [--nodes N]
  slurm/train_large.sh, the recipes' own `# Launch:` lines) starts a number of ranks that divides its recipe's
  train.global_batch (a placeholder recipe: every paper recipe's);
- the tokenize lines that write one shard directory with one tokenizer agree on every setting that decides
  what a sample holds (tokenize.py refuses a second run with other settings into the same --out);
- a walk-through page (README.md, docs/gpu_quickstart.md) tokenizes the shards of every recipe it trains;
- the no-cluster dry run of slurm/train_large.sh prints the ranks the job would start."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.docs_commands import (NOT_RUN, RUN, all_commands, batch_problem, launch_of, needs_missing_tokenizer,
                                 page_commands, trained_recipe, unsubstituted)

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
WALKTHROUGHS = ["README.md", "docs/gpu_quickstart.md"]


def paper_recipes():
    from elt_scale.config import load_recipe
    return {f"recipes/{p.name}": load_recipe(p) for p in RECIPES}


def test_every_command_is_run_or_listed_with_a_reason():
    both = RUN & set(NOT_RUN)
    assert not both, f"in RUN and in NOT_RUN: {sorted(both)}"
    missing = [f"{page}: {command}" for page, command in all_commands() if command not in RUN | set(NOT_RUN)]
    assert not missing, ("commands the docs show that tests/docs_commands.py neither runs (RUN) nor lists with a "
                         "reason (NOT_RUN):\n" + "\n".join(missing))
    shown = {command for _, command in all_commands()}
    stale = sorted((RUN | set(NOT_RUN)) - shown)
    assert not stale, f"catalogued in tests/docs_commands.py but shown by no page: {stale}"
    assert all(reason.strip() for reason in NOT_RUN.values())


@pytest.mark.parametrize("page, command", [(p, c) for p, c in all_commands() if c in RUN],
                         ids=[f"{p}:{c[:50]}" for p, c in all_commands() if c in RUN])
def test_what_the_e2e_test_runs_is_fully_substituted(page, command):
    left = unsubstituted(page, command)
    assert not left, f"{page}: `{command}` still names {left} after the substitutions: add them to tests/docs_commands.py"


def launch_lines() -> list[tuple[str, str]]:
    lines = [(page, c) for page, c in all_commands() if launch_of(c)]
    for path in RECIPES:
        for c in re.findall(r"^# Launch: (.+)$", path.read_text(), re.M):
            lines.append((f"recipes/{path.name}", c.strip()))
    return lines


@pytest.mark.parametrize("where, command", launch_lines(), ids=[f"{w}:{c[:60]}" for w, c in launch_lines()])
def test_every_launch_line_divides_its_recipes_global_batch(where, command):
    launch = launch_of(command)
    recipes = paper_recipes()
    names = [launch.recipe] if launch.recipe else sorted(recipes)      # RECIPE.yaml: any recipe
    problems = [f"{name}: {p}" for name in names
                if (p := batch_problem(launch.world, recipes[name].train.global_batch))]
    assert not problems, f"{where}: `{command}` starts {launch.world} ranks ({launch.how}):\n" + "\n".join(problems)


def test_launch_arithmetic_reads_what_the_lines_say():
    assert launch_of("deepspeed --num_gpus 8 --module elt_scale.train recipes/a.yaml").world == 8
    assert launch_of("torchrun --standalone --nproc-per-node 8 -m elt_scale.train R.yaml").world == 8
    assert launch_of("torchrun --nnodes 2 --nproc_per_node=4 -m elt_scale.train R.yaml").world == 8
    assert launch_of("sbatch slurm/train_large.sh recipes/a.yaml").world == 16              # 2 × 8, the defaults
    assert launch_of("sbatch --nodes 16 slurm/train_large.sh recipes/a.yaml").world == 128
    assert launch_of("sbatch -N3 slurm/train_large.sh recipes/a.yaml").world == 24
    assert launch_of("SLURM_JOB_NUM_NODES=4 ELT_DRY_RUN=1 bash slurm/train_large.sh recipes/a.yaml").world == 32
    assert launch_of("elt-train recipes/digits_masked.yaml train.steps=2").world == 1
    assert launch_of("elt-sample runs/x --num 4 --out s/") is None
    assert batch_problem(128, 512) is None and batch_problem(7, 0) is None
    assert "(these do: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])" in batch_problem(24, 512)


def tokenize_args(command: str):
    """tokenize.py's parse of a tokenize command (python data_prep/tokenize.py ..., sbatch slurm/tokenize.sh ...,
    a recipe header's `# data:` line), or None when the command names a tokenizer this checkout lacks."""
    from data_prep import tokenize
    tokens = shlex.split(command)
    script = next(i for i, t in enumerate(tokens) if t.endswith(("data_prep/tokenize.py", "slurm/tokenize.sh")))
    if needs_missing_tokenizer(command):
        return None
    return tokenize.parse_args(tokens[script + 1:])


def tokenize_lines() -> list[tuple[str, str]]:
    lines = [(page, c) for page, c in all_commands()
             if re.search(r"(data_prep/tokenize\.py|slurm/tokenize\.sh) --source", c)]
    for path in RECIPES:
        lines += [(f"recipes/{path.name}", "python " + c) for c in
                  re.findall(r"^# data: python (data_prep/tokenize\.py .+)$", path.read_text(), re.M)]
    return lines


def test_tokenize_lines_writing_one_directory_agree():
    """The val line of docs/data.md once left out the train line's --samples-per-shard: tokenize.py refused it."""
    from data_prep.tokenize import SAMPLE_SETTINGS, settings_hash
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for where, command in tokenize_lines():
        args = tokenize_args(command)
        if args is None:
            continue
        key = (args.out, args.tokenizer)
        groups.setdefault(key, {}).setdefault(settings_hash(args, SAMPLE_SETTINGS), []).append(f"{where}: {command}")
    clashes = {key: by_hash for key, by_hash in groups.items() if len(by_hash) > 1}
    assert not clashes, "\n\n".join(
        f"--out {out} --tokenizer {tok} is written with {len(by)} different sample settings (tokenize.py refuses "
        "the later ones):\n" + "\n".join(f"  [{h}] {c}" for h, cs in by.items() for c in cs)
        for (out, tok), by in clashes.items())


@pytest.mark.parametrize("page", WALKTHROUGHS)
def test_a_walkthrough_tokenizes_what_it_trains(page):
    """README.md once tokenized SD-VAE latents and then launched a masked recipe that reads VQ codes."""
    commands = page_commands((ROOT / page).read_text())
    outs = set()
    for c in commands:
        if re.search(r"(data_prep/tokenize\.py|slurm/tokenize\.sh) --source", c):
            t = shlex.split(c)
            outs.add(t[t.index("--out") + 1])
    recipes = paper_recipes()
    untokenized = sorted({f"{r} reads {recipes[r].data.shards}" for c in commands if (r := trained_recipe(c))
                          and r in recipes and recipes[r].data.shards not in outs})
    assert not untokenized, f"{page} trains recipes whose shards none of its tokenize lines writes: {untokenized}"


@pytest.mark.parametrize("nodes, ranks", [(None, 16), ("16", 128)])
def test_the_dry_run_prints_every_rank_the_job_would_start(nodes, ranks):
    """Outside a job it printed 2 ranks for the default 2 nodes × 8 GPUs (one task per node)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    env["ELT_DRY_RUN"] = "1"
    if nodes:
        env["SLURM_JOB_NUM_NODES"] = nodes
    r = subprocess.run(["bash", "slurm/train_large.sh", "recipes/imagenet256_masked_elt_xl_7x4.yaml"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("dry-run ")]
    assert len(lines) == ranks
    for rank, line in enumerate(lines):
        assert f"RANK={rank} WORLD_SIZE={ranks} LOCAL_RANK={rank % 8} NODE_RANK={rank // 8} OMP_NUM_THREADS=12 " in line
    assert launch_of(f"{'SLURM_JOB_NUM_NODES=' + nodes + ' ' if nodes else ''}ELT_DRY_RUN=1 bash slurm/train_large.sh "
                     "recipes/x.yaml").world == ranks


@pytest.mark.parametrize("script", ["data_prep/tokenize.py", "data_prep/reshuffle.py"])
def test_the_data_prep_scripts_run_as_the_docs_write_them(script):
    """`python data_prep/reshuffle.py ...` (docs/data.md) died at import: run as a script, its folder heads sys.path
    and data_prep/tokenize.py shadowed the stdlib module `tokenize`."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
