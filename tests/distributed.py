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
import signal
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait as wait_any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_flashcomm.tune_gate import free_port


def _mark(marks: str, what: str, rank: int, text: str = "") -> None:
    with open(os.path.join(marks, f"{what}.{rank}"), "w") as f:
        f.write(text)


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
    _mark(marks, "joined", rank)  # this rank got past the rendezvous
    try:
        fn(rank, world_size, *args)
        dist.destroy_process_group()
    except BaseException:
        # when, on the clock every process shares (file times are too coarse to order ranks)
        _mark(marks, "failed", rank, f"{time.monotonic_ns()}\n{traceback.format_exc()}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the traceback is in the mark; the peers may be stuck in a collective
    _mark(marks, "passed", rank)


def _exit_name(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _run_once(fn, world_size, args, backend, env, timeout, marks):
    """Start the ranks and wait for all of them (the first failure ends the others after a
    short grace). Returns {rank: exit code}."""
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_worker,
                             args=(r, world_size, port, backend, env, fn, args, marks))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline, grace = time.monotonic() + timeout, None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish "
                                   f"within {timeout:g} s")
            if grace is not None and now >= grace:
                break
            wait_any([p.sentinel for p in procs if p.is_alive()],
                     timeout=min(1.0, deadline - now))
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                      and not os.path.exists(os.path.join(marks, f"passed.{r}"))]
            if failed and grace is None:
                grace = time.monotonic() + 10  # the others may still report their own error
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return {r: p.exitcode for r, p in enumerate(procs)}


def spawn(fn, world_size: int, *args, backend: str = "gloo", env: dict | None = None,
          timeout: float = 900) -> None:
    """Run ``fn`` in ``world_size`` processes, killed after ``timeout`` seconds (a hard
    limit: a hang fails the test instead of stalling the run).

    A rank passes when ``fn`` and ``destroy_process_group`` return, or when it leaves with
    exit code 0 (``os._exit(0)``). Two failures that are not the test's are tolerated:
    - a start that dies before every rank has joined the process group (the rendezvous on a
      free port lost a race, or the store's thread aborted: rare on shared CI machines) is
      retried once on a new port;
    - a rank that aborts in interpreter teardown after it passed is reported as a warning.
      Gloo processes rarely do ("terminate called without an active exception"; in CI on
      2026-12-04, and about once in 50 runs of a DeepSpeed test here under load). A core
      dump shows why: a gloo worker thread drops the last reference to a finished
      all-to-all's work while the interpreter finalizes; freeing the tensors it holds needs
      the GIL, which a thread other than the main one cannot take then, so the thread is
      unwound through a noexcept frame. The groups DeepSpeed keeps live until then; the
      library's own exchanges hold their latest work (frame.Framing.last_work).
    """
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as marks:
            codes = _run_once(fn, world_size, args, backend, env or {}, timeout, marks)

            def has(what, rank):
                return os.path.exists(os.path.join(marks, f"{what}.{rank}"))

            failed = []
            for r in range(world_size):
                if has("failed", r):
                    with open(os.path.join(marks, f"failed.{r}")) as f:
                        when, report = f.read().split("\n", 1)
                    failed.append((int(when), r, report))
            if failed:  # the first to fail is the cause; the others often only saw it go
                raise AssertionError("\n".join(f"rank {r} of {world_size} failed in "
                                               f"{fn.__name__}:\n{report}"
                                               for _, r, report in sorted(failed)))
            broken = {r: c for r, c in codes.items() if c != 0 and not has("passed", r)}
            if not broken:
                for r, c in codes.items():
                    if c != 0:
                        warnings.warn(f"rank {r} passed, then ended with {_exit_name(c)} in "
                                      f"interpreter teardown")
                return
            if attempt == 0 and not all(has("joined", r) for r in range(world_size)):
                warnings.warn(f"{world_size} processes died before joining the process "
                              f"group; starting them again on another port")
                continue
            raise RuntimeError("; ".join(f"rank {r} ended with {_exit_name(c)} before it "
                                         f"passed" for r, c in broken.items())
                               + f" in {fn.__name__} (its output is above)")
