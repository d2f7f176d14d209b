"""Watch a run while it trains: every `eval.every` steps, sample the same classes and seeds at each loop
count in `eval.loops` (the any-time picture of one model, as it trains) and write

    runs/NAME/samples/step_XXXXXXX/grid_L{l}.png     (grid_L{l}.gif for video)

plus one metrics.jsonl row per L (`eval_L`, the digits metrics on digits or FID when eval.reference
and eval.inception_weights are set, `eval_s` = wall time of the whole evaluation), and the grids and
metrics to wandb.

The weights are the EMA when the run keeps one, else the fp32 master weights. Each rank owns disjoint
fragments of them (ema.py explains which, at every ZeRO stage), so one all-reduce of a zero-filled
flat buffer gives every rank the full tensors in a separate eval copy of the model: no
GatheredParameters dance, and training state is never touched. Batch b goes to rank b % world and
depends only on (eval.seed, b) (sample.py), so the images do not depend on the number of ranks, and
rank 0 gathers, writes and scores them."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..models import build_model
from ..sample import SampleSet, load_decoder, sample_set, save_grid
from ..sampling import parse_loop_list
from .ema import _fp32_fragment


def fp32_fragments(module: torch.nn.Module, ema, rank: int, world: int) -> dict[str, tuple[int, torch.Tensor]]:
    """This rank's (start, flat fp32 fragment) per parameter: the EMA shadow, or the live master weights."""
    if ema is not None:
        return ema.shadow
    return {n: f for n, p in module.named_parameters() if (f := _fp32_fragment(p, rank, world)) is not None}


@torch.no_grad()
def full_weights(module: torch.nn.Module, ema, rank: int, world: int, device) -> dict[str, torch.Tensor]:
    """Full fp32 parameters on every rank: the fragments are disjoint, so zeros + mine, summed over ranks."""
    shapes = {n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
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


def merge_sets(sets: list[SampleSet]) -> SampleSet:
    """Every rank's share, back in global sample order."""
    sets = [s for s in sets if len(s.labels)] or sets[:1]
    index = np.concatenate([s.index for s in sets])
    order = np.argsort(index, kind="stable")
    n = max(sum(len(s.labels) for s in sets), 1)
    mean = lambda k: sum(getattr(s, k) * len(s.labels) for s in sets) / n
    return SampleSet(np.concatenate([s.images for s in sets])[order], np.concatenate([s.labels for s in sets])[order],
                     mean("gflops_per_sample"), mean("loops_per_step"), max(s.wall_s for s in sets), index[order])


class LiveEval:
    def __init__(self, recipe, rank: int, world: int):
        self.recipe, self.cfg, self.rank, self.world = recipe, recipe.eval, rank, world
        self.schedules = parse_loop_list(self.cfg.loops or f"1-{recipe.model.loops}", recipe.model.loops)
        self.model = self.decoder = self.scorer = None

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def after_step(self, step: int, engine, ema, metrics=None, wandb_run=None) -> None:
        """Call on every rank after every step (a collective when due); metrics/wandb_run on rank 0 only."""
        if not self.due(step):
            return
        start = time.perf_counter()
        model = self._eval_model(engine, ema)
        c, sets = self.cfg, {}
        for schedule in self.schedules:
            mine = sample_set(model, self.recipe, schedule, c.num, self.decoder, c.cfg, c.steps or None, c.sampler,
                              c.seed, c.batch_size, rank=self.rank, world=self.world, progress=False,
                              classes=c.classes or None)
            sets[schedule] = self._gather(mine)
        if self.rank == 0:
            self._report(step, sets, time.perf_counter() - start, metrics, wandb_run)

    # --- pieces -------------------------------------------------------------------------------------------
    def _eval_model(self, engine, ema) -> torch.nn.Module:
        if self.model is None:
            with torch.random.fork_rng(devices=[]):     # building draws initial weights: leave training's RNG be
                self.model = build_model(self.recipe).to(engine.device).eval()
            self.decoder = load_decoder(self.recipe)
        state = full_weights(engine.module, ema, self.rank, self.world, engine.device)
        wanted = self.model.state_dict().keys()          # buffers are never partitioned: take them as they are
        state.update({n: b for n, b in engine.module.named_buffers() if n in wanted})
        self.model.load_state_dict(state)
        return self.model

    def _gather(self, mine: SampleSet) -> SampleSet | None:
        if self.world == 1:
            return mine
        shares = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, shares, dst=0)
        return merge_sets(shares) if self.rank == 0 else None

    def _report(self, step: int, sets: dict, eval_s: float, metrics, wandb_run) -> None:
        folder = self.recipe.run_dir / "samples" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows, images = [], {}
        for schedule, s in sets.items():
            grid = save_grid(folder / f"grid_{schedule.label}", s.images)
            rows.append({"step": step, "eval_L": schedule.spec, **self._score(s),
                         "loops_per_step": round(s.loops_per_step, 4),
                         "gflops_per_sample": s.gflops_per_sample, "eval_s": round(eval_s, 3)})
            images[f"eval/grid_{schedule.label}"] = grid
        for row in rows:
            if metrics is not None:
                metrics.write(row)
        if wandb_run is not None:
            import wandb
            logged = {f"eval/{k}_{r['eval_L']}": v for r in rows for k, v in r.items()
                      if k not in ("step", "eval_L", "eval_s")}
            logged.update({k: wandb.Image(str(p)) for k, p in images.items()})
            wandb_run.log({**logged, "eval/eval_s": eval_s}, step=step)
        print(f"elt-train: eval at step {step}: {len(rows)} loop counts in {eval_s:.1f}s -> {folder}", flush=True)

    def _score(self, s: SampleSet) -> dict[str, float]:
        """Digits metrics for 8×8 digit models, FID with a configured reference, else nothing."""
        from ..evaluate import is_digits, load_reference

        c = self.cfg
        if is_digits(s.images, self.recipe.model.num_classes):
            self.scorer = self.scorer or DigitsScorer()
            return self.scorer(s.images, s.labels)
        if c.reference and s.images.ndim == 4:
            from ..metrics import frechet_distance, load_inception
            if self.scorer is None:
                self.scorer = (load_inception(c.inception_weights, "features"), load_reference(c.reference))
            inception, reference = self.scorer
            return {"fid": frechet_distance(s.images, reference, inception)}
        return {}


class DigitsScorer:
    """elt-eval digits' class consistency and FD-digits, with the real digits' features computed once per
    run instead of at every L of every evaluation (that was most of an evaluation's time on digits)."""

    def __init__(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        from ..metrics.digits import DigitsFeatures, load_classifier, real_digits_uint8
        from ..metrics.frechet import to_nchw

        self.clf, self.to_nchw = load_classifier(), to_nchw
        self.fd = FrechetInceptionDistance(feature=DigitsFeatures(self.clf), reset_real_features=False,
                                           sync_on_compute=False)     # rank 0 alone computes it
        with torch.no_grad():
            self.fd.update(to_nchw(real_digits_uint8()), real=True)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        x = self.to_nchw(images)
        self.fd.reset()                                        # keeps the real features
        self.fd.update(x, real=False)
        acc = float((self.clf(x).argmax(-1).numpy() == labels).mean())
        return {"class_acc": acc, "fd_digits": float(self.fd.compute())}
