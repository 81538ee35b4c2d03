"""What the per-peer headers of exchanges over gloo cost (comm/frame.py): the same
all-to-all with and without them, in the same run, alternating call by call.

Two (or --world) CPU processes on gloo. Per size (bf16 bytes per rank) and codec it prints
the wall time of one exchange framed and unframed (median of --reps alternating pairs),
their ratio, and the header bytes against the payload bytes. The unframed exchange is the
library's own path with the framing switched off (its route without a Framing), so the
difference is the headers' cost alone: building and checking them, the frame-sized
receive, and the copies into and out of the framed buffers. It also prints the headers' own
host work (built, checked; no transport) measured in one process, free of the other rank's
noise, also for groups of 4 to 16 ranks, and each step of a framed raw exchange timed in the
running exchange (where the other rank and gloo's threads compete for the cores). Last, the
backend's sum over gloo ("native" all_reduce, framed) against gloo's own all_reduce.

    python tools/bench_frame.py --out docs/data/bench_frame.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_flashcomm as mf  # noqa: E402
from moe_flashcomm.comm.exchange import cached_plan, exchange  # noqa: E402
from moe_flashcomm.comm.frame import HEADER_BYTES, Frame, Leg  # noqa: E402
from moe_flashcomm.comm.topology import LinkCodecs  # noqa: E402

from benchlib import HelpFormatter, check_out, free_port, positive_int  # noqa: E402

H = 1024
SIZES = [64 << 10, 1 << 20, 4 << 20]
CODECS = {"bf16": "bf16", "int4": 4}


def _worker(rank: int, world: int, port: int, reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = mf.Communicator(gate=False)
    rows = []
    for size in SIZES:
        tokens = size // (2 * H) // world * world
        x = torch.randn(tokens, H).to(torch.bfloat16)
        split = (tokens // world,) * world
        for name, codec in CODECS.items():
            framed = comm.route(LinkCodecs.coerce(codec, "codec"), "cpu")
            plain = dataclasses.replace(framed, framing=None, plans={})
            times = {"framed": [], "plain": []}
            for i in range(reps + 5):
                for kind, route in (("framed", framed), ("plain", plain))[::1 if i % 2 else -1]:
                    dist.barrier()
                    t = time.perf_counter()
                    exchange(x, split, split, route, uniform=True).wait()
                    if i >= 5:
                        times[kind].append(time.perf_counter() - t)
            payload = (tokens // world) * H * 2 if name == "bf16" else \
                (tokens // world) * mf.codec.record_bytes(H, mf.CodecConfig(bits=4))
            f_us = statistics.median(times["framed"]) * 1e6
            p_us = statistics.median(times["plain"]) * 1e6
            work_us = _header_work_us(comm, rank, world, tokens // world, H, payload)
            rows.append(dict(bytes_per_rank=size, codec=name, framed_us=round(f_us, 1),
                             plain_us=round(p_us, 1), ratio=round(f_us / p_us, 4),
                             header_work_us=round(work_us, 2),
                             header_bytes_per_peer=HEADER_BYTES, payload_bytes_per_peer=payload,
                             header_share=round(HEADER_BYTES / payload, 6)))
            if rank == 0:
                r = rows[-1]
                print(f"{size >> 10:>6} KiB {name:>5}: framed {f_us:8.1f} us  plain {p_us:8.1f} us"
                      f"  ratio {r['ratio']:.3f}  header work {work_us:5.1f} us"
                      f"  header {HEADER_BYTES} B / {payload} B per peer", flush=True)
    # the header work of larger groups (no transport: it needs no more processes), 1 MiB of
    # bf16 per rank sent as raw rows
    by_world = {}
    if rank == 0:
        for w in (2, 4, 8, 16):
            share = (1 << 20) // w  # bytes per peer
            by_world[w] = round(_header_work_us(comm, 0, w, share // (2 * H), H, share), 2)
        print("header work by group size, 1 MiB bf16 per rank: " + ", ".join(
            f"{w} ranks {us:.1f} us" for w, us in by_world.items()), flush=True)
    parts = _framed_parts(comm, rank, world, reps)
    sums = _backend_sums(comm, rank, reps)
    if rank == 0 and out:
        meta = dict(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"), world=world,
                    machine=f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores", torch=torch.__version__, reps=reps)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(meta=meta, rows=rows, all_reduce=sums,
                                             raw_parts=parts, header_work_by_world=by_world),
                                        indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    comm.close()
    dist.destroy_process_group()


def _backend_sums(comm, rank: int, reps: int) -> list:
    """The backend's sum over gloo ("native", and the gated path): framed (a reduce-scatter
    and an all-gather with headers) against gloo's own all_reduce, alternating."""
    rows = []
    for size in [4 << 10] + SIZES:
        x = torch.randn(size // 4)  # fp32 values
        times = {"framed": [], "gloo": []}
        for i in range(reps + 5):
            for kind in ("framed", "gloo")[::1 if i % 2 else -1]:
                y = x.clone()
                dist.barrier()
                t = time.perf_counter()
                if kind == "framed":
                    comm.all_reduce(y, codec="native")
                else:
                    dist.all_reduce(y)
                if i >= 5:
                    times[kind].append(time.perf_counter() - t)
        f_us = statistics.median(times["framed"]) * 1e6
        g_us = statistics.median(times["gloo"]) * 1e6
        rows.append(dict(fp32_bytes=size, framed_us=round(f_us, 1), gloo_us=round(g_us, 1),
                         ratio=round(f_us / g_us, 4)))
        if rank == 0:
            print(f"all_reduce native {size >> 10:>6} KiB fp32: framed {f_us:8.1f} us  "
                  f"gloo {g_us:8.1f} us  ratio {f_us / g_us:.3f}", flush=True)
    return rows


def _framed_parts(comm, rank: int, world: int, reps: int) -> list:
    """Each step of a framed exchange of raw bf16 rows, timed inside the running exchange,
    against gloo's ``all_to_all_single`` of the tensor (the unframed exchange), median per
    step. The steps are those of ``exchange._framed_exchange`` for raw rows, written out
    here to time each one: a change there belongs here too."""
    rows = []
    route = comm.route(LinkCodecs.coerce("bf16", "codec"), "cpu")
    for size in SIZES[:2]:
        tokens = size // (2 * H) // world * world
        x = torch.randn(tokens, H).to(torch.bfloat16)
        split = (tokens // world,) * world
        plan = cached_plan(route, split, split, H, x.dtype, 1, True)
        sends, recvs, send_legs, recv_legs = plan.framed
        steps: dict = {}
        for i in range(reps + 5):
            dist.barrier()
            t = [time.perf_counter()]
            frame = Frame(route.framing, route.group, rank, world, "all_to_all", x.dtype, H,
                          send_legs, recv_legs)
            t.append(time.perf_counter())
            for p in frame.peers:
                row, n = sends[p][:2]
                frame.payload(p).copy_(x[row:row + n].view(torch.uint8).reshape(-1))
            t.append(time.perf_counter())
            frame.start()
            t.append(time.perf_counter())
            out = x.new_empty((plan.out_total, H))
            src, dst, n = plan.own
            out[dst:dst + n].copy_(x[src:src + n])
            t.append(time.perf_counter())
            frame.work.wait()
            t.append(time.perf_counter())
            got = frame.wait()  # the headers' check (the transfer is done)
            t.append(time.perf_counter())
            for p in frame.peers:
                row, n = recvs[p][:2]
                out[row:row + n].view(torch.uint8).view(-1).copy_(got[p])
            t.append(time.perf_counter())
            frame.release()
            t.append(time.perf_counter())
            dist.barrier()
            plain = torch.empty_like(x)
            start = time.perf_counter()
            dist.all_to_all_single(plain, x, async_op=True).wait()
            t.append(time.perf_counter() - start)
            if i >= 5:
                names = ("frame built", "rows copied in", "started", "own rows copied",
                         "transport", "headers checked", "rows copied out", "released")
                for name, a, b in zip(names, t[:-2], t[1:-1]):
                    steps.setdefault(name, []).append(b - a)
                steps.setdefault("framed total", []).append(t[-2] - t[0])
                steps.setdefault("unframed all_to_all_single", []).append(t[-1])
        us = {k: round(statistics.median(v) * 1e6, 1) for k, v in steps.items()}
        rows.append(dict(bytes_per_rank=size, steps_us=us))
        if rank == 0:
            print(f"framed raw bf16 {size >> 10} KiB, step by step (us): "
                  + ", ".join(f"{k} {v}" for k, v in us.items()), flush=True)
    return rows


class _NumberingKey:
    """Stands for a process group as a key of the numbering (weakly referenced, as groups)."""


def _header_work_us(comm, rank: int, world: int, rows: int, hidden: int, nbytes: int) -> float:
    """The headers' own host work per exchange, in this process alone (no transport): a
    Frame built and released (headers written) and every peer's header checked."""
    legs = [None if p == rank else Leg(rows, nbytes) for p in range(world)]
    pg = _NumberingKey()  # a key for the numbering only: nothing is sent
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        f = Frame(comm.framing, pg, rank, world, "all_to_all", torch.bfloat16, hidden, legs, legs)
        got = f.layout.expected.copy()  # what agreeing peers send
        got[:, 2] = f.number
        assert not f.problems(got)
        f.release()
    return (time.perf_counter() - start) / n * 1e6


def port_arg(text: str) -> int:
    """An argparse ``type``: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--world", type=positive_int, default=2, help="gloo processes, >= 2")
    ap.add_argument("--reps", type=positive_int, default=200,
                    help="timed calls per point and variant, after 5 warm-up calls; medians count")
    ap.add_argument("--port", type=port_arg, default=None,
                    help="the rendezvous port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--out", default="",
                    help="JSON file to write every measurement to (without it: printed only)")
    a = ap.parse_args(argv)
    if a.world < 2:
        ap.error(f"--world: expected an int >= 2 (an exchange between processes), got {a.world}")
    check_out(ap, a.out and Path(a.out))
    if a.port is None:
        a.port = free_port()
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    mp.start_processes(_worker, (a.world, a.port, a.reps, a.out), nprocs=a.world,
                       start_method="spawn")


if __name__ == "__main__":
    main()
