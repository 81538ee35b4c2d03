"""Run a function in real torch.distributed worker processes (no mocked collectives).

    spawn(fn, world_size, *args)          # gloo on CPU
    spawn(fn, 2, *args, backend="nccl")   # one GPU per rank

``fn(rank, world_size, *args)`` runs in every process after init_process_group; an
exception in any rank fails the caller with that rank's traceback. Extra environment
variables (e.g. LOCAL_WORLD_SIZE) can be passed with ``env``.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, env, fn, args, marks):
    faulthandler.enable()  # a crash in C++ (abort, segfault) still shows the Python stack
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    open(os.path.join(marks, str(rank)), "w").close()  # this rank got past the rendezvous
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo", env: dict | None = None,
          timeout: float = 900) -> None:
    """Run ``fn`` in ``world_size`` processes, killed after ``timeout`` seconds (a hard
    limit: a hang fails the test instead of stalling the run). A start that dies before
    every rank has joined the process group (the rendezvous on a free port lost a race, or
    the store's thread aborted: rare, seen on shared CI machines) is retried once on a new
    port; a failure after that is the test's."""
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as marks:
            try:
                context = mp.spawn(_worker, args=(world_size, free_port(), backend, env or {},
                                                  fn, args, marks),
                                   nprocs=world_size, join=False)
                deadline = time.monotonic() + timeout
                while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        for process in context.processes:
                            if process.is_alive():
                                process.kill()
                        raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish "
                                           f"within {timeout:g} s")
                return
            except mp.ProcessExitedException:
                if attempt or len(os.listdir(marks)) == world_size:
                    raise
                warnings.warn(f"{world_size} processes died before joining the process "
                              f"group; starting them again on another port")
