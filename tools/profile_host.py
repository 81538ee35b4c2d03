#!/usr/bin/env python
"""Host (CPU) time of one moe_flashcomm.all_to_all call, where it goes (2 GPUs, NCCL).

Small messages are bound by the time the host takes to issue a call, not by the GPU. For a
few variants this times calls back to back with the host clock (the GPU keeps up at this
size) and profiles rank 0 with cProfile:

    python tools/profile_host.py --size 1M --hidden 7168 --calls 300 --out out/profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
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
    out = torch.empty_like(x)
    always_bf16 = mf.SizeGate({"nvlink": {"*": 1 << 40}})
    variants = {
        "nccl all_to_all_single": lambda: dist.all_to_all_single(out, x),
        "bf16 passthrough": lambda: mf.all_to_all(x, codec="bf16"),
        "int4 gated to bf16": lambda: mf.all_to_all(x, codec=4, gate=always_bf16),
        "int4 quantized": lambda: mf.all_to_all(x, codec=4, gate=False),
    }
    report = []
    for name, fn in variants.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) / args.calls * 1e6
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / args.calls * 1e6
        report.append(f"{name:>24}: host {host:7.1f} us/call, with the GPU {total:7.1f} us/call")
        if name == args.profile:  # every rank makes the same calls (collectives)
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
    ap.add_argument("--profile", default="int4 quantized", help="variant to profile")
    ap.add_argument("--out", default="out/profile")
    args = ap.parse_args()
    mp.spawn(_worker, args=(2, free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
