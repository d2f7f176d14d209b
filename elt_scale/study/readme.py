"""The README's result sections, generated from the committed result files in docs/ (never typed by hand):

    python -m elt_scale.study.readme            rewrite the blocks between the markers in README.md
    python -m elt_scale.study.readme --check    exit 1 when README.md and docs/ disagree (tests run this)

A block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` and holds the provenance line, the
mean [min–max] table, every claim's verdict and which metrics separate the models beyond seed noise."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .claims import report
from .results import provenance, table

ROOT = Path(__file__).resolve().parent.parent.parent
STUDIES = {"demo": "make demo", "reproduce": "make reproduce"}


def block(name: str, docs: Path) -> str:
    data = json.loads((docs / f"{name}.json").read_text())
    summary, only_ends = data["summary"], name == "reproduce"
    lines = [f"Measured by `{STUDIES[name]}` (`--results docs`) {provenance(data['meta'])}", ""]
    for family in dict.fromkeys(s["family"] for s in summary):
        lines += ([f"**{family}**", ""] if only_ends else []) + table(summary, family, only_ends) + [""]
    seps = data["separations"]
    apart = sorted({f"{s['metric']} ({s['label']})" for s in seps if s["separated"]})
    lines += ["mean [min–max] over the seeds" + ("; L = 1 and the training loop count only: every L in "
              f"[docs/{name}.md](docs/{name}.md)" if only_ends else "") + f". Plot: [docs/{name}.png](docs/{name}.png).",
              "", "Claims, checked over every seed at the end of the run:", "", report(data["claims"]), "",
              "Beyond seed noise (the seeds' ranges do not overlap): " + ("; ".join(apart) if apart else "none") +
              f"; every other comparison in [docs/{name}.md](docs/{name}.md) is within the seed spread."]
    return "\n".join(lines)


def render(readme: str, docs: Path) -> str:
    for name in STUDIES:
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)  # may be empty
        if not pattern.search(readme):
            raise ValueError(f"README.md has no <!-- results:{name} --> … <!-- /results:{name} --> block")
        readme = pattern.sub(lambda m: m.group(1) + block(name, docs) + "\n" + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = ROOT / "README.md"
    want = render(path.read_text(), ROOT / "docs")
    if "--check" in argv:
        if want != path.read_text():
            print("README.md's result blocks differ from docs/: run python -m elt_scale.study.readme", file=sys.stderr)
            return 1
        return 0
    path.write_text(want)
    print(f"README.md: result blocks rewritten from {ROOT / 'docs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
