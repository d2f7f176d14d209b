"""Fast tier (`make test-fast`, the inner loop): one process, no launcher. Tests run in the pytest process, or
start one child that does not train for long (a CLI that exits 2 at start-up, a tokenizer, elt-plan, a local
http server, a training run of a few steps); each takes seconds. Nothing here is marked multiproc or slurm."""
