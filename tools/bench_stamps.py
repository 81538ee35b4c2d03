"""What the stamps of NCCL's exchanges cost: the encode side (send buffer) and decode side
(receive buffer) of a flat all-to-all of CUDA tensors, today's stamped layout against the
plain one it replaced (records of neighbouring peers merged, no stamps), on one GPU; with
``--op all_reduce``, the flat all-reduce's reduce-scatter: its encodes (one launch behind the
stamps against one encode per peer) and its fused reduction (checking the stamps or not).

The transfer itself is NCCL's and the same bytes but for 16 per pair, so it is left out: the
decode (or reduction) reads the send buffer back (every pair has the same rows, so the layouts
match), which also checks that both layouts give the same bits and that no stamp is
reported. One process; a group rank of ``--world`` sending ``size / world`` per peer, hidden
7168 (all-reduce: a tensor of ``size``, rows of 1024 values), ``--dtype`` (bf16). The
``bf16`` codec (the passthrough) needs fp32 tokens in the all-to-all (16-bit ones travel as
they are: no layouts, so it is timed by default only with ``--dtype fp32``): its casts are
p2p_exchange_cast's tasks, its all-reduce's reduction reduce_cast.

Per size (bf16 bytes per rank) and codec it prints, for each side and layout, host µs per call
(bursts queued behind a GPU sleep, the layouts taking turns, medians) and GPU µs per call
(CUDA events around bursts queued behind a GPU sleep: the kernels' time, not the host's), and
the stamps' share of the bytes.

    python tools/bench_stamps.py --out docs/data/bench_stamps.json
    python tools/bench_stamps.py --op all_reduce --out docs/data/bench_stamps_all_reduce.json
    python tools/bench_stamps.py --codecs bf16 --dtype fp32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_flashcomm as mf  # noqa: E402
from moe_flashcomm import kernels  # noqa: E402
from moe_flashcomm.codec import record_bytes  # noqa: E402
from moe_flashcomm.comm import all_reduce as AR  # noqa: E402
from moe_flashcomm.comm import exchange as X  # noqa: E402
from benchlib import HelpFormatter, burst_ms, check_out, fmt_size, positive_int, require_gpus  # noqa: E402

H = 7168
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
CODECS = {"int4": mf.CodecConfig(bits=4), "int8": mf.CodecConfig(bits=8),
          "fp8": mf.CodecConfig(bits="fp8"), "bf16": mf.CodecConfig(bits="bf16")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BURST, ROUNDS = 16, 31


def _gpu_sleep() -> None:
    """~1 ms of GPU work queued first, so what follows is timed without waiting on the host."""
    torch.cuda._sleep(2_000_000)


def _burst_us(fn) -> float:
    torch.cuda.synchronize()
    _gpu_sleep()  # the host runs ahead
    t = time.perf_counter()
    for _ in range(BURST):
        fn()
    return (time.perf_counter() - t) / BURST * 1e6


def _sides(x: torch.Tensor, world: int, cfg, rows: int, stamped: bool, pages: dict):
    """(encode, decode, wire bytes, output) of one layout of the all-to-all: callables of one
    call each (the output's, its tensor)."""
    route = X.Route(None, 0, world, (cfg,) * world, (0,) * world, pages=pages if stamped else None)
    counts = (rows,) * world
    plan = X.make_plan(route, counts, counts, H, x.dtype, 1, uniform=True)
    assert not plan.fast, "16-bit tokens with the passthrough travel as they are: no layouts"
    send_segs, send_splits, recv_segs, _ = plan.chunks[0]
    nbytes = sum(send_splits) * x.dtype.itemsize
    out = torch.zeros_like(x)  # (a rank's own rows are not in the exchange)
    call = X.stamped_call(route, plan, H, x.dtype, x.device) if stamped else None
    state = {}

    def encode():
        state["send"] = X._pack(x, send_segs) if call is None else call.pack(0, x, nbytes)

    def decode():
        if call is None:
            X._unpack(state["send"], recv_segs, out)
        else:
            call.unpack(0, state["send"], out)
    return encode, decode, nbytes, lambda: out


def _reduce_sides(x3: torch.Tensor, world: int, cfg, stamped: bool, pages: dict):
    """The same of the flat all-reduce's reduce-scatter as rank 0 of ``world`` (x3: [world,
    c, ROW], one piece): its send buffer, and the fused reduction of that buffer read back as
    the records received (the stamps it holds are the ones expected)."""
    c = x3.shape[1]
    plan = AR._Plan(False, world, 0, c, ((0, c),), cfg, cfg, stamped=stamped)
    comm = SimpleNamespace(group=None, rank=0, world=world, _pages=pages)
    call = AR._stamped_call(comm, plan, x3) if stamped else None
    stamp, rb = (kernels.STAMP_BYTES if stamped else 0), record_bytes(AR.ROW, cfg)
    state = {}

    def encode():
        state["send"] = AR._scatter_records(x3, 0, c, world, 0, cfg,
                                            None if call is None else (call, 0))

    def reduce():
        peers = state["send"][:, stamp:].view(world - 1, c, rb)
        state["out"] = AR.reduce_chunk(
            peers, x3[0], 0, cfg,
            check=None if call is None else AR.StampCheck(call.page.address, plan.numel))
    return encode, reduce, (world - 1) * (stamp + c * rb), lambda: state["out"]


def measure(world: int, size: int, name: str, cfg, pages: dict, op: str,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    if op == "all_reduce":
        rows = AR.rows_per_rank(size // 2, world)
        x = torch.randn(world, rows, AR.ROW, device="cuda").to(dtype)
        sides = {s: _reduce_sides(x, world, cfg, s == "stamped", pages)
                 for s in ("plain", "stamped")}
    else:
        rows = max(1, size // (2 * H) // world)
        x = torch.randn(rows * world, H, device="cuda").to(dtype)
        sides = {s: _sides(x, world, cfg, rows, s == "stamped", pages)
                 for s in ("plain", "stamped")}
    for enc, dec, _, _ in sides.values():
        enc()
        dec()
    torch.cuda.synchronize()
    plain_out, stamped_out = sides["plain"][3](), sides["stamped"][3]()
    assert torch.equal(plain_out, stamped_out), "the layouts give different bits"
    assert all(p.report() is None for p in pages.values()), "a stamp was reported"
    times: dict = {f"{s}_{side}": [] for s in sides for side in ("encode", "decode")}
    for _ in range(ROUNDS):
        for s, (enc, dec, _, _) in sides.items():
            times[f"{s}_encode"].append(_burst_us(enc))
            enc()
            times[f"{s}_decode"].append(_burst_us(dec))
    torch.cuda.synchronize()
    row = {"op": op, "size": size, "codec": name, "dtype": str(dtype), "world": world,
           "rows_per_peer": rows,
           "bytes_plain": sides["plain"][2], "bytes_stamped": sides["stamped"][2]}
    for k, v in times.items():
        row[f"{k}_host_us"] = statistics.median(v)
    for s, (enc, dec, _, _) in sides.items():
        for side, fn in (("encode", enc), ("decode", dec)):
            row[f"{s}_{side}_gpu_us"] = 1e3 * burst_ms(fn, _gpu_sleep, warmup=2, rounds=7)
    return row


def passthrough_as_is(op: str, dtype: str) -> bool:
    """Whether the bf16 codec's all-to-all sends ``dtype`` tokens as they are (no layouts)."""
    return op == "all_to_all" and DTYPES[dtype].itemsize == 2


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--op", default="all_to_all", choices=("all_to_all", "all_reduce"),
                    help="all_reduce: its reduce-scatter (the 'decode' side is the reduction)")
    ap.add_argument("--world", type=positive_int, default=8,
                    help="ranks in the group (2 or more), the one process playing rank 0; "
                         "all-to-all: size / world bytes to each peer")
    ap.add_argument("--codecs", nargs="+", default=None, choices=list(CODECS),
                    help=f"codecs to time (default {' '.join(CODECS)}; the all-to-all of 16-bit "
                         f"--dtype: no bf16)")
    ap.add_argument("--sizes", nargs="+", type=positive_int, default=SIZES, help="bf16 bytes per rank")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                    help="the tokens' (fp32 for the bf16 codec's all-to-all)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every row")
    a = ap.parse_args(argv)
    if a.world < 2:
        ap.error(f"--world: expected an int >= 2 (rank 0 and its peers), got {a.world}")
    if a.codecs is None:
        a.codecs = [c for c in CODECS if c != "bf16" or not passthrough_as_is(a.op, a.dtype)]
    elif "bf16" in a.codecs and passthrough_as_is(a.op, a.dtype):
        ap.error(f"--codecs bf16: with --dtype {a.dtype} the all-to-all sends the tokens as they "
                 f"are (no layouts to time); use --dtype fp32")
    check_out(ap, a.out)  # before the run, not after it
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    require_gpus()
    torch.cuda.init()
    pages: dict = {}
    launcher = "compiled" if kernels.KERNELS.native is not None else "ctypes"
    shape = f"rows of {AR.ROW}" if a.op == "all_reduce" else f"hidden {H}"
    print(f"{torch.cuda.get_device_name()}; {a.op}, world {a.world}, {shape}, {a.dtype}; launcher "
          f"{launcher}")
    receive = "reduce" if a.op == "all_reduce" else "decode"
    columns = [f"{side} {where} us" for where in ("host", "GPU") for side in ("encode", receive)]
    print(f"{'size':>9} {'codec':>5} | " + " | ".join(f"{c:>17}" for c in columns)
          + " | stamp bytes")
    print(f"{'':>9} {'':>5} | " + " | ".join(f"{'plain':>8} {'stamped':>8}" for _ in columns)
          + " |")
    rows = []
    for size in a.sizes:
        for name in a.codecs:
            r = measure(a.world, size, name, CODECS[name], pages, a.op, DTYPES[a.dtype])
            rows.append(r)
            extra = r["bytes_stamped"] - r["bytes_plain"]
            cells = [f"{r[f'plain_{k}_us']:8.1f} {r[f'stamped_{k}_us']:8.1f}"
                     for k in ("encode_host", "decode_host", "encode_gpu", "decode_gpu")]
            print(f"{fmt_size(size):>9} {name:>5} | " + " | ".join(cells)
                  + f" | {extra} B ({extra / r['bytes_plain']:.4%})", flush=True)
    for page in pages.values():
        page.close()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "launcher": launcher,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(["python", *sys.argv])}
        a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
