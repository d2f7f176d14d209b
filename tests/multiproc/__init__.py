"""Several processes (`make test-multiproc`): the DeepSpeed launcher, torchrun or torch.multiprocessing with
gloo on CPU (ZeRO stages, resume on another layout, heartbeats, 2 ranks = 1 for sampling and evaluation)."""
