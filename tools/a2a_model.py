#!/usr/bin/env python
"""Alpha-beta model of the flat vs hierarchical quantized all-to-all of one MoE layer.

For each topology (nodes x GPUs per node) and wire codec it prints, per rank: the number of
messages and the bytes over intra-node and inter-node links, for the flat algorithm (one
all_to_all_single) and the hierarchical one (intra-node stage, then inter-node stage, two
gathers), and the predicted time:

  link time  = messages x alpha + bytes / beta          (per link kind)
  flat       = max(intra, inter)                        (one collective: both at once)
  hierarchical = intra + inter + gathers                (stages in sequence)
  + codec    = encode and decode of the quantized rows  (the same for both algorithms)

Message: ``--tokens`` per rank, each routed to ``--topk`` experts spread uniformly over
all ranks (rows a rank keeps are not sent), hidden ``--hidden``, bf16 input; record sizes
from moe_flashcomm.record_bytes. Defaults for the links: NCCL bf16 all_to_all_single
measured on 2x H200 at 256 MiB per rank (NVLink 0.54 ms; the "network" link emulation,
sockets over loopback, 61 ms: docs/design.md, "Link emulation"); the per-message alphas
are assumptions. ``--bench-json`` fits alpha and beta per link from
tools/bench_all2all.py's NCCL rows (nvlink -> intra, network -> inter) and, where that JSON
holds hierarchical timings, compares the 2 x 1 prediction with them.

    python tools/a2a_model.py                              # table + out/a2a_model.json
    python tools/a2a_model.py --bench-json out/bench_all2all/bench_all2all.json
    python tools/a2a_model.py --inter-gbps 25 --inter-alpha-us 10   # an InfiniBand what-if
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import HelpFormatter, check_out, csv_arg, float_above, positive_int  # noqa: E402

from moe_flashcomm import CodecConfig, record_bytes  # noqa: E402
from moe_flashcomm.comm.hierarchical import (LinkModel, predict,  # noqa: E402
                                             prefer_hierarchical, traffic)
from moe_flashcomm.tune_gate import load_bench  # noqa: E402

MIB = 1 << 20
# name -> (intra-node codec, inter-node codec)
CODECS = {
    "bf16": ("bf16", "bf16"),
    "int4": (4, 4),
    "int2": (2, 2),
    "bf16/int4": ("bf16", 4),  # per-link: bf16 inside a node, int4 across nodes
}


def row_bytes(hidden: int, codec) -> int:
    """Wire bytes of one bf16 token row: the raw row for bf16, else a codec record."""
    cfg = CodecConfig.coerce(codec)
    return hidden * 2 if cfg.is_passthrough else record_bytes(hidden, cfg)


def parse_topology(s: str) -> tuple[int, int]:
    """'2x8' -> (nodes, GPUs per node), each >= 1."""
    try:
        n, l = (positive_int(v) for v in s.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):  # (not two parts, or not ints >= 1)
        raise ValueError(f"topology {s!r}: expected NODESxGPUS with ints >= 1, e.g. 2x8") from None
    return n, l


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = alpha + bytes / beta over (bytes, seconds); (alpha, beta)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx
    return max(0.0, my - slope * mx), 1.0 / slope


def model_from_bench(path: Path, model: LinkModel) -> tuple[LinkModel, dict]:
    """Alpha/beta per link from tools/bench_all2all.py's JSON: NCCL bf16 all_to_all_single
    rows (2 ranks: one message of ``pair_bytes`` per rank), nvlink -> intra, network ->
    inter. Links absent from the file keep ``model``'s values."""
    data = json.loads(path.read_text())
    found = {}
    for link, bench_path in (("intra", "nvlink"), ("inter", "network")):
        pts = sorted({(r["pair_bytes"], r["ms"] * 1e-3) for r in data["rows"]
                      if r.get("variant") == "nccl" and r.get("path") == bench_path
                      and r.get("pair_bytes")})
        if len({b for b, _ in pts}) < 2:
            continue
        alpha, beta = fit(pts)
        model = replace(model, **{f"{link}_alpha": alpha, f"{link}_beta": beta})
        found[link] = dict(path=bench_path, points=len(pts), alpha_us=alpha * 1e6,
                           beta_gbps=beta / 1e9)
    return model, found


def rows_for(nodes: int, local: int, tokens: int, hidden: int, topk: int, codecs: dict,
             model: LinkModel) -> list[dict]:
    world = nodes * local
    pair_rows = tokens * topk / world  # uniform routing: rows per (source, destination)
    out = []
    for name, (ci, ce) in codecs.items():
        mi, me = (round(pair_rows * row_bytes(hidden, c)) for c in (ci, ce))
        # encode + decode of the rows that leave the rank in a quantized codec
        quantized = sum(n * pair_rows * hidden * 2 for n, c in (((local - 1), ci),
                                                                 ((nodes - 1) * local, ce))
                        if not CodecConfig.coerce(c).is_passthrough)
        codec_s = 2 * quantized / model.codec_beta
        auto_hier = prefer_hierarchical(nodes, local, mi, me, model=model)
        for algorithm in ("flat", "hierarchical"):
            t = traffic(algorithm, nodes, local, mi, me)
            p = predict(algorithm, t, model)
            out.append(dict(
                topology=f"{nodes}x{local}", nodes=nodes, local=local, codec=name,
                algorithm=algorithm, pair_rows=pair_rows, intra_pair_bytes=mi,
                inter_pair_bytes=me, intra_msgs=t.intra_msgs, inter_msgs=t.inter_msgs,
                intra_bytes=t.intra_bytes, inter_bytes=t.inter_bytes,
                gather_bytes=t.gather_bytes, intra_ms=p["intra"] * 1e3,
                inter_ms=p["inter"] * 1e3, gather_ms=p["gather"] * 1e3,
                comm_ms=p["total"] * 1e3, codec_ms=codec_s * 1e3,
                total_ms=(p["total"] + codec_s) * 1e3,
                auto=(algorithm == "hierarchical") == auto_hier))
    base = {r["topology"]: r["total_ms"] for r in out
            if r["codec"] == "bf16" and r["algorithm"] == "flat"}
    for r in out:
        r["vs_flat_bf16"] = base[r["topology"]] / r["total_ms"]
    return out


def crossover(nodes: int, local: int, model: LinkModel) -> float:
    """Per-pair wire bytes (same on both links) below which "auto" picks hierarchical
    (bisection on prefer_hierarchical); 0 if never."""
    if not prefer_hierarchical(nodes, local, 1, 1, model=model):
        return 0.0
    lo, hi = 1.0, float(1 << 40)
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if prefer_hierarchical(nodes, local, int(mid), int(mid), model=model) \
            else (lo, mid)
    return lo


def table(rows: list[dict]) -> str:
    head = (f"{'topo':>5} {'codec':>9} {'algorithm':>12} {'pair MiB':>11} {'msgs':>9} "
            f"{'intra MiB':>9} {'inter MiB':>9} {'gath MiB':>8} {'intra ms':>9} {'inter ms':>9} "
            f"{'gath ms':>7} {'codec ms':>8} {'total ms':>9} {'x bf16':>6} {'auto':>4}")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r["topology"] != last:
            lines.append("")
        last = r["topology"]
        pair = f"{r['intra_pair_bytes'] / MIB:.2f}/{r['inter_pair_bytes'] / MIB:.2f}" \
            if r["intra_pair_bytes"] != r["inter_pair_bytes"] else f"{r['inter_pair_bytes'] / MIB:.2f}"
        lines.append(
            f"{r['topology']:>5} {r['codec']:>9} {r['algorithm']:>12} {pair:>11} "
            f"{str(r['intra_msgs']) + '+' + str(r['inter_msgs']):>9} "
            f"{r['intra_bytes'] / MIB:9.1f} {r['inter_bytes'] / MIB:9.1f} "
            f"{r['gather_bytes'] / MIB:8.1f} {r['intra_ms']:9.3f} {r['inter_ms']:9.3f} "
            f"{r['gather_ms']:7.3f} {r['codec_ms']:8.3f} {r['total_ms']:9.3f} "
            f"{r['vs_flat_bf16']:6.2f} {'*' if r['auto'] else '':>4}")
    return "\n".join(lines)


def compare_2x1(bench: Path, model: LinkModel, hidden_default: int) -> list[dict]:
    """2 GPUs as 2 nodes x 1 GPU (the one hierarchy measurable on 2 GPUs): predicted vs
    measured, for the bench's rows of the network path (flat and, if present,
    hierarchical). The model gives both algorithms the same time there (one inter-node
    message, no gather); the measurement shows the hierarchical code path's overhead."""
    data = json.loads(bench.read_text())
    out = []
    for r in data["rows"]:
        if r.get("path") != "network" or r.get("codec") is None or r.get("gated") \
                or r.get("sweep"):
            continue
        algorithm = r.get("algorithm", "flat")
        name = r["codec"]
        codec = "bf16" if name == "bf16" else (name if name == "fp8" else int(name[3:]))
        H, T = r.get("hidden", hidden_default), r["tokens"]
        m = (T // 2) * row_bytes(H, codec)
        p = predict(algorithm, traffic(algorithm, 2, 1, m, m), model)
        q = 0 if name == "bf16" else 2 * (T // 2) * H * 2 / model.codec_beta
        out.append(dict(codec=name, algorithm=algorithm, hidden=H, size_bytes=r["size_bytes"],
                        predicted_ms=(p["total"] + q) * 1e3, measured_ms=r["ms"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--topologies", type=csv_arg(parse_topology), default="2x1,2x8,4x8,16x8",
                    help="NODESxGPUS, comma-separated; 2x1 is what 2 GPUs can measure")
    ap.add_argument("--tokens", type=positive_int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=positive_int, default=7168,
                    help="values per token row, also for --bench-json rows that name none")
    ap.add_argument("--topk", type=positive_int, default=8, help="experts each token is routed to")
    ap.add_argument("--codecs", type=csv_arg(allowed=CODECS), default=",".join(CODECS),
                    help="wire codecs to model, comma-separated; bf16/int4 is bf16 inside a node, "
                         "int4 across nodes")
    d = LinkModel()
    alpha, rate = float_above(0, inclusive=True), float_above(0)  # (a rate of 0 divides by 0)
    ap.add_argument("--intra-alpha-us", type=alpha, default=d.intra_alpha * 1e6,
                    help="assumed microseconds per message over intra-node links")
    ap.add_argument("--inter-alpha-us", type=alpha, default=d.inter_alpha * 1e6,
                    help="assumed microseconds per message over inter-node links")
    # (the measured rates by hand, rounded: argparse would print every digit)
    ap.add_argument("--intra-gbps", type=rate, default=d.intra_beta / 1e9,
                    help=f"GB/s one rank sends over intra-node links (default "
                         f"{d.intra_beta / 1e9:.4g}: NVLink, measured)")
    ap.add_argument("--inter-gbps", type=rate, default=d.inter_beta / 1e9,
                    help=f"GB/s one rank sends over inter-node links (default "
                         f"{d.inter_beta / 1e9:.4g}: the network emulation, measured)")
    ap.add_argument("--mem-gbps", type=rate, default=d.mem_beta / 1e9,
                    help="GB/s of a device copy: the hierarchical algorithm's gathers read and "
                         "write their bytes at this rate")
    ap.add_argument("--codec-gbps", type=rate, default=d.codec_beta / 1e9,
                    help=f"bf16 GB/s through one encode or decode (default "
                         f"{d.codec_beta / 1e9:.4g})")
    ap.add_argument("--bench-json", type=Path,
                    help="tools/bench_all2all.py JSON: fit the links' alpha/beta from it")
    ap.add_argument("--out", type=Path, default=Path("out/a2a_model.json"),
                    help="JSON file to write: the link model, every row and the crossovers")
    args = ap.parse_args(argv)
    check_out(ap, args.out)

    if args.bench_json:
        try:
            load_bench(args.bench_json)
        except ValueError as e:
            ap.error(f"--bench-json {e}")

    # the defaults themselves unless a link option differs (us -> s and back is not exact)
    links = ("intra_alpha_us", "intra_gbps", "inter_alpha_us", "inter_gbps", "mem_gbps", "codec_gbps")
    model = LinkModel() if all(getattr(args, k) == ap.get_default(k) for k in links) else \
        LinkModel(args.intra_alpha_us * 1e-6, args.intra_gbps * 1e9,
                  args.inter_alpha_us * 1e-6, args.inter_gbps * 1e9,
                  args.mem_gbps * 1e9, args.codec_gbps * 1e9)
    fitted, comparison = {}, []
    if args.bench_json:
        model, fitted = model_from_bench(args.bench_json, model)
        comparison = compare_2x1(args.bench_json, model, args.hidden)
    codecs = {k: CODECS[k] for k in args.codecs}
    rows = []
    for topo in args.topologies:
        rows += rows_for(*topo, args.tokens, args.hidden, args.topk, codecs, model)

    print(f"MoE all-to-all per rank: {args.tokens} tokens x top-{args.topk}, hidden "
          f"{args.hidden}, bf16 input, uniform routing")
    print(f"links: intra {model.intra_alpha * 1e6:.1f} us + {model.intra_beta / 1e9:.1f} GB/s, "
          f"inter {model.inter_alpha * 1e6:.1f} us + {model.inter_beta / 1e9:.2f} GB/s, "
          f"gather {model.mem_beta / 1e9:.0f} GB/s, codec {model.codec_beta / 1e9:.0f} GB/s"
          + (f"  (fitted from {args.bench_json}: {', '.join(fitted)})" if fitted else
             "  (defaults measured on 2x H200; alphas assumed)" if model == LinkModel() else
             "  (command-line values)"))
    print("pair MiB: wire bytes per (source, destination) pair (intra/inter); msgs: "
          "intra+inter messages per rank; x bf16: flat bf16 time / this; auto: what "
          "algorithm='auto' picks\n")
    print(table(rows))
    cross = {}
    print("\nauto picks hierarchical below these per-pair wire sizes:")
    for n, l in args.topologies:
        topo = f"{n}x{l}"
        c = crossover(n, l, model)
        cross[topo] = c
        why = "needs >= 2 nodes of >= 2 GPUs" if min(n, l) < 2 else "slower at every size"
        print(f"  {topo:>5}: " + (f"{c / MIB:.2f} MiB" if c else f"never ({why})"))
    if comparison:
        print("\n2 x 1 (2 GPUs, network path): predicted vs measured ms")
        for c in comparison:
            print(f"  {c['codec']:>5} {c['algorithm']:>12} H{c['hidden']} "
                  f"{c['size_bytes'] / MIB:8.2f} MiB: {c['predicted_ms']:9.3f} "
                  f"{c['measured_ms']:9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        command=" ".join(["tools/a2a_model.py"] + (argv if argv is not None else sys.argv[1:])),
        date=datetime.date.today().isoformat(), model=asdict(model), fitted=fitted,
        message=dict(tokens=args.tokens, hidden=args.hidden, topk=args.topk),
        rows=rows, crossover_pair_bytes=cross, comparison_2x1=comparison), indent=1))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
