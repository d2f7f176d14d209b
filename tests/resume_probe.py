"""elt-train, unchanged, with Adam's state observed by parameter name: run it like `python -m elt_scale.train`
(directly or under the DeepSpeed launcher) with ELT_PROBE_DIR set. Rank 0 writes there

    saved_<step>.pt  right after each checkpoint save      loaded.pt  right after a cross-layout load

each {name: {"fp32", "exp_avg", "exp_avg_sq"}} plus {"step": Adam's step counts}, assembled through
DeepSpeed's public getters (collective: every rank calls them), independently of the universal conversion."""
import os
import sys
from pathlib import Path

import torch

from elt_scale import train
from elt_scale.engine import checkpoint as ckpt
from elt_scale.engine import universal


def adam_state(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if isinstance(engine.optimizer, torch.optim.Optimizer):          # stage 0 in fp32: our optimizer, unwrapped
        out = {name: {"fp32": p.detach().clone(), **{k: engine.optimizer.state[p][k].clone()
                                                     for k in ("exp_avg", "exp_avg_sq")}}
               for name, p in engine.module.named_parameters()}
        return out | {"step": sorted({float(s["step"]) for s in engine.optimizer.state.values()})}
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):   # ZeRO-1/2 link Adam's state to the getters lazily
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {name: {"fp32": safe_get_full_fp32_param(p).cpu().clone(),
                  **{k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in ("exp_avg", "exp_avg_sq")}}
           for name, p in engine.module.named_parameters()}
    out["step"] = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})
    return out


def dump(engine, name: str) -> None:
    state = adam_state(engine)
    if torch.distributed.get_rank() == 0:
        torch.save(state, Path(os.environ["ELT_PROBE_DIR"]) / name)


def spy(fn, after):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        after(out, *args)
        return out
    return wrapped


ckpt.save = spy(ckpt.save, lambda tag, engine, *_: dump(engine, f"saved_{int(tag.split('_')[1])}.pt"))
universal.load = spy(universal.load, lambda how, engine, *_: dump(engine, "loaded.pt"))

if __name__ == "__main__":
    train.run()
