"""Digits studies: the demo (`python -m studies.demo`) and the reproduction (`python -m studies.reproduce`)
train several models over several seeds through the real trainer, measure each at every loop count, and
check the claims docs/results.md and the README report over the seeds.

Outside the installed package on purpose: this code serves this repository only. It reads recipes/ and runs
data_prep/tokenize.py from the checkout (runs.ROOT), writes the committed results in docs/ and the README's
result blocks, so it works only from a checkout: run it from the repository root, `python -m studies.<module>`.
It imports elt_scale like any user would; nothing in elt_scale/ imports it (tests/unit/test_layers.py checks),
and pyproject.toml's package list (elt_scale*, data_prep*) leaves it out of a wheel.

    runs.py      which models, seeds and shards; training them in parallel processes
    measure.py   held-out loss at every L, the any-time sweep (samples scored by the digits classifier)
    results.py   per-seed CSV, mean and spread per model and L, tables, plot with error bars, provenance
    claims.py    each claim a named check over the seeds: PASS/FAIL, with the evidence
    readme.py    the result sections of docs/results.md and the README, generated from docs/*.json (a test
                 checks them)
    demo.py      the demo: masked ELT with ILSD vs vanilla looped training
    reproduce.py both claims, both families, against plain baselines"""
