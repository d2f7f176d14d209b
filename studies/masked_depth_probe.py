"""Probe (issue 40): does depth help a plain masked model at all? A bare training loop with the library's
MaskedELT and MaskedObjective (cosine mask schedule, class dropout 0.1, AdamW with the digits recipe's betas and
weight decay, warmup 20 then cosine), one thread, no DeepSpeed: minutes per run, for sizing questions before the
real trainer (studies.mosaic_explore) is asked. Not the trainer: its numbers are indications, not results.

    python -m studies.masked_depth_probe --layers 8 --steps 1600 [--width 64] [--lr 2e-3] [--task digits]

Tasks: `digits` (8x8, class = digit); `pair_same` (two digits side by side, the same class, label = class);
`pair_copy_nolabel` (the same, label 0: the second cell's class must be read off the first); `pair_succ` (the
second digit = first + label mod 10). Prints one JSON row: held-out masked loss with the true label (`val`), on
as many train images (`train`), and with label + 5 mod 10 (`wrong`: equal to `val` when the label is unused).
"""
import argparse
import sys, time, math, torch, numpy as np, json
from sklearn.datasets import load_digits
from elt_scale.models import MaskedELT
from elt_scale.objectives import MaskedObjective, masked_ce, random_mask


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2); p.add_argument("--steps", type=int, default=400)
    p.add_argument("--width", type=int, default=64); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug", default="none"); p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--task", default="digits"); p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    d = load_digits(); X = d.images.astype(np.int64); Y = d.target
    idx = np.arange(len(X)); val = idx % 10 == 0
    Xtr, Ytr, Xva, Yva = torch.tensor(X[~val]), torch.tensor(Y[~val]), torch.tensor(X[val]), torch.tensor(Y[val])
    def make(task, Xs, Ys, n, g):
        if task == "digits":
            i = torch.randint(len(Xs), (n,), generator=g); return Xs[i], Ys[i]
        if task == "pair_same":   # two cells, same class digit, different instance; label = class
            i = torch.randint(len(Xs), (n,), generator=g)
            yy = Ys[i]; j = torch.stack([torch.nonzero(Ys == c).flatten()[torch.randint(int((Ys==c).sum()), (1,), generator=g)][0] for c in yy])
            return torch.cat([Xs[i], Xs[j]], 2), yy
        if task == "pair_copy_nolabel":  # two cells same class, label random (uninformative): must recognise cell 1
            i = torch.randint(len(Xs), (n,), generator=g)
            yy = Ys[i]; j = torch.stack([torch.nonzero(Ys == c).flatten()[torch.randint(int((Ys==c).sum()), (1,), generator=g)][0] for c in yy])
            return torch.cat([Xs[i], Xs[j]], 2), torch.zeros_like(yy)
        if task == "pair_succ":  # second cell digit = first+label mod 10
            i = torch.randint(len(Xs), (n,), generator=g); lab = torch.randint(10, (n,), generator=g)
            tgt = (Ys[i] + lab) % 10
            j = torch.stack([torch.nonzero(Ys == c).flatten()[torch.randint(int((Ys==c).sum()), (1,), generator=g)][0] for c in tgt])
            return torch.cat([Xs[i], Xs[j]], 2), lab
        raise SystemExit(task)
    def aug(x, g):
        if a.aug == "shift":
            s = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=s, dims=(1, 2))
        return x
    torch.manual_seed(a.seed); g = torch.Generator().manual_seed(a.seed)
    gv = torch.Generator().manual_seed(123)
    xv, yv = make(a.task, Xva, Yva, 2000 if a.task != "digits" else len(Xva), gv) if a.task != "digits" else (Xva, Yva)
    grid = list(xv.shape[1:])
    m = MaskedELT(17, grid, 10, a.width, 4, a.layers, 1)
    obj = MaskedObjective(17, 10, 0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.96), weight_decay=0.045)
    def evalloss(x, y, seed=0):
        m.eval(); gg = torch.Generator().manual_seed(seed); tot = cnt = 0
        with torch.no_grad():
            for r in range(2):
                for i in range(0, len(x), 256):
                    xb, yb = x[i:i+256], y[i:i+256]
                    mask = random_mask(xb, gg).view_as(xb)
                    inp = torch.where(mask, torch.full_like(xb, 17), xb)
                    lo = m(inp, yb)[0]
                    tot += masked_ce(lo, xb.flatten(1), mask.flatten(1)).item() * mask.sum().item(); cnt += mask.sum().item()
        m.train(); return tot / cnt
    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * min(1, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for pg in opt.param_groups: pg["lr"] = lr
        xb, yb = make(a.task, Xtr, Ytr, a.batch, g); xb = aug(xb, g)
        pr = obj.prepare(xb, yb, g)
        loss = obj.gt(m(*pr.inputs)[0], pr)
        opt.zero_grad(); loss.backward(); opt.step()
    xt, yt = (Xtr[:len(xv)], Ytr[:len(xv)]) if a.task == "digits" else make(a.task, Xtr, Ytr, 2000, torch.Generator().manual_seed(7))
    res = dict(vars(a), val=round(evalloss(xv, yv), 4), train=round(evalloss(xt, yt), 4), wrong=round(evalloss(xv, (yv + 5) % 10), 4), wall=round(time.time()-t0))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
