#!/usr/bin/env python
"""Where the time of a peer-to-peer all-to-all goes (2 GPUs on NVLink; comm/p2p.py).

Per codec, for one rank's share of a per-rank message (even splits: half of the rows go to
the peer), times each stage alone with CUDA events (10 calls back to back, median of 5,
the slower rank's):

  encode local   records into this GPU's memory         decode        records -> tokens
  encode remote  records straight into the peer's       own copy      rows this rank keeps
  copy remote    local records -> the peer (torch copy)  barrier       the flag exchange alone
  call           moe_flashcomm.all_to_all (gate off), as configured, then with every peer's
                 records stored by the encode kernel / moved by the copy engine
  nccl           all_to_all_single, bf16

    python tools/p2p_stages.py --size 256M --hidden 7168 --codecs int8,int4,int2 --out out/p2p
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchlib import burst_ms, codec_of, free_port, parse_size  # noqa: E402


def _time(fn) -> float:
    """burst_ms of ``fn`` on both ranks started together, the slower rank's."""
    t = torch.tensor([burst_ms(fn, before=dist.barrier)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import moe_flashcomm as mf
    from moe_flashcomm.comm import p2p
    from moe_flashcomm.comm.exchange import decode, encode
    H = args.hidden
    T = parse_size(args.size) // (2 * H) // world * world
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    half = T // world
    peer, mine = x[(1 - rank) * half:(2 - rank) * half], x[rank * half:(rank + 1) * half]
    out = torch.empty_like(x)
    bufs = p2p.peer_buffers(None, rank, world, torch.device("cuda", rank))
    rows = []
    rows.append(dict(stage="nccl", ms=_time(lambda: dist.all_to_all_single(out, x))))
    rows.append(dict(stage="own copy", ms=_time(lambda: out[:half].copy_(mine))))
    for name in args.codecs.split(","):
        c = codec_of(name)
        rec = encode(peer, c)
        nbytes = rec.numel()
        bufs.reserve(nbytes)
        remote = bufs.region(1 - rank, 0, rank, nbytes).view(half, -1)
        copier = torch.cuda.Stream()

        def pipelined(k: int) -> None:
            """encode chunk i on this stream while the copy engine moves chunk i-1"""
            cur = torch.cuda.current_stream()
            for i in range(k):
                a, b = half * i // k, half * (i + 1) // k
                encode(peer[a:b], c, out=rec[a:b])
                copier.wait_stream(cur)
                with torch.cuda.stream(copier):
                    remote[a:b].copy_(rec[a:b])
            cur.wait_stream(copier)

        stages = {
            "encode+copy x1": lambda: pipelined(1),
            "encode+copy x4": lambda: pipelined(4),
            "encode local": lambda: encode(peer, c, out=rec),
            "encode remote": lambda: encode(peer, c, out=remote),
            "copy remote": lambda: remote.copy_(rec),
            "decode": lambda: decode(rec, c, H, x.dtype, out=out[:half]),
            "barrier": lambda: (bufs.begin(), bufs.barrier()),
            "call": lambda: mf.all_to_all(x, codec=c, gate=False),
            "call, stores": lambda: mf.all_to_all(x, codec=c, gate=False),
            "call, copy eng.": lambda: mf.all_to_all(x, codec=c, gate=False),
        }
        default = os.environ.get("MOE_FLASHCOMM_P2P_COPY_MB", "64")
        for stage, fn in stages.items():
            os.environ["MOE_FLASHCOMM_P2P_COPY_MB"] = {"call, stores": "1000000",
                                                       "call, copy eng.": "0"}.get(stage, default)
            rows.append(dict(stage=stage, codec=name, ms=_time(fn), wire_mb=nbytes / 1e6))
        os.environ["MOE_FLASHCOMM_P2P_COPY_MB"] = default
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "p2p_stages.json").write_text(json.dumps(dict(
            size=args.size, hidden=H, tokens=T, rows=rows, device=torch.cuda.get_device_name(0)), indent=1))
        print(f"{args.size} per rank, hidden {H}, {half} rows to the peer")
        for r in rows:
            gbs = f"{r['wire_mb'] / r['ms']:7.1f} GB/s of records" if "wire_mb" in r else ""
            print(f"  {r.get('codec', ''):>5} {r['stage']:>14}: {r['ms']:.4f} ms  {gbs}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--codecs", default="int8,int4,int2")
    ap.add_argument("--out", default="out/p2p")
    args = ap.parse_args()
    mp.spawn(_worker, args=(2, free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
