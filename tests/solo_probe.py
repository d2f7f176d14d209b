"""One rank of a solo() call, without the training around it: `python tests/solo_probe.py RANK WORLD DEADLINE_S
WORK`, with MASTER_ADDR/MASTER_PORT set; a gloo process group as elt-train's (env://: rank 0 hosts the store).
Rank 0 does WORK alone: `raise:<module>:<class>` raises that exception with the message "the probe's own
failure", `sleep:<seconds>` sleeps. Every rank then leaves at once as elt-train does, with the exit code
train.py gives the exception it raised (EXIT_CODES, then the user errors and resume refusals: 2, else 1) and
one line "raised <class>: <message>" on stderr; 0 and "returned" without one."""
import importlib
import os
import sys
import time

import torch


def exit_code(e: BaseException) -> int:
    from elt_scale.engine.resume import BatchMismatch, ResumeRefused
    from elt_scale.train import EXIT_CODES, USER_ERRORS
    code = next((c for kind, c in EXIT_CODES.items() if isinstance(e, kind)), None)
    if code is not None:
        return code
    return 2 if isinstance(e, (*USER_ERRORS, BatchMismatch, ResumeRefused)) else 1


def work(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
        return
    module, _, name = arg.partition(":")
    raise getattr(importlib.import_module(module), name)("the probe's own failure")


def main() -> None:
    rank, world, deadline_s, spec = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from elt_scale.engine.distributed import solo
    try:
        solo(lambda: work(spec), "doing the probe's work", deadline_s)
        code = 0
        print("returned", flush=True)
    except Exception as e:                            # noqa: BLE001 -- whatever it is, it is the result
        code = exit_code(e)
        print(f"raised {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
