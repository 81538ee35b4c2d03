"""Encode/decode bandwidth of the CUDA codec against a device-to-device copy in the same run.

GB/s counts bytes read + bytes written (encode: tokens in + records out; decode: records in +
tokens out; copy: 2x the tensor). Each point is the median over replays of a CUDA graph of
back-to-back launches, rotating over enough buffers to defeat the L2 cache for small sizes.

    python tools/bench_codec.py --out results/codec.json            # table, JSON and PNG
    python tools/bench_codec.py --out v.json --sizes 256 --vpt 8 16 32   # kernel variants
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
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g)
    x *= 1 + 30 * (torch.rand(T, H, device="cuda", generator=g) > 0.999)  # sparse outliers
    return x.to(torch.bfloat16)


def bench_copy(nbytes: int, l2: int, replays: int) -> float:
    n = buffers_needed(2 * nbytes, l2)
    src = [torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16) for _ in range(n)]
    dst = [torch.empty_like(s) for s in src]
    t = time_graph(lambda i: dst[i % n].copy_(src[i % n]), max(n, 10), replays)
    return 2 * nbytes / t / 1e9


def bench_codec(cfg: CodecConfig, H: int, nbytes: int, l2: int, replays: int, vpt=None, defines=()):
    """(encode GB/s, decode GB/s, encode s, decode s) for bf16 tokens of nbytes."""
    T = max(1, nbytes // (2 * H))
    rb = record_layout(H, cfg).record_bytes
    set_bytes = T * H * 2 + T * rb
    n = buffers_needed(set_bytes, l2)
    xs = [tokens(T, H, seed=i) for i in range(n)]
    recs = [C.encode_impl(x, cfg, 0, vpt, defines) for x in xs]
    launches = max(n, 10)
    te = time_graph(lambda i: C.encode_impl(xs[i % n], cfg, 0, vpt, defines), launches, replays)
    td = time_graph(lambda i: C.decode_impl(recs[i % n], cfg, H, torch.bfloat16, vpt, defines),
                    launches, replays)
    del xs, recs
    return set_bytes / te / 1e9, set_bytes / td / 1e9, te, td


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON path (a PNG plot is written beside it)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256, 1024],
                    help="bf16 input sizes in MiB")
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    ap.add_argument("--bits", nargs="+", default=["2", "3", "4", "6", "8", "fp8"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--spikes", type=int, default=1, help="1: spikes on (integer widths)")
    ap.add_argument("--vpt", type=int, nargs="+", default=[0],
                    help="values per thread to compare (0: the default)")
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="kernel variants to compare: comma-separated -D defines ('' = default)")
    ap.add_argument("--replays", type=int, default=15)
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 60 * MiB
    cfgs = [CodecConfig(bits=b, group_size=args.group, spikes=bool(args.spikes)) for b in args.bits]
    variants = [tuple(d for d in v.split(",") if d) for v in args.variants]
    for v in args.vpt:
        for d in variants:
            C.precompile(cfgs, [torch.bfloat16], vpt=v or None, defines=d)

    copy = {s: bench_copy(int(s * MiB), l2, args.replays) for s in args.sizes}
    rows = []
    for s in args.sizes:
        for H in args.hidden:
            for cfg in cfgs:
                for v, d in ((v, d) for v in args.vpt for d in variants):
                    enc, dec, te, td = bench_codec(cfg, H, int(s * MiB), l2, args.replays, v or None, d)
                    rows.append(dict(size_mib=s, hidden=H, codec=str(cfg), bits=str(cfg.bits),
                                     vpt=v or min(C.DEFAULT_VPT, cfg.group_size),
                                     variant=",".join(d) or "default",
                                     encode_gbps=enc, decode_gbps=dec, encode_us=te * 1e6,
                                     decode_us=td * 1e6, copy_gbps=copy[s],
                                     encode_pct=100 * enc / copy[s], decode_pct=100 * dec / copy[s]))
                    r = rows[-1]
                    print(f"{s:7g} MiB  H={H:<5d} {r['codec']:<16s} V={r['vpt']:<2d} {r['variant']:<8.8s} encode "
                          f"{enc:7.0f} GB/s {r['encode_pct']:5.1f}%  decode {dec:7.0f} GB/s "
                          f"{r['decode_pct']:5.1f}%  (copy {copy[s]:.0f} GB/s)", flush=True)

    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                  l2_bytes=l2, copy_gbps=copy, rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}  {result['date']}  copy: "
          + ", ".join(f"{s:g} MiB {g:.0f} GB/s" for s, g in copy.items()))
    print("| size MiB | hidden | codec | V | variant | encode GB/s | % copy | decode GB/s | % copy |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size_mib']:g} | {r['hidden']} | {r['codec']} | {r['vpt']} | {r['variant']} | {r['encode_gbps']:.0f} | "
              f"{r['encode_pct']:.1f} | {r['decode_gbps']:.0f} | {r['decode_pct']:.1f} |")
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = result["rows"]
    hidden = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(1, len(hidden), figsize=(6 * len(hidden), 4.5), squeeze=False)
    for ax, H in zip(axes[0], hidden):
        for line in dict.fromkeys((r["codec"], r["vpt"], r["variant"]) for r in rows):
            name = " ".join(str(p) for p in line if p != "default")
            for key, style in (("encode_pct", "-o"), ("decode_pct", "--x")):
                pts = sorted((r["size_mib"], r[key]) for r in rows
                             if r["hidden"] == H and (r["codec"], r["vpt"], r["variant"]) == line)
                ax.plot(*zip(*pts), style, label=f"{name} {key.split('_')[0]}")
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
