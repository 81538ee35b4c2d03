r"""Encode/decode bandwidth of the CUDA codec against a device-to-device copy in the same run.

GB/s counts bytes read + bytes written (encode: tokens in + records out; decode: records in +
tokens out; copy: 2x the tensor). Each point is the median over replays of a CUDA graph of
back-to-back launches, rotating over enough buffers to defeat the L2 cache for small sizes.

    python tools/bench_codec.py --out results/codec.json              # table, JSON and PNG
    python tools/bench_codec.py --out v.json --sizes 256 --encode-shapes 16x1 32x1 \
        --decode-shapes 8x2 32x1 --variants "" MFC_SCALAR_STATS          # kernel variants
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_flashcomm import CodecConfig, record_layout  # noqa: E402
from moe_flashcomm.codec import cuda as C  # noqa: E402

from benchlib import HelpFormatter, check_out, float_above, positive_int, pyplot, require_gpus  # noqa: E402

MiB = 2**20


def time_graph(fn, launches: int, replays: int) -> float:
    """Median seconds per call of fn(i), i = 0..launches-1, captured as one graph."""
    fn(0)  # warm-up: compile, load, allocate
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / launches)
    return statistics.median(times)


def buffers_needed(bytes_per_set: int, l2: int) -> int:
    """Buffer sets to rotate so that one pass touches >= 4x the L2 cache."""
    return max(1, math.ceil(4 * l2 / bytes_per_set))


def tokens(T: int, H: int, seed: int) -> torch.Tensor:
    """bf16 normal values with sparse 30x outliers, like activations."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g)
    x *= 1 + 30 * (torch.rand(T, H, device="cuda", generator=g) > 0.999)  # sparse outliers
    return x.to(torch.bfloat16)


def bench_copy(nbytes: int, l2: int, replays: int) -> dict:
    """GB/s of three device-to-device copies of nbytes: cudaMemcpy in a graph (a copy-engine
    node for large sizes), cudaMemcpy launched eagerly, and an SM kernel (x * 1)."""
    n = buffers_needed(2 * nbytes, l2)
    src = [tokens(1, nbytes // 2, seed=i) for i in range(n)]
    dst = [torch.empty_like(s) for s in src]
    out = dict(memcpy_graph=2 * nbytes / time_graph(lambda i: dst[i % n].copy_(src[i % n]), max(n, 10), replays) / 1e9,
               kernel_graph=2 * nbytes / time_graph(lambda i: torch.mul(src[i % n], 1, out=dst[i % n]), max(n, 10), replays) / 1e9)
    reps = max(n, 10)
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(reps):
            dst[i % n].copy_(src[i % n])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    out["memcpy_eager"] = 2 * nbytes / statistics.median(times) / 1e9
    out["best"] = max(out.values())
    return out


def bench_direction(direction: str, cfg: CodecConfig, H: int, nbytes: int, l2: int, replays: int,
                    shape, defines=()):
    """(GB/s, seconds per call) of encode or decode on bf16 tokens of nbytes."""
    T = max(1, nbytes // (2 * H))
    rb = record_layout(H, cfg).record_bytes
    set_bytes = T * H * 2 + T * rb  # read + written, either direction
    n = buffers_needed(set_bytes, l2)
    xs = [tokens(T, H, seed=i) for i in range(n)]
    launches = max(n, 10)
    if direction == "encode":
        t = time_graph(lambda i: C.encode_impl(xs[i % n], cfg, 0, shape, defines), launches, replays)
    else:
        recs = [C.encode_impl(x, cfg, 0) for x in xs]
        del xs
        t = time_graph(lambda i: C.decode_impl(recs[i % n], cfg, H, torch.bfloat16, shape, defines),
                       launches, replays)
    return set_bytes / t / 1e9, t


def best_shapes(result: dict) -> dict:
    """Per direction, the kernel shape with the highest mean % of copy over a run's rows."""
    best = {}
    for direction in ("encode", "decode"):
        by_shape = {}
        for r in result["rows"]:
            if r["direction"] == direction and r["variant"] == "default":
                by_shape.setdefault(r["shape"], []).append(r["pct"])
        best[direction] = max(by_shape, key=lambda k: statistics.mean(by_shape[k]))
    return best


def parse_shape(s: str):
    v, u = s.lower().split("x")
    return int(v), int(u)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON path (a PNG plot is written beside it)")
    ap.add_argument("--sizes", type=float_above(0), nargs="+", default=[1, 4, 16, 64, 256, 1024],
                    help="bf16 input sizes in MiB")
    ap.add_argument("--hidden", type=positive_int, nargs="+", default=[4096, 7168], help="hidden sizes to time")
    ap.add_argument("--bits", nargs="+", default=["2", "3", "4", "5", "6", "7", "8", "fp8"],
                    choices=[str(b) for b in range(2, 9)] + ["fp8"],
                    help="codec widths to time: 2 to 8 (integer bits) or fp8")
    ap.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256),
                    help="values sharing one scale")
    ap.add_argument("--spikes", type=int, default=1, choices=(0, 1),
                    help="1: spikes on (integer widths), 0: off")
    ap.add_argument("--encode-shapes", nargs="+", default=[], metavar="VxU",
                    help="encode kernel shapes to compare (default: the library's)")
    ap.add_argument("--decode-shapes", nargs="+", default=[], metavar="VxU",
                    help="decode kernel shapes to compare (default: the library's)")
    ap.add_argument("--shapes-from", metavar="JSON",
                    help="use per direction the shape with the best mean %% of copy in an earlier run")
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="kernel variants to compare, each comma-separated -D defines "
                         "(default: '', the kernels as shipped)")
    ap.add_argument("--replays", type=positive_int, default=15,
                    help="CUDA graph replays per point, of which the median counts")
    args = ap.parse_args(argv)
    small = [s for s in args.sizes if int(s * MiB) < 2]  # (not one bf16 value: nothing to time)
    if small:
        ap.error(f"--sizes: {small[0]:g} MiB is less than one bf16 value")
    cfgs = [CodecConfig(bits=int(b) if b.isdigit() else b, group_size=args.group,
                        spikes=bool(args.spikes)) for b in args.bits]
    check_out(ap, args.out)  # before the run, not after it
    require_gpus()

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 60 * MiB
    shapes = dict(encode=[parse_shape(s) for s in args.encode_shapes] or [None],
                  decode=[parse_shape(s) for s in args.decode_shapes] or [None])  # None: the library's
    if args.shapes_from:
        for direction, shape in best_shapes(json.loads(Path(args.shapes_from).read_text())).items():
            shapes[direction] = [parse_shape(shape)]
            print(f"{direction}: shape {shape} (best mean % of copy in {args.shapes_from})")
    variants = [tuple(d for d in v.split(",") if d) for v in args.variants]
    for d in variants:
        for es in shapes["encode"]:
            for ds in shapes["decode"]:
                C.precompile(cfgs, [torch.bfloat16], encode_shape=es, decode_shape=ds, defines=d)

    copy = {s: bench_copy(int(s * MiB), l2, args.replays) for s in args.sizes}
    rows = []
    for s in args.sizes:
        for H in args.hidden:
            for cfg in cfgs:
                for d in variants:
                    for direction in ("encode", "decode"):
                        for shape in shapes[direction]:
                            gbps, t = bench_direction(direction, cfg, H, int(s * MiB), l2, args.replays, shape, d)
                            rows.append(dict(size_mib=s, hidden=H, codec=str(cfg), bits=str(cfg.bits),
                                             direction=direction,
                                             shape="x".join(map(str, C.kernel_shape(cfg, direction, shape))),
                                             variant=",".join(d) or "default", gbps=gbps, us=t * 1e6,
                                             copy_gbps=copy[s]["best"], pct=100 * gbps / copy[s]["best"]))
                            r = rows[-1]
                            print(f"{s:7g} MiB  H={H:<5d} {r['codec']:<16s} {direction} {r['shape']:<5s} "
                                  f"{r['variant']:<20s} {gbps:7.0f} GB/s {r['pct']:5.1f}% of copy "
                                  f"{copy[s]['best']:.0f} GB/s ({r['us']:.1f} us)", flush=True)

    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                  l2_bytes=l2, copy_gbps=copy, rows=rows)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}  {result['date']}  copy GB/s (best of memcpy in a graph, eager, SM kernel):")
    for s, c in copy.items():
        print(f"  {s:g} MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    print("| size MiB | hidden | codec | variant | encode shape | encode GB/s | % copy | decode shape | decode GB/s | % copy |")
    print("|---:|---:|---|---|---|---:|---:|---|---:|---:|")
    key = lambda r: (r["size_mib"], r["hidden"], r["codec"], r["variant"])  # noqa: E731
    for k in dict.fromkeys(key(r) for r in rows):
        enc = [r for r in rows if key(r) == k and r["direction"] == "encode"]
        dec = [r for r in rows if key(r) == k and r["direction"] == "decode"]
        for i in range(max(len(enc), len(dec))):
            e = f"{enc[i]['shape']} | {enc[i]['gbps']:.0f} | {enc[i]['pct']:.1f}" if i < len(enc) else " | | "
            dd = f"{dec[i]['shape']} | {dec[i]['gbps']:.0f} | {dec[i]['pct']:.1f}" if i < len(dec) else " | | "
            print(f"| {k[0]:g} | {k[1]} | {k[2]} | {k[3]} | {e} | {dd} |")
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    hidden = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(1, len(hidden), figsize=(6 * len(hidden), 4.5), squeeze=False)
    for ax, H in zip(axes[0], hidden):
        for line in dict.fromkeys((r["codec"], r["direction"], r["shape"], r["variant"]) for r in rows):
            pts = sorted((r["size_mib"], r["pct"]) for r in rows
                         if r["hidden"] == H and (r["codec"], r["direction"], r["shape"], r["variant"]) == line)
            name = " ".join(p for p in line if p != "default")
            ax.plot(*zip(*pts), "-o" if line[1] == "encode" else "--x", label=name, ms=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bf16 input (MiB)")
        ax.set_ylabel("% of device copy bandwidth")
        ax.set_title(f"hidden {H} ({result['device']})")
        ax.axhline(75, color="gray", lw=0.5)
        ax.axhline(60, color="gray", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
