"""Host (CPU) time per call of moe_flashcomm's wrappers against the torch.distributed
collective they issue, on tiny tensors: two real gloo processes on CPU.

On small messages back-to-back collectives are bound by host issue time, so the Python
wrapper's time per call shows in full (docs/benchmarks.md, "Why small messages miss the 5%
bound"). Here the tensors are tiny ([8, 64] bf16 by default), so the collective itself is
cheap and the difference ``ours - torch`` per call is the wrapper's host overhead.

Cases (the size gate's bf16 path is forced on CPU with a gate table for the "cpu" path,
``SizeGate({"cpu": {"*": 2**62}}, all_reduce={"cpu": {"*": 2**62}})``: what the default
gate does on GPU links for small messages; the default table never gates "cpu"):
  a2a gated        all_to_all(x) (int4 codec, gated to bf16: one uint8 all_to_all_single)
  a2a passthrough  all_to_all(x, codec="bf16") (one bf16 all_to_all_single)
  a2a grad         the same with x.requires_grad (autograd forward, no backward), against
                   all_to_all_single in a minimal autograd Function (DeepSpeed's _AllToAll)
  a2a async        all_to_all(x, async_op=True).wait(), against all_to_all_single's
  a2a int4         all_to_all(x, gate=False): quantized (includes the CPU reference codec)
  ar gated         all_reduce(x) (gated: dist.all_reduce)
  ar int4          all_reduce(x, gate=False): quantized (includes the CPU reference codec)
otherwise against ``dist.all_to_all_single(torch.empty_like(x), x)`` / ``dist.all_reduce(x)``.

Method: rounds of ``--calls`` back-to-back calls of torch, then of ours, then (``--before
DIR``) of the moe_flashcomm package of another checkout, e.g. a ``git archive`` of an older
commit (interleaved, so drift hits all alike); per-call time = round time / calls; median over ``--rounds`` rounds, the
slower rank's. Two clocks: wall time (``perf_counter``; on a 2-core machine it is mostly
gloo's loopback latency and scheduling, noisy) and the calling thread's CPU time
(``thread_time``: the host issue cost, what small collectives on a GPU are bound by; gloo's
own threads and the wait for the peer are not in it). ``--backend fake``: one process in a
world of 2 with torch's FakeProcessGroup, whose collectives complete at once and move
nothing, so a call's wall time is its host cost alone (the configuration check,
``check_consistent``, cannot run there and is skipped). ``--profile``: cProfile of the
gated all-to-all (plain and with autograd) and all-reduce on rank 0 (top functions by own
time).

    PYTHONPATH=$PWD python tools/bench_host_overhead.py [--backend gloo|fake] [--calls 200]
        [--rounds 15] [--before DIR] [--profile] [--json out.json]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib.util
import io
import json
import os
import pstats
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_call(fn, calls: int) -> tuple[float, float]:
    """(wall us, calling-thread CPU us) per call of ``calls`` back-to-back calls."""
    w, c = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return ((time.perf_counter() - w) / calls * 1e6, (time.thread_time() - c) / calls * 1e6)


class _TorchAllToAll(torch.autograd.Function):
    """The least a differentiable all-to-all costs: all_to_all_single in an autograd
    Function (as DeepSpeed's MoE ``_AllToAll``), the baseline of the "a2a grad" case."""

    @staticmethod
    def forward(ctx, x):
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, g):
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g.contiguous())
        return out


def _load_before(path: str):
    """The moe_flashcomm package of another checkout (``--before``), as
    ``moe_flashcomm_before`` (its imports are relative, so it runs its own code)."""
    name = "moe_flashcomm_before"
    if name not in sys.modules:
        init = os.path.join(path, "moe_flashcomm", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[os.path.dirname(init)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _packages(args) -> dict:
    import moe_flashcomm
    pkgs = {"ours": moe_flashcomm}
    if args.before:
        pkgs["before"] = _load_before(args.before)
    return pkgs


def _cases(shape, pkgs: dict) -> dict:
    """{case: {"torch": fn, "ours": fn, ["before": fn]}}."""

    big = 1 << 62
    x = torch.randn(*shape).to(torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    a2a_torch = lambda: dist.all_to_all_single(torch.empty_like(x), x)  # noqa: E731
    a2a_async = lambda: dist.all_to_all_single(torch.empty_like(x), x, async_op=True).wait()  # noqa: E731
    ar_torch = lambda: dist.all_reduce(x)  # noqa: E731
    cases = {
        "a2a gated": {"torch": a2a_torch},
        "a2a passthrough": {"torch": a2a_torch},
        "a2a grad": {"torch": lambda: _TorchAllToAll.apply(xg)},
        "a2a async": {"torch": a2a_async},
        "a2a int4": {"torch": a2a_torch},
        "ar gated": {"torch": ar_torch},
        "ar int4": {"torch": ar_torch},
    }
    for label, pkg in pkgs.items():
        a2a, ar = pkg.all_to_all, pkg.all_reduce
        gated = pkg.SizeGate({"cpu": {"*": big}}, source="bench", all_reduce={"cpu": {"*": big}})
        fns = {
            "a2a gated": lambda a2a=a2a, g=gated: a2a(x, gate=g),
            "a2a passthrough": lambda a2a=a2a: a2a(x, codec="bf16"),
            "a2a grad": lambda a2a=a2a, g=gated: a2a(xg, gate=g),
            "a2a async": lambda a2a=a2a, g=gated: a2a(x, gate=g, async_op=True).wait(),
            "a2a int4": lambda a2a=a2a: a2a(x, gate=False),
            "ar gated": lambda ar=ar, g=gated: ar(x, gate=g),
            "ar int4": lambda ar=ar: ar(x, gate=False),
        }
        for name, fn in fns.items():
            cases[name][label] = fn
    return cases


def _measure(rank, args, barrier, pkgs) -> dict:
    """{case: {impl: (wall us, calling-thread CPU us)}}: medians over the rounds; in every
    round each implementation runs ``calls`` calls back to back, one after the other."""
    torch.manual_seed(rank)
    cases = _cases(args.shape, pkgs)
    results = {}
    for name, fns in cases.items():
        if args.only and not any(o in name for o in args.only):
            continue
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        barrier()
        times: dict = {label: [] for label in fns}
        for _ in range(args.rounds):
            for label, fn in fns.items():
                times[label].append(_per_call(fn, args.calls))
        results[name] = {label: tuple(statistics.median(v) for v in zip(*t))
                         for label, t in times.items()}
    if args.profile:
        for name in ("a2a gated", "a2a grad", "ar gated"):
            ours = cases[name]["ours"]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls * 5):
                ours()
            prof.disable()
            if rank == 0:
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
                print(f"---- cProfile, {name}, {args.calls * 5} calls (rank 0) ----")
                print("\n".join(s.getvalue().splitlines()[4:]))
    return results


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        queue.put((rank, _measure(rank, args, dist.barrier, _packages(args))))
    finally:
        dist.destroy_process_group()


def _fake(args) -> dict:
    """One process, rank 0 of 2, on torch's FakeProcessGroup (collectives move nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    pkgs = _packages(args)
    skip = lambda *a, **k: None  # noqa: E731 - its all_gather would read garbage here
    for pkg in pkgs.values():
        for mod in ("autograd", "all_reduce"):
            setattr(sys.modules[f"{pkg.__name__}.comm.{mod}"], "check_consistent", skip)
    try:
        return {0: _measure(0, args, lambda: None, pkgs)}
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("gloo", "fake"), default="gloo")
    p.add_argument("--shape", type=int, nargs="+", default=[8, 64])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--only", nargs="*", default=None, help="case name substrings")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--before", default=None, metavar="DIR",
                   help="also time the moe_flashcomm of this checkout (e.g. a `git archive` of "
                        "an older commit), interleaved with the others")
    args = p.parse_args()
    if args.backend == "fake":
        got = _fake(args)
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, args, queue)) for r in range(2)]
        for proc in procs:
            proc.start()
        got = dict(queue.get() for _ in procs)
        for proc in procs:
            proc.join()
    print(f"torch {torch.__version__}, {args.backend}, world 2, x {args.shape} bf16, "
          f"{args.calls} calls x {args.rounds} rounds (median, slower rank), us per call")
    labels = [lb for lb in ("torch", "before", "ours") if lb in got[0][next(iter(got[0]))]]
    table = {}
    for clock, title in ((1, "calling thread CPU"), (0, "wall")):
        print(f"-- {title}: " + ", ".join(labels) + "; then overhead = impl - torch")
        print(f"{'case':18s}" + "".join(f" {lb:>9s}" for lb in labels)
              + "".join(f" {'+' + lb:>9s}" for lb in labels[1:]))
        for name in got[0]:
            v = {lb: max(got[r][name][lb][clock] for r in got) for lb in labels}
            row = table.setdefault(name, {})
            for lb in labels:
                row[f"{lb}_{'cpu' if clock else 'wall'}_us"] = round(v[lb], 2)
            print(f"{name:18s}" + "".join(f" {v[lb]:9.1f}" for lb in labels)
                  + "".join(f" {v[lb] - v['torch']:9.1f}" for lb in labels[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=args.backend, shape=args.shape, calls=args.calls,
                           rounds=args.rounds, torch=torch.__version__, before=args.before,
                           results=table), f, indent=1)


if __name__ == "__main__":
    main()
