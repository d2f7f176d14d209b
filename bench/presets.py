"""Paper-shaped workloads for the benchmarks, as recipe overrides on top of the defaults (or a recipe)."""

_COMMON = ["deepspeed.zero_stage=2", "train.bf16=true", "train.steps=100000", "train.warmup_steps=10",
           "train.lr=1e-4", "model.num_classes=1000", "model.heads=16", "train.micro_batch=64"]
PRESETS = {   # the workloads (paper shapes); every value can be overridden on the command line
    "elt-l-masked": _COMMON + ["model.family=masked", "model.width=1024", "model.unique_layers=8",
                               "model.loops=3", "model.grid=[16,16]", "model.vocab_size=1024",
                               "train.betas=[0.9,0.96]", "train.weight_decay=0.045"],
    "elt-xl-masked": _COMMON + ["model.family=masked", "model.width=1152", "model.unique_layers=7",
                                "model.loops=4", "model.grid=[16,16]", "model.vocab_size=1024"],
    "elt-xl-diffusion": _COMMON + ["model.family=diffusion", "model.width=1152", "model.unique_layers=7",
                                   "model.loops=4", "model.grid=[32,32]", "model.channels=4",
                                   "model.patch_size=2", "train.ema_decay=0.9999"],   # as the DiT recipes
}
TINY = ["model.width=32", "model.heads=2", "model.unique_layers=2", "model.loops=3", "model.num_classes=10",
        "train.micro_batch=4", "model.vocab_size=16"]
TINY_GRID = {"masked": ["model.grid=[4,4]"], "diffusion": ["model.grid=[8,8]", "model.patch_size=2"]}
