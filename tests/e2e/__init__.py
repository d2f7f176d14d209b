"""Whole pipelines that train for real (`make test-e2e`): the shortened demo and reproduction, elt-train runs
of hundreds of steps, storage faults under a running trainer, in-training evaluation across a resume. Some
also start several ranks (marked multiproc)."""
