"""Inference: load a trained model from any source, sample it at loop specs, gather across ranks, write
uint8 arrays, grids and ADM .npz files, and score them. elt-sample, elt-eval, the Python API (ELT) and the
in-training evaluation all go through this package.

    load.py       run dir / export / saved folder / Hub id -> Loaded(model, recipe, tokenizer, ema)
    weights.py    a run's checkpoints read without DeepSpeed's engine; the safetensors export format
    samples.py    SampleSet, sample_set (one rank's share), gather_set (rank 0 gets all, in order)
    outputs.py    ADM .npz (also read lazily), PNG/GIF grids
    features.py   Inception features streamed batch by batch, split across ranks and gathered
    reference.py  references: ADM reference batch (precomputed statistics), shard set (+ cached statistics)
    scoring.py    Scorer: digits, ADM's suite (IS, FID, sFID, precision, recall), FVD
    anytime.py    the any-time sweep: metric and cost at each L -> anytime.csv + anytime.png"""
from .load import Loaded, load
from .samples import SampleSet, gather_set, sample_set
from .scoring import Scorer

__all__ = ["Loaded", "load", "SampleSet", "gather_set", "sample_set", "Scorer"]
