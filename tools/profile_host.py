#!/usr/bin/env python
"""Host (CPU) time of one moe_flashcomm.all_to_all call, where it goes (2 GPUs, NCCL).

Small messages are bound by the time the host takes to issue a call, not by the GPU. For a
few variants (NCCL's all_to_all_single and all_reduce, and ours, gated to them or not) this
times rounds of calls back to back with the host clock, the variants interleaved round by
round (the GPU keeps up at small sizes), and profiles one variant on rank 0 with cProfile:

    python tools/profile_host.py --size 1M --hidden 7168 --calls 300 --out out/profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchlib import free_port, parse_size  # noqa: E402


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import moe_flashcomm as mf
    H = args.hidden
    T = max(world, parse_size(args.size) // (2 * H) // world * world)
    x = torch.randn(T, H, device="cuda").bfloat16()
    y = torch.zeros(T * H, device="cuda", dtype=torch.bfloat16)  # all-reduce: same bytes, sums stay 0
    always_bf16 = mf.SizeGate({"nvlink": {"*": 1 << 40}}, all_reduce={"nvlink": {"*": 1 << 40}})
    variants = {
        "nccl all_to_all_single": lambda: dist.all_to_all_single(torch.empty_like(x), x),
        # the same with async_op=True, then wait(): NCCL on its own stream, a tracked work
        "nccl a2a async+wait": lambda: dist.all_to_all_single(torch.empty_like(x), x,
                                                               async_op=True).wait(),
        "bf16 passthrough": lambda: mf.all_to_all(x, codec="bf16"),
        "int4 gated to bf16": lambda: mf.all_to_all(x, codec=4, gate=always_bf16),
        "int4 quantized": lambda: mf.all_to_all(x, codec=4, gate=False),
        "nccl all_reduce": lambda: dist.all_reduce(y),
        "nccl ar async+wait": lambda: dist.all_reduce(y, async_op=True).wait(),
        "all_reduce int4 gated": lambda: mf.all_reduce(y, codec=4, gate=always_bf16),
    }
    for fn in variants.values():  # warm up: compile, check configurations, set up buffers
        for _ in range(20):
            fn()
    host = {name: [] for name in variants}
    total = {name: [] for name in variants}
    for r in range(args.rounds):  # interleaved, so drift hits every variant alike
        for name, fn in variants.items():
            torch.cuda.synchronize()
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            host[name].append((time.perf_counter() - t0) / args.calls * 1e6)
            torch.cuda.synchronize()
            total[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    report = [f"host time per call (us): median of {args.rounds} interleaved rounds of "
              f"{args.calls} back-to-back calls, rank {rank}"]
    for name in variants:
        report.append(f"{name:>24}: host {statistics.median(host[name]):7.1f} us/call "
                      f"(rounds {min(host[name]):.1f}..{max(host[name]):.1f}), with the GPU "
                      f"{statistics.median(total[name]):7.1f} us/call")
    if args.profile in variants:  # every rank makes the same calls (collectives)
        fn = variants[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        report.append(s.getvalue())
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        text = f"{args.size} per rank, hidden {H}, {T} tokens\n" + "\n".join(report)
        print(text)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_host.txt").write_text(text)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1M")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--profile", default="int4 quantized", help="variant to profile ('none': none)")
    ap.add_argument("--out", default="out/profile")
    args = ap.parse_args()
    mp.spawn(_worker, args=(2, free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
