"""Claims as checks: each claim the README makes about a study is a named comparison over the seeds, read
from the result rows, for every seed (paired by seed):
    better     A beats B on the metric by more than `tol` (relative)
    no_worse   A is at most `tol` (relative) worse than B: the paper's "costs nothing", "matches", one-sided
    within     A is within `tol` (relative) of B either way: equal cost
Each verdict's evidence gives the per-seed values, A's relative difference to B over the seeds against the
bar, the margin by which the closest seed cleared (or missed) it, and B's own seed spread: a margin smaller
than the spread is a claim that seed noise alone could have flipped. A claim that fails is reported as
failing: the README quotes the verdicts, never just the claims that held.

A model is picked as (family, model, L) with L an int or "max" (the model's training loop count)."""
from __future__ import annotations

from dataclasses import dataclass

LOWER_IS_BETTER = {"val_loss": True, "fd_digits": True, "class_acc": False, "gflops_per_sample": True}


@dataclass(frozen=True)
class Claim:
    name: str
    text: str                 # the sentence the README prints with the verdict
    kind: str                 # "better" | "no_worse" | "within"
    metric: str
    a: tuple                  # (family, model, L)
    b: tuple
    tol: float = 0.0
    quick: bool = False       # also carried by the quick settings the tests run


def pick(rows: list[dict], family: str, model: str, L) -> dict[int, float]:
    """seed -> the metric rows of one model at one loop count ("max": its training loop count)."""
    mine = [r for r in rows if r["family"] == family and r["model"] == model]
    if L == "max":
        L = mine[0]["trained_L"] if mine else None
    return {int(r["seed"]): r for r in mine if int(r["L"]) == L}


def paired(rows: list[dict], claim: Claim) -> list[tuple[int, float, float]]:
    a, b = pick(rows, *claim.a), pick(rows, *claim.b)
    return [(s, float(a[s][claim.metric]), float(b[s][claim.metric])) for s in sorted(set(a) & set(b))]


def worse_by(claim: Claim, a: float, b: float) -> float:
    """How much worse A is than B, relative to B (negative: A is better)."""
    sign = 1 if LOWER_IS_BETTER[claim.metric] else -1
    if b == 0:
        return 0.0 if a == b else sign * (a - b) * float("inf")
    return sign * (a - b) / abs(b)


def slack(claim: Claim, a: float, b: float) -> float:
    """By how much (relative) one seed clears the claim's bar; negative: it misses it."""
    w = worse_by(claim, a, b)
    if claim.kind == "within":
        return claim.tol - abs(w)
    if claim.kind == "no_worse":
        return claim.tol - w
    return -claim.tol - w                                 # better: A must be better by more than tol


def holds(claim: Claim, a: float, b: float) -> bool:
    s = slack(claim, a, b)
    return s > 0 if claim.kind == "better" else s >= 0


def bar(claim: Claim) -> str:
    tol = f"{100 * claim.tol:.3g}%"
    return {"better": f"< -{tol}" if claim.tol else "< 0%", "no_worse": f"<= +{tol}",
            "within": f"within ±{tol}"}[claim.kind]


def margin_text(claim: Claim, pairs: list[tuple[int, float, float]]) -> str:
    """A's difference to B over the seeds against the bar, the closest seed's margin, B's seed spread."""
    worse = [100 * worse_by(claim, a, b) for _, a, b in pairs]
    bs = [b for _, _, b in pairs]
    spread = 100 * (max(bs) - min(bs)) / abs(sum(bs) / len(bs)) if sum(bs) else 0.0
    margin = 100 * min(slack(claim, a, b) for _, a, b in pairs)
    return (f"A worse than B by {min(worse):+.2f}% to {max(worse):+.2f}% (bar {bar(claim)}); "
            f"margin {margin:+.2f} points; B's seed spread {spread:.2f}%")


def evaluate(claims: list[Claim], rows: list[dict]) -> list[dict]:
    """{name, text, holds, evidence, quick} per claim; a claim with no paired seeds does not hold."""
    out = []
    for c in claims:
        pairs = paired(rows, c)
        ok = bool(pairs) and all(holds(c, a, b) for _, a, b in pairs)
        evidence = "; ".join(f"seed {s}: {a:.4g} vs {b:.4g}" for s, a, b in pairs) or "no seeds to compare"
        if pairs:
            evidence += f" → {margin_text(c, pairs)}"
        out.append({"name": c.name, "text": c.text, "holds": ok, "evidence": evidence, "quick": c.quick})
    return out


def separation(rows: list[dict], metric: str, a: tuple, b: tuple) -> dict:
    """Whether two models differ on a metric beyond the seed spread: their [min, max] ranges do not overlap."""
    va = [float(r[metric]) for r in pick(rows, *a).values()]
    vb = [float(r[metric]) for r in pick(rows, *b).values()]
    if not va or not vb:
        return {"metric": metric, "separated": False, "a": [], "b": []}
    apart = max(va) < min(vb) or max(vb) < min(va)
    return {"metric": metric, "separated": apart, "a": [min(va), max(va)], "b": [min(vb), max(vb)]}


def report(verdicts: list[dict]) -> str:
    """PASS/FAIL lines, as printed at the end of a run and written beside the tables."""
    return "\n".join(f"- **{'PASS' if v['holds'] else 'FAIL'}** `{v['name']}`: {v['text']} ({v['evidence']})"
                     for v in verdicts)


@dataclass(frozen=True)
class QualityBar:
    """A level a model must reach on every seed before comparing it means anything (a diffusion model that
    ignores its class label cannot tell a good architecture from a bad one)."""
    name: str
    text: str
    metric: str
    a: tuple                  # (family, model, L)
    level: float              # at least this (higher-is-better metric) or at most (lower-is-better)


def check_bars(bars: list[QualityBar], rows: list[dict]) -> list[dict]:
    """Verdicts of the same shape as evaluate()'s: every seed must reach the level."""
    out = []
    for q in bars:
        values = {s: float(r[q.metric]) for s, r in pick(rows, *q.a).items()}
        sign = 1 if LOWER_IS_BETTER[q.metric] else -1
        margins = [sign * (q.level - v) for v in values.values()]
        evidence = "; ".join(f"seed {s}: {v:.4g}" for s, v in sorted(values.items())) or "no seeds"
        if margins:
            evidence += f" → bar {'<=' if sign > 0 else '>='} {q.level:g}; closest seed's margin {min(margins) + 0.0:+.3g}"
        out.append({"name": q.name, "text": q.text, "holds": bool(margins) and min(margins) >= 0,
                    "evidence": evidence, "quick": False})
    return out
