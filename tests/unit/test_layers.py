"""The package's import arrows point down: config ← data, models, objectives ← sampling ← inference ← engine ←
train and the CLIs. Every import in elt_scale/ counts, also the lazy ones inside functions. Above the package,
outside it: studies/ (the digits studies and the README's result blocks, repository only), which elt_scale/ must
never import and a wheel must not contain."""
import ast
import fnmatch
import re

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "elt_scale"
LAYERS = [   # lowest first; a module may import its own layer and the ones below
    {"config", "batching", "seeding", "dist", "loopspec", "cli", "files"},
    {"data", "models", "flops", "objectives", "schedules", "tokenizers", "metrics"},
    {"sampling"},
    {"inference"},
    {"engine"},
    {"train", "sample", "evaluate", "export", "api", "plan", "plan_schedules", "__init__"},
]
REPO_ONLY = {"studies"}     # top-level packages of the checkout above elt_scale: never imported by it
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def component(module: str) -> str:
    """elt_scale.engine.checkpoint -> engine; elt_scale.train -> train; elt_scale -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every elt_scale import in a module's source."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "elt_scale"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "elt_scale":
                # `from . import checkpoint`: the names may be submodules
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                out += [(node.lineno, t) for t in names]
    return out


def repo_only_imports(source: str, module: str) -> list[str]:
    """Every import of a REPO_ONLY package (absolute, also lazy, also `import studies.demo as d`)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        out += [f"{module}:{node.lineno} imports {name} (repository-only code)" for name in names
                if name.split(".")[0] in REPO_ONLY]
    return out


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    mine = LEVEL[component(module)]
    return [f"{module}:{line} imports {target} ({component(target)} is above {component(module)})"
            for line, target in imported_modules(source, module, is_package)
            if LEVEL[component(target)] > mine]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        yield path, module, is_package


def test_every_component_has_a_layer():
    components = {component(m) for _, m, _ in package_modules()}
    assert components <= set(LEVEL), f"put {sorted(components - set(LEVEL))} into a layer of tests/unit/test_layers.py"


def test_no_module_imports_upward():
    problems = [p for path, module, is_package in package_modules()
                for p in upward_imports(path.read_text(), module, is_package)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module,source", [
    ("elt_scale.models", "from .engine import checkpoint\n"),
    ("elt_scale.sampling.loops", "def f():\n    from elt_scale.inference.load import load\n"),   # lazy counts too
    ("elt_scale.inference.samples", "from .. import train\n"),
    ("elt_scale.config", "import elt_scale.data.order\n"),
])
def test_the_check_catches_an_upward_import(module, source):
    assert upward_imports(source, module), "an upward import went unnoticed"


def test_the_check_allows_downward_and_sideways_imports():
    assert not upward_imports("from ..inference.weights import read_pointer\nfrom . import faults\n",
                              "elt_scale.engine.checkpoint")
    assert not upward_imports("from .load import load\nfrom ..sampling import generate\n", "elt_scale.inference",
                              is_package=True)


def test_the_loss_path_is_eight_files_without_test_hooks():
    """docs/layout.md walks the loss from the recipe to optimizer.step through at most 8 Python files, which
    exist; test-only fault injection (ELT_FAULT) stays off the step: hooks installed at set-up, if asked."""
    import inspect
    import re

    from elt_scale import train
    walk = (ROOT / "docs" / "layout.md").read_text().split("## Following the loss", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. (.*?)(?=^\d+\. |^\S|\Z)", walk, flags=re.M | re.S)
    files = list(dict.fromkeys(f for s in steps for f in re.findall(r"`(elt_scale/[\w/]+\.py)`", s.split(":")[0])))
    assert 7 <= len(files) <= 8, files
    assert all((ROOT / f).is_file() for f in files), [f for f in files if not (ROOT / f).is_file()]
    assert {"elt_scale/models.py", "elt_scale/objectives.py", "elt_scale/train.py"} <= set(files)
    for step in (train.micro_step, train.train_step):
        assert "faults" not in inspect.getsource(step), step.__name__


def test_the_package_never_imports_repository_only_code():
    problems = [p for path, module, _ in package_modules() for p in repo_only_imports(path.read_text(), module)]
    assert not problems, "\n".join(problems)
    assert repo_only_imports("def f():\n    from studies.runs import ROOT\n", "elt_scale.train")
    assert repo_only_imports("import studies.demo as d\n", "elt_scale.api")
    assert not repo_only_imports("from .studies import x\nimport studiesx\n", "elt_scale.api")


def test_repository_only_code_is_outside_the_package_and_the_wheel():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\n(.*?)(?=^\[|\Z)", pyproject, re.S | re.M)[1]
    include = re.findall(r'"([^"]+)"', re.search(r"^include\s*=\s*\[(.*?)\]", section, re.S | re.M)[1])
    assert "elt_scale*" in include, include
    for name in REPO_ONLY:
        assert (ROOT / name / "__init__.py").is_file() and not (PACKAGE / name).exists(), name
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in include), f"pyproject.toml would install {name}"


def long_functions(source: str, limit: int = 60) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than `limit` lines, decorators and docstring included."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_in_the_package_is_over_60_lines():
    """A step you can follow top-down: small named helpers, none longer than a screen."""
    found = [f"{path.relative_to(ROOT)}: {name} ({lines} lines)" for path in sorted(PACKAGE.rglob("*.py"))
             for name, lines in long_functions(path.read_text())]
    assert not found, "\n".join(found)
    assert long_functions("def f():\n" + "    x = 1\n" * 60) == [("f", 61)]
    assert not long_functions("def f():\n" + "    x = 1\n" * 59)
