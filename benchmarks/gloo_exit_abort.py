"""How often a two-process gloo job aborts at interpreter exit, with and without
``torch.distributed.destroy_process_group()`` at the end.

No Lightning and none of this library: each launch starts two processes that join a gloo
process group, all-reduce a tensor 20 times (and, with ``--objects``, broadcast a small
object list, as Lightning does for ``trainer.log_dir``), then exit. A process that aborts
prints "terminate called without an active exception" (SIGABRT, exit code 134). This is the
evidence behind the README's advice to destroy the process group at the end of a DDP script.

    python benchmarks/gloo_exit_abort.py                 # 60 launches each way, ~3 min on 2 cores
    python benchmarks/gloo_exit_abort.py --launches 20 --objects
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

WORKER = """
import sys, torch, torch.distributed as dist
rank, port, destroy, objects = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
tensor = torch.ones(3)
for i in range(20):
    dist.all_reduce(tensor)
    if objects:
        dist.broadcast_object_list([{"step": i}], src=0)
if destroy:
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(destroy: bool, objects: bool) -> bool:
    """One two-process job; True when a process aborted."""
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = ["1" if destroy else "0", "1" if objects else "0"]
    processes = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(rank), port, *flags], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    aborted = False
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        if process.returncode != 0:
            aborted = True
            if "terminate called" not in stderr:
                raise RuntimeError(f"a worker failed for another reason (exit code {process.returncode}):\n{stderr[-2000:]}")
    return aborted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=60, help="two-process jobs per variant (default 60)")
    parser.add_argument("--objects", action="store_true", help="also broadcast a small object list each iteration")
    args = parser.parse_args()
    counts = {False: 0, True: 0}
    for _ in range(args.launches):  # alternate the variants so machine noise hits both alike
        for destroy in (False, True):
            counts[destroy] += launch(destroy, args.objects)
    import torch

    print(
        f"torch {torch.__version__}, {args.launches} two-process gloo launches per variant"
        + (", with broadcast_object_list" if args.objects else "")
    )
    print(f"without destroy_process_group(): {counts[False]} / {args.launches} aborted at exit")
    print(f"with    destroy_process_group(): {counts[True]} / {args.launches} aborted at exit")


if __name__ == "__main__":
    main()
