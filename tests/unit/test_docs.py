"""The docs hold together (issue 32): README.md is a front door of at most 250 lines whose first screen gives
exactly two set-up commands; every relative link in README.md and docs/*.md names a file that exists (and a
heading, for an anchor); every command the docs show names something that exists: a console script of
pyproject.toml, a Makefile target, a module `python -m` can run, a file in the repository; each topic page
starts with what a user types."""
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
TOPICS = ["data", "training", "cluster", "evaluation", "api", "results", "benchmarks", "layout", "tests"]
GENERATED = {"batch_mix.md", "demo.md", "reproduce.md"}         # written by bench/ and the studies, not topic pages
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SHELL = {"bash", "sh", "shell", "console"}
REPO_DIRS = (".ci", "bench", "slurm", "data_prep", "recipes", "tests", "elt_scale", "studies", "docs")
REPO_PATH = re.compile(r"(?<![\w/.])((?:%s)/[\w./-]*\w)" % "|".join(map(re.escape, REPO_DIRS)))
USER_FILES = {"slurm/env.sh"}                                   # a file the docs ask the user to create


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def console_scripts() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)[1]
    return set(re.findall(r"^([\w.-]+)\s*=", section, re.M))


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def runnable_module(name: str) -> bool:
    """`python -m name` works from the checkout: a module with a main guard, or a package with __main__.py."""
    path = ROOT.joinpath(*name.split("."))
    if (path / "__main__.py").is_file():
        return True
    file = path.with_suffix(".py")
    return file.is_file() and '__name__ == "__main__"' in file.read_text()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def command_lines(text: str) -> list[str]:
    """Every line of every shell block (continuations joined), and every inline code span that starts with a
    command: what a user types."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL:
            lines += re.sub(r"\\\n\s*", " ", body).splitlines()
    prose = FENCE.sub("", text)
    lines += [s for s in re.findall(r"`([^`\n]+)`", prose)
              if re.match(r"(elt-\w+|make|python3?|torchrun|deepspeed|sbatch|bash) ", s)]
    return lines


def problems_in(line: str, scripts: set[str], targets: set[str]) -> list[str]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:                      # an inline span with a lone quote: not a command
        return []
    out, start = [], True
    for i, tok in enumerate(tokens):
        if tok in {"&&", "||", ";", "|"}:
            start = True
            continue
        if start and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tok):     # VAR=value before a command
            continue
        if start:
            start = False
            nxt = tokens[i + 1:]
            if tok.startswith("elt-") and tok not in scripts:
                out.append(f"{tok}: not a console script in pyproject.toml")
            if tok == "make":
                for target in (t for t in nxt if not t.startswith("-") and "=" not in t):
                    if target in {"&&", "||", ";", "|"}:
                        break
                    if target not in targets:
                        out.append(f"make {target}: no such Makefile target")
        if tok in {"-m", "--module"} and i + 1 < len(tokens):
            module = tokens[i + 1]
            if module.split(".")[0] in {"elt_scale", "data_prep", "bench", "studies"} and not runnable_module(module):
                out.append(f"-m {module}: no runnable module")
        path = tok.split("=", 1)[-1]
        if (path.split("/")[0] in REPO_DIRS and "/" in path
                and (re.search(r"\.(py|sh|yaml|md|csv|json)$", path) or path.startswith(".ci/"))
                and not re.search(r"[<>*{}…]|NAME|DIR", path) and path not in USER_FILES
                and not (ROOT / path).exists()):
            out.append(f"{path}: no such file")
    return out


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250, f"README.md has {len(text.splitlines())} lines (at most 250)"
    first_screen = "\n".join(text.splitlines()[:30])
    blocks = [b for lang, b in FENCE.findall(first_screen) if lang in SHELL]
    commands = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"], commands
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", first_screen), "a dated timing on the first screen"
    assert not re.search(r"\d\s*(minutes|min|seconds|s)\b", first_screen.replace("8×8", "")), \
        "a timing on the first screen"


@pytest.mark.parametrize("name", TOPICS)
def test_each_topic_page_exists_is_linked_and_starts_with_what_a_user_types(name):
    page = ROOT / "docs" / f"{name}.md"
    assert page.is_file(), rel(page)
    assert f"(docs/{name}.md)" in (ROOT / "README.md").read_text(), f"README.md does not link docs/{name}.md"
    body = [ln for ln in page.read_text().splitlines()[1:] if ln.strip()]
    assert body and body[0].startswith("```"), f"{rel(page)}: the first thing after the title is not a command block"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_at_files_and_headings(page):
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {rel(dest)}")
    assert not bad, f"{rel(page)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in GENERATED], ids=rel)
def test_every_command_the_docs_show_exists(page):
    scripts, targets = console_scripts(), make_targets()
    lines = command_lines(page.read_text())
    bad = [f"{line!r}: {p}" for line in lines for p in problems_in(line, scripts, targets)]
    assert not bad, f"{rel(page)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_repository_path_the_docs_name_exists(page):
    """In prose and code alike: `elt_scale/engine/heartbeat.py`, tests/test_slurm_faults.py, bench/RESULTS.md…
    (a pattern such as recipes/digits_*.yaml or docs/demo.{md,csv} is not a path)."""
    text = page.read_text()
    bad = sorted({m[1] for m in REPO_PATH.finditer(text)
                  if not text[m.end():].startswith(("*", "{", "<", ".{")) and m[1] not in USER_FILES
                  and not (ROOT / m[1]).exists()})
    assert not bad, f"{rel(page)} names paths that do not exist: {bad}"


def test_the_command_checker_catches_what_it_should():
    scripts, targets = console_scripts(), make_targets()
    assert {"elt-train", "elt-sample", "elt-eval", "elt-export", "elt-plan", "elt-tokenize"} <= scripts
    assert {"demo", "test", "reproduce"} <= targets
    ok = ["elt-sample runs/NAME --loops 1,2,4  # a comment naming elt-nothing",
          "make demo", "python -m studies.readme --check", "python data_prep/tokenize.py --merge --out DIR",
          "OUT=/tmp/x bash bench/gpu.sh --cpu", "sbatch --nodes 16 slurm/train_large.sh recipes/digits_masked.yaml",
          "deepspeed --num_gpus 8 --module elt_scale.train recipes/digits_masked.yaml",
          "python -m studies.demo --results docs && python -m studies.readme", "python -m studies.reproduce --help"]
    assert [problems_in(line, scripts, targets) for line in ok] == [[]] * len(ok)
    wrong = ["elt-nothing runs/NAME", "make demos", "python -m elt_scale.nothing", "python -m elt_scale.config",
             "python -m elt_scale.demo", "python -m studies.nothing", "python -m studies.claims",
             "python data_prep/nothing.py", "bash bench/nothing.sh", "sbatch slurm/nothing.sh",
             "torchrun -m elt_scale.nothing", "elt-train recipes/nothing.yaml", "true && make nothing",
             "bash .ci/nothing"]
    assert all(problems_in(line, scripts, targets) for line in wrong), \
        [line for line in wrong if not problems_in(line, scripts, targets)]
    assert slug("Watching a run while it trains (`eval.every`)") == "watching-a-run-while-it-trains-evalevery"
    assert slug("Storage faults, measured") == "storage-faults-measured"
