"""Watch a run while it trains: every `eval.every` steps, sample the same classes and seeds at each loop
count in `eval.loops` (the any-time picture of one model, as it trains) and write

    runs/NAME/samples/step_XXXXXXX/grid_L{l}.png     (grid_L{l}.gif for video)

plus one metrics.jsonl row per L (`eval_L`, the digits metrics on digits or ADM's suite - is, fid, sfid,
precision, recall - when eval.reference and eval.inception_weights are set, `eval_s` = wall time of the
whole evaluation), and the grids and metrics to wandb. Sampling, gathering and scoring are elt_scale.inference's, as for elt-sample/elt-eval.

The weights are the EMA when the run keeps one, else the fp32 master weights. Each rank owns disjoint
fragments of them (ds_internals.fp32_fragment), so one all-reduce of a zero-filled flat buffer gives every
rank the full tensors in a separate eval copy of the model: training state is never touched. Batch b goes
to rank b % world and depends only on (eval.seed, b), so the images do not depend on the number of ranks;
rank 0 gathers and writes them. ADM's suite is computed where the images are: each rank extracts the
Inception features of its own batches and rank 0 merges them (elt_scale/inference/features.py), and the
reference statistics are loaded or computed (split across ranks, cached) before step 1 (`prepare`), so the
first evaluation costs what later ones cost and no rank waits in a collective for another's solo work.

What evaluation will read (the reference, against the Inception's feature sizes and file; the Inception
file; the tokenizers that decode samples and reference images) is checked before DeepSpeed starts
(`preflight`, exit 2 on a bad input), so `prepare` is left with work, not input errors."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.shards import read_manifest
from ..inference.outputs import save_grid
from ..inference.reference import check_adm_reference, check_reference, inception_dims
from ..inference.samples import SampleSet, gather_set, sample_set
from ..inference.scoring import Scorer, is_digits
from ..metrics import file_sha256, load_inception
from ..models import build_model
from ..sampling import parse_loop_list
from ..tokenizers import tokenizer_from_manifest
from .distributed import solo
from .ds_internals import fp32_fragment, full_shape


class EvalSetupError(ValueError):
    """A path or file in-training evaluation needs is missing or bad (one line; exit 2 before step 1)."""


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def preflight(recipe, tokenizer: dict):
    """Before DeepSpeed starts, on every rank: the files evaluation will read are there and sound, and fit
    each other (the reference's sizes are the Inception's). Returns the tokenizer's decoder for sampling
    (None when eval.every=0), or raises EvalSetupError naming the key and file."""
    c = recipe.eval
    if c.every <= 0:
        return None
    if c.reference:                     # (the recipe check already asks for eval.inception_weights beside it)
        try:
            check_reference(c.reference)
        except (OSError, ValueError) as e:
            raise EvalSetupError(f"eval.reference: {e}") from e
    if c.inception_weights and not Path(c.inception_weights).is_file():
        raise EvalSetupError(f"eval.inception_weights={c.inception_weights}: no such file")
    if c.reference:
        check_against_inception(c.reference, c.inception_weights, tokenizer)
    return load_decoder(tokenizer, "the tokenizer that decodes eval samples")


def check_against_inception(reference: str, weights: str, tokenizer: dict) -> None:
    """What `prepare` would otherwise find hours into a job, after DeepSpeed's start: an Inception file that
    does not load or run, a reference of other feature sizes or made with other weights, one whose images
    cannot be decoded or are too few (inference.reference.check_adm_reference)."""
    try:
        net = load_inception(weights)
        dims, sha256 = inception_dims(net), file_sha256(weights)
    except Exception as e:     # noqa: BLE001 -- any loader error (TorchScript, torch-fidelity, file) is a bad set-up
        raise EvalSetupError(f"eval.inception_weights={weights}: not a usable Inception network "
                             f"({one_line(e)})") from e
    try:
        check_adm_reference(reference, dims, sha256)
    except (OSError, ValueError) as e:
        raise EvalSetupError(f"eval.reference: {e}") from e
    if Path(reference).suffix != ".npz":           # a shards directory: its images are decoded by its tokenizer
        theirs = read_manifest(reference)["tokenizer"]
        if theirs != tokenizer:
            load_decoder(theirs, f"eval.reference={reference}: the tokenizer that decodes its images")


def load_decoder(tokenizer: dict, what: str):
    try:
        return tokenizer_from_manifest({"tokenizer": tokenizer})
    except Exception as e:     # noqa: BLE001 -- any loader error (diffusers, hub id, file) is a bad set-up
        raise EvalSetupError(f"{what} ({tokenizer.get('name', tokenizer)}) cannot be loaded: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e


def fp32_fragments(module: torch.nn.Module, ema, rank: int, world: int) -> dict[str, tuple[int, torch.Tensor]]:
    """This rank's (start, flat fp32 fragment) per parameter: the EMA shadow, or the live master weights."""
    if ema is not None:
        return ema.shadow
    return {n: f for n, p in module.named_parameters() if (f := fp32_fragment(p, rank, world)) is not None}


@torch.no_grad()
def full_weights(module: torch.nn.Module, ema, rank: int, world: int, device) -> dict[str, torch.Tensor]:
    """Full fp32 parameters on every rank: the fragments are disjoint, so zeros + mine, summed over ranks."""
    shapes = {n: full_shape(p) for n, p in module.named_parameters()}
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name], total = total, total + shape.numel()
    flat = torch.zeros(total, dtype=torch.float32, device=device)
    for name, (start, frag) in fp32_fragments(module, ema, rank, world).items():
        at = offsets[name] + start
        flat[at:at + frag.numel()] = frag.reshape(-1).to(device)
    if world > 1:
        dist.all_reduce(flat)
    return {n: flat[offsets[n]:offsets[n] + s.numel()].view(s) for n, s in shapes.items()}


class LiveEval:
    def __init__(self, recipe, rank: int, world: int, decoder, device):
        self.recipe, self.cfg, self.rank, self.world, self.decoder = recipe, recipe.eval, rank, world, decoder
        self.schedules = parse_loop_list(self.cfg.loops or f"1-{recipe.model.loops}", recipe.model.loops)
        self.model = None
        self.scorer = Scorer(self.cfg.reference or None, self.cfg.inception_weights or None, rank=rank,
                             world=world, device=device, batch_size=self.cfg.batch_size)

    def prepare(self) -> None:
        """Collective, before step 1: the reference statistics of ADM's suite, computed across ranks (and
        cached) or loaded; what can be wrong with their inputs, `preflight` has refused already. Rank 0's own
        part (merging, the statistics, the cache file) is waited for through the store, not in the next
        collective, whose deadline it could outlast."""
        if self.cfg.every > 0 and self.cfg.reference:
            self.scorer.prepare_reference()
            solo(lambda: None, f"computing the reference statistics of {self.cfg.reference}",
                 self.recipe.train.watchdog_first_s)

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def after_step(self, step: int, engine, ema, reporter) -> None:
        """Call on every rank after every step (a collective when due)."""
        if not self.due(step):
            return
        start = time.perf_counter()
        model = self._eval_model(engine, ema)
        c, sets = self.cfg, {}
        for schedule in self.schedules:
            mine = sample_set(model, self.recipe, schedule, c.num, self.decoder, c.cfg, c.steps or None, c.sampler,
                              c.seed, c.batch_size, rank=self.rank, world=self.world, progress=False,
                              classes=c.classes or None)
            suite = self._adm_suite(mine)                  # collective: every rank scores its own batches
            sets[schedule] = (gather_set(mine, self.rank, self.world), suite)
        if self.rank == 0:
            self._report(step, sets, time.perf_counter() - start, reporter)

    def _eval_model(self, engine, ema) -> torch.nn.Module:
        if self.model is None:
            with torch.random.fork_rng(devices=[]):     # building draws initial weights: leave training's RNG be
                self.model = build_model(self.recipe).to(engine.device).eval()
        state = full_weights(engine.module, ema, self.rank, self.world, engine.device)
        wanted = self.model.state_dict().keys()          # buffers are never partitioned: take them as they are
        state.update({n: b for n, b in engine.module.named_buffers() if n in wanted})
        self.model.load_state_dict(state)
        return self.model

    def _report(self, step: int, sets: dict, eval_s: float, reporter) -> None:
        folder = self.recipe.run_dir / "samples" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows, grids = [], {}
        for schedule, (s, suite) in sets.items():
            grids[schedule.label] = save_grid(folder / f"grid_{schedule.label}", s.images)
            rows.append({"step": step, "eval_L": schedule.spec, **(suite or self._score(s)),
                         "loops_per_step": round(s.loops_per_step, 4),
                         "gflops_per_sample": s.gflops_per_sample, "eval_s": round(eval_s, 3)})
        reporter.log_eval(step, rows, grids, eval_s)
        reporter.say(f"eval at step {step}: {len(rows)} loop counts in {eval_s:.1f}s -> {folder}")

    def _uses_adm(self, images, device) -> bool:
        """Images (not videos, not the digits) with a reference: decided from the images, agreed across ranks
        (a rank with no batch has none to look at) - every rank must take the same branch."""
        if not self.cfg.reference:
            return False
        mine = -1.0 if len(images) == 0 else float(images.ndim == 4 and not is_digits(images,
                                                                                     self.recipe.model.num_classes))
        if self.world == 1:
            return mine > 0
        t = torch.tensor([mine], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _adm_suite(self, mine: SampleSet) -> dict | None:
        """ADM's suite of the whole set, each rank feeding the batches it sampled (rank 0 gets the values)."""
        if not self._uses_adm(mine.images, self.scorer.device):
            return None
        batch = self.cfg.batch_size

        def own_batches(keep):             # sample batch b lives on rank b % world: the keep() of features.py
            ids = mine.index // batch
            for b in np.unique(ids):
                if keep(int(b)):
                    yield int(b), mine.images[ids == b]
        record = self.scorer.adm_of(own_batches, self.cfg.num)
        return None if record is None else {k: record[k] for k in ("is", "fid", "sfid", "precision", "recall")
                                            if record[k] is not None}

    def _score(self, s: SampleSet) -> dict[str, float]:
        """Digits metrics for 8×8 digit models (rank 0: they are cheap), else nothing (ADM's suite is _adm_suite's)."""
        if is_digits(s.images, self.recipe.model.num_classes):
            return self.scorer(s.images, s.labels, "digits")
        return {}
