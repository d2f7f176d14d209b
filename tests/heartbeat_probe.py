"""One rank's heartbeat, without the training around it: `python tests/heartbeat_probe.py RANK WORLD TIMEOUT_S
RUN_S`, with MASTER_ADDR/MASTER_PORT set. Rank 0 hosts the rendezvous store in its own process (as env:// does
under srun and the deepspeed launcher) unless TORCHELASTIC_USE_AGENT_STORE=True says that another process
(torchrun's agent, or a test's stand-in) hosts it. Each rank prints "ready", waits for the file PROBE_GO (every
rank ready: as init_distributed's rendezvous lines them up), starts its heartbeat ("beating"), "trains" for
RUN_S seconds, stops it, prints "finished" and leaves as elt-train's run() does (os._exit): exit 0, or the
heartbeat's 124 if it ended the rank."""
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from elt_scale.engine.heartbeat import Heartbeat


def main() -> None:
    rank, world, timeout_s, run_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    store = None
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":   # what env:// makes on rank 0
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    print("ready", flush=True)
    go = Path(os.environ["PROBE_GO"])
    while not go.exists():
        time.sleep(0.05)
    start = time.monotonic()
    heartbeat = Heartbeat(rank, world, timeout_s, lambda: "training", lambda: int(time.monotonic() - start))
    print("beating", flush=True)
    time.sleep(run_s)
    heartbeat.stop()
    print("finished", flush=True)
    del store
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
