"""The result sections of docs/results.md and the README's headline, generated from the committed result files
in docs/ (never typed by hand):

    python -m studies.readme            rewrite the blocks between the markers in both pages
    python -m studies.readme --check    exit 1 when a page and docs/ disagree (tests run this)

docs/results.md holds the full blocks, `<!-- results:NAME -->` … `<!-- /results:NAME -->` for each study:
the provenance line, the mean [min–max] table, every claim's verdict with its evidence, and which metrics
separate the models beyond seed noise. README.md holds one `<!-- results:headline -->` block: per study, where
it was measured and every claim's verdict, without the evidence."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .claims import report
from .results import provenance, table

ROOT = Path(__file__).resolve().parent.parent
STUDIES = {"demo": "make demo", "reproduce": "make reproduce"}
RESULTS_PAGE = "docs/results.md"          # relative to ROOT, as PAGES' keys


def load(name: str, docs: Path) -> dict:
    return json.loads((docs / f"{name}.json").read_text())


def block(name: str, docs: Path) -> str:
    """The full result block of one study, for docs/results.md (links relative to docs/)."""
    data = load(name, docs)
    summary, only_ends = data["summary"], name == "reproduce"
    lines = [f"Measured by `{STUDIES[name]}` (`--results docs`) {provenance(data['meta'])}", ""]
    for family in dict.fromkeys(s["family"] for s in summary):
        lines += ([f"**{family}**", ""] if only_ends else []) + table(summary, family, only_ends) + [""]
    seps = data["separations"]
    apart = sorted({f"{s['metric']} ({s['label']})" for s in seps if s["separated"]})
    lines += ["mean [min–max] over the seeds" + ("; L = 1 and the training loop count only: every L in "
              f"[docs/{name}.md]({name}.md)" if only_ends else "") + f". Plot: [docs/{name}.png]({name}.png).",
              "", "Claims, checked over every seed at the end of the run:", "", report(data["claims"]), "",
              "Beyond seed noise (the seeds' ranges do not overlap): " + ("; ".join(apart) if apart else "none") +
              f"; every other comparison in [docs/{name}.md]({name}.md) is within the seed spread."]
    return "\n".join(lines)


def headline(docs: Path) -> str:
    """The README's short form: per study, where it was measured and every claim's verdict (no evidence)."""
    lines = []
    for name, command in STUDIES.items():
        data = load(name, docs)
        verdicts = data["claims"]
        held = sum(v["holds"] for v in verdicts)
        meta = data["meta"]
        lines += [f"`{command}` ({meta['date']}, commit {meta['commit']}, {meta['machine']}, {len(meta['seeds'])} "
                  f"seeds): {held} of {len(verdicts)} claims hold for every seed.", ""]
        lines += [f"- **{'PASS' if v['holds'] else 'FAIL'}** `{v['name']}`: {v['text']}" for v in verdicts] + [""]
    lines += [f"Tables, evidence per seed and plots: [{RESULTS_PAGE}]({RESULTS_PAGE})."]
    return "\n".join(lines)


PAGES = {   # page (relative to ROOT) -> {block name: its text from docs/}
    RESULTS_PAGE: {name: (lambda docs, name=name: block(name, docs)) for name in STUDIES},
    "README.md": {"headline": headline},
}


def render(text: str, docs: Path, page: str) -> str:
    """`text` (the page `page`) with every result block it must hold rewritten from `docs`."""
    for name, make in PAGES[page].items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)  # may be empty
        if not pattern.search(text):
            raise ValueError(f"{page} has no <!-- results:{name} --> … <!-- /results:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + make(docs) + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for page in PAGES:
        path = ROOT / page
        want = render(path.read_text(), ROOT / "docs", page)
        if want == path.read_text():
            continue
        if "--check" in argv:
            stale.append(page)
        else:
            path.write_text(want)
            print(f"{page}: result blocks rewritten from {ROOT / 'docs'}")
    if stale:
        print(f"{', '.join(stale)}: result blocks differ from docs/: run python -m studies.readme",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
