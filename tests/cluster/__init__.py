"""The real two-node Slurm cluster on loopback (`make test-cluster`; tests/slurm_cluster.py, marked slurm)."""
