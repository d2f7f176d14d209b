"""Watch a run while it trains: every `eval.every` steps, sample the same classes and seeds at each loop
count in `eval.loops` (the any-time picture of one model, as it trains) and write

    runs/NAME/samples/step_XXXXXXX/grid_L{l}.png     (grid_L{l}.gif for video)

plus one metrics.jsonl row per L (`eval_L`, the digits metrics on digits or ADM's suite - is, fid, sfid,
precision, recall - when eval.reference and eval.inception_weights are set, `eval_s` = wall time of the
whole evaluation), and the grids and metrics to wandb. Sampling, gathering and scoring are elt_scale.inference's, as for elt-sample/elt-eval.

The weights are the EMA when the run keeps one, else the fp32 master weights. Each rank owns disjoint
fragments of them (ds_internals.fp32_fragment), so one all-reduce of a zero-filled flat buffer gives every
rank the full tensors in a separate eval copy of the model: training state is never touched. Batch b goes
to rank b % world and depends only on (eval.seed, b), so the images do not depend on the number of ranks.
Each rank samples its batches and extracts their Inception features (ADM's suite) on its own, rank 0
gathers both and scores and writes them (elt_scale/inference/features.py), and the reference statistics
are loaded or computed (split across ranks, cached) before step 1 (`prepare`), so the first evaluation
costs what later ones cost and no rank waits in a collective for another's solo work.

An evaluation that fails ends itself, not the run (`after_step`): rank 0 says it in one line and a metrics
row {"step", "eval_error", "eval_s"}, and eval.max_failures failures in a row switch evaluation off for
the rest of this attempt. Every rank must agree that it failed, or one would wait in a collective the
others never enter: see `after_step`.

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
from ..inference.features import merge_features
from ..inference.outputs import save_grid
from ..inference.reference import check_adm_reference, check_reference, inception_dims
from ..inference.samples import SampleSet, merge_sets, sample_set
from ..inference.scoring import Scorer, is_digits
from ..metrics import file_sha256, load_inception
from ..models import build_model
from ..sampling import parse_loop_list
from ..tokenizers import tokenizer_from_manifest
from . import faults
from .distributed import SoloTimeout, solo
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
        self.failures, self.off = 0, False       # failed evaluations in a row: agreed, so the same on every rank

    def prepare(self) -> None:
        """Collective, before step 1: the reference statistics of ADM's suite, computed across ranks (and
        cached) or loaded; what can be wrong with their inputs, `preflight` has refused already. Rank 0's own
        part (merging, the statistics, the cache file) is waited for through the store, not in the next
        collective, whose deadline it could outlast."""
        if self.cfg.every > 0 and self.cfg.reference:
            self.scorer.prepare_reference()
            solo(lambda: None, f"computing the reference statistics of {self.cfg.reference}",
                 self.recipe.train.solo_timeout_s)

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and not self.off and step % self.cfg.every == 0

    def after_step(self, step: int, engine, ema, reporter) -> None:
        """Call on every rank after every step (collectives when due). An error on any rank ends this
        evaluation on every rank, and only it: each rank catches the errors of its own part (sampling,
        decoding, its features: no collective inside), then one all_gather tells every rank whether any
        failed, before the gather a failed rank would never enter; rank 0's part (scoring, grids, rows) is
        solo work whose error reaches the others through the store. Not caught: an error inside the
        collectives themselves (the weights' all-reduce, the all_gather, the gather, the store), which is a
        peer or the network failing, not the evaluation - a rank failing there cannot tell the others, who wait
        for it in the same collective until the heartbeat or the collective deadline ends the run."""
        if not self.due(step):
            return
        start = time.perf_counter()
        weights = full_weights(engine.module, ema, self.rank, self.world, engine.device)     # collective
        mine, error = attempt(lambda: self._own_part(self._eval_model(weights, engine), step))
        errors = self._agree(error)                                     # collective
        if not errors:
            shares = self._gather(mine)                                 # collective: rank 0 gets every rank's
            errors = self._on_rank0(lambda: self._report(step, shares, start, reporter))
        self._count(step, errors, time.perf_counter() - start, reporter)

    def _eval_model(self, weights: dict, engine) -> torch.nn.Module:
        if self.model is None:
            with torch.random.fork_rng(devices=[]):     # building draws initial weights: leave training's RNG be
                self.model = build_model(self.recipe).to(engine.device).eval()
        wanted = self.model.state_dict().keys()          # buffers are never partitioned: take them as they are
        weights.update({n: b for n, b in engine.module.named_buffers() if n in wanted})
        self.model.load_state_dict(weights)
        return self.model

    def _own_part(self, model, step: int) -> list[tuple[SampleSet, tuple | None]]:
        """This rank's batches at each loop spec, sampled and decoded, with their Inception features when ADM's
        suite scores them (features.Share, else None). No collective in here."""
        c, out = self.cfg, []
        for schedule in self.schedules:
            mine = sample_set(model, self.recipe, schedule, c.num, self.decoder, c.cfg, c.steps or None, c.sampler,
                              c.seed, c.batch_size, rank=self.rank, world=self.world, progress=False,
                              classes=c.classes or None)
            faults.eval_fails(step, self.rank)             # test-only (ELT_FAULT): an error on one rank
            out.append((mine, self._features(mine)))
        return out

    def _features(self, mine: SampleSet):
        """This rank's share of the features of ADM's suite, for images (not videos, not the digits, which their
        classifier scores) with a reference. Every rank with a batch decides alike, from the images' shape;
        one without has none to add (rank 0 always has batch 0)."""
        images = mine.images
        if not self.cfg.reference or len(images) == 0 or images.ndim != 4 or \
                is_digits(images, self.recipe.model.num_classes):
            return None
        batch = self.cfg.batch_size

        def own_batches(keep):             # sample batch b lives on rank b % world: the keep() of features.py
            ids = mine.index // batch
            for b in np.unique(ids):
                if keep(int(b)):
                    yield int(b), images[ids == b]
        return self.scorer.features_of(own_batches, self.cfg.num)

    def _agree(self, error: str | None) -> list[str]:
        """Collective: the errors of every rank's own part, "rank R: ...", the same list on every rank."""
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error)
        return [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]

    def _gather(self, mine: list) -> list | None:
        """Collective: every rank's own part, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [mine]
        shares = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, shares, dst=0)
        return shares

    def _on_rank0(self, work) -> list[str]:
        """work() on rank 0 while the others wait through the store (engine.distributed.solo): scoring can
        outlast a collective's deadline (scipy's sqrtm of a 2048² matrix takes a minute on a CPU, two per loop
        spec), and an error in it reaches every rank. -> [] or [rank 0's error], the same on every rank."""
        try:
            solo(work, "scoring an evaluation", self.recipe.train.solo_timeout_s)
            return []
        except SoloTimeout:                # rank 0 hung or gone: not an evaluation error, the run's to end
            raise
        except Exception as e:  # noqa: BLE001 -- rank 0 its own error, the others solo's report of it
            return [f"rank 0: {one_line(e)}"]

    def _report(self, step: int, shares: list, start: float, reporter) -> None:
        """Rank 0: each loop spec's samples and features merged and scored, its grid written; then the rows."""
        folder = self.recipe.run_dir / "samples" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows, grids = [], {}
        for i, schedule in enumerate(self.schedules):
            s = merge_sets([share[i][0] for share in shares])
            features = [share[i][1] for share in shares if share[i][1] is not None]
            suite = self._adm_suite(features) if features else self._score(s)
            grids[schedule.label] = save_grid(folder / f"grid_{schedule.label}", s.images)
            rows.append({"step": step, "eval_L": schedule.spec, **suite, "loops_per_step": round(s.loops_per_step, 4),
                         "gflops_per_sample": s.gflops_per_sample})
        eval_s = time.perf_counter() - start
        reporter.log_eval(step, [{**row, "eval_s": round(eval_s, 3)} for row in rows], grids, eval_s)
        reporter.say(f"eval at step {step}: {len(rows)} loop counts in {eval_s:.1f}s -> {folder}")

    def _count(self, step: int, errors: list[str], eval_s: float, reporter) -> None:
        """A failed evaluation: one line and one metrics row (rank 0), and eval.max_failures in a row switch
        evaluation off, said in the same line. `errors` is the same on every rank, and so is the count."""
        if not errors:
            self.failures = 0
            return
        self.failures += 1
        self.off = self.failures >= self.cfg.max_failures
        if self.rank != 0:
            return
        error = errors[0] + (f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else "")
        reporter.log_eval_error(step, error, round(eval_s, 3))
        off = (f"; {self.failures} in a row (eval.max_failures={self.cfg.max_failures}): evaluation is off for the "
               "rest of this run" if self.off else "; training goes on")
        reporter.say(f"eval at step {step} failed on {error}{off}", error=True)

    def _adm_suite(self, features: list) -> dict:
        record = self.scorer.adm_of_features(merge_features(features))
        return {k: record[k] for k in ("is", "fid", "sfid", "precision", "recall") if record[k] is not None}

    def _score(self, s: SampleSet) -> dict[str, float]:
        """Digits metrics for 8×8 digit models (rank 0: they are cheap), else nothing (ADM's suite is _adm_suite's)."""
        if is_digits(s.images, self.recipe.model.num_classes):
            return self.scorer(s.images, s.labels, "digits")
        return {}


def attempt(work):
    """(work(), None), or (None, its error in one line): an error in an evaluation ends the evaluation."""
    try:
        return work(), None
    except Exception as e:  # noqa: BLE001 -- whatever sampling or decoding raises: the run goes on
        return None, one_line(e)
