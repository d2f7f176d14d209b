"""The batch layout: how a recipe's global batch is split over the world size a launch brings.

A recipe that fixes train.global_batch G is sized for one layout (its micro_batch × grad_accum × GPUs) but
runs on any world w that divides G: each rank then takes G/w samples per step, as grad_accum micro-batches
of at most train.micro_batch (a memory bound: more memory per GPU is never taken). The recipe's micro_batch
is kept wherever it divides G/w; only then is a smaller one chosen, which changes the sample order and the
per micro-batch draws (data/order.py, seeding.py) but not the batch. A train.grad_accum given on the command
line is kept exactly, or the start is refused: the user asked for that accumulation.

`batch_layout` is the one place this is decided: elt-train applies it before any work, elt-plan prints it."""
from __future__ import annotations

from dataclasses import dataclass

from .config import RecipeError, parse_override



class BatchLayoutError(RecipeError):
    """No split of train.global_batch fits this world size; the message names the world sizes that do."""


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int
    grad_accum: int
    world: int
    note: str = ""             # what differs from the recipe's own settings, for the start line

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world


def accum_given(overrides) -> bool:
    """Whether the command line sets train.grad_accum: then the layout keeps it."""
    return any(parse_override(o)[0] == "train.grad_accum" for o in overrides)


def split(train, world: int, keep_accum: bool) -> tuple[int, int] | None:
    """(micro_batch, grad_accum) for G = train.global_batch on `world` ranks, or None when none fits."""
    per_rank, rest = divmod(train.global_batch, world)
    if rest or per_rank == 0:
        return None
    if keep_accum:
        micro, rest = divmod(per_rank, train.grad_accum)
        return (micro, train.grad_accum) if not rest and 1 <= micro <= train.micro_batch else None
    micro = max(m for m in range(1, min(train.micro_batch, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def batch_layout(train, world: int, keep_accum: bool = False, per_node: int = 0) -> BatchLayout:
    """The layout for `world` ranks (`per_node`, when known, turns world sizes into node counts in the
    error). A recipe without train.global_batch keeps its micro_batch × grad_accum on any world."""
    if not train.global_batch:
        return BatchLayout(train.micro_batch, train.grad_accum, world)
    got = split(train, world, keep_accum)
    if got is None:
        raise BatchLayoutError(refusal(train, world, keep_accum, per_node))
    micro, accum = got
    changed = [f"train.{k}={v} (recipe: {getattr(train, k)})"
               for k, v in (("micro_batch", micro), ("grad_accum", accum)) if v != getattr(train, k)]
    note = (f"{', '.join(changed)} keep train.global_batch={train.global_batch} on {world} ranks"
            if changed else "")
    return BatchLayout(micro, accum, world, note)


def refusal(train, world: int, keep_accum: bool, per_node: int) -> str:
    g = train.global_batch
    worlds = [w for w in range(1, g + 1) if split(train, w, keep_accum)]
    given = f" with train.grad_accum={train.grad_accum} (micro-batch at most {train.micro_batch})" if keep_accum else ""
    line = (f"train.global_batch={g} cannot be split over {world} ranks{given}; world sizes that can: "
            f"{', '.join(map(str, worlds)) or 'none'}")
    if per_node > 1:
        nodes = [w // per_node for w in worlds if w % per_node == 0]
        line += f" (at {per_node} GPUs per node: {', '.join(map(str, nodes)) or 'no'} nodes)"
    return line


def with_layout(recipe, layout: BatchLayout):
    """The recipe with the layout's micro_batch and grad_accum (everything downstream reads those)."""
    train = recipe.train.model_copy(update={"micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum})
    return recipe.model_copy(update={"train": train})
