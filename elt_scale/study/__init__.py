"""Digits studies: the demo (`python -m elt_scale.demo`) and the reproduction (`python -m elt_scale.reproduce`)
train several models over several seeds through the real trainer, measure each at every loop count, and
check the claims docs/results.md and the README report over the seeds.

    runs.py      which models, seeds and shards; training them in parallel processes
    measure.py   held-out loss at every L, the any-time sweep (samples scored by the digits classifier)
    results.py   per-seed CSV, mean and spread per model and L, tables, plot with error bars, provenance
    claims.py    each claim a named check over the seeds: PASS/FAIL, with the evidence
    readme.py    the result sections of docs/results.md and the README, generated from docs/*.json (a test checks them)"""
