#!/usr/bin/env python
"""Benchmark moe_flashcomm.all_to_all against NCCL bf16 all_to_all_single, 2 GPUs.

For each emulated link class (docs/design.md, "Link emulation"; NCCL's environment is set
before NCCL starts: one process group, i.e. one pair of fresh processes, per path), each
hidden size and per-rank message size (bf16 bytes of x, even splits) it times:

  nccl        torch.distributed.all_to_all_single on the bf16 tensor (the baseline)
  <codec>     moe_flashcomm.all_to_all(x, codec=<codec>, gate=False)   (always quantized)
  <codec>+gate  the same with the size gate fitted on this run's measurements, timed
              again where the gate sends the message as bf16

with CUDA events around every call (calls back to back, as a training step issues them),
after warm-up; the median over calls, the slower rank's. Ratios are NCCL time / our time
(> 1: faster than NCCL). Writes a table to stdout, JSON, a PNG plot and the fitted gate
(the JSON `python -m moe_flashcomm.tune_gate` writes; load it with MOE_FLASHCOMM_GATE_FILE;
the paths and codecs the run did not measure keep the defaults there).

    python tools/bench_all2all.py --out out/bench                  # the full sweep
    python tools/bench_all2all.py --quick --out out/quick          # a small one
    python tools/bench_all2all.py --plot out/bench/bench_all2all.json  # replot
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchlib import (CPU_SIZES, LINK_EMULATION, PATHS_ARG, SIZES_ARG, HelpFormatter, a2a_tokens,  # noqa: E402
                      burst_ms, bench_codec, check_out, csv_arg, float_above, fmt_size, free_port,
                      init_link_worker, parse_size, positive_int, pyplot, ratio_axes, read_json,
                      require_gpus, rounded_sizes_note, save_figure)

from moe_flashcomm.comm.gate import DEFAULT_THRESHOLDS, SizeGate, with_defaults  # noqa: E402
from moe_flashcomm.tune_gate import bench_input, fit_from_rows, time_calls  # noqa: E402

CODECS = ("bf16", "fp8", "int8", "int6", "int4", "int3", "int2")
SIZES = ("64K", "256K", "1M", "4M", "16M", "64M", "256M", "512M")
QUICK_SIZES = ("64K", "1M", "16M", "256M")
CHUNK_SWEEP = "256M:7168:int8,int4,int2:1,2,4"
CPU_CHUNK_SWEEP = "256K:7168:int4:1,2"
DRY_RUN_GATE = "gate_dry_run.json"  # --cpu-dry-run's gate file, in place of gate.json


# ---- worker (one process per GPU) ------------------------------------------------------------
def _worker(rank: int, world: int, port: int, path: str, cfg: dict, part: str) -> None:
    dev = cfg.get("device", "cuda")  # "cpu" (gloo, host timers): a dry run without GPUs
    init_link_worker(rank, world, port, path, dev)
    import moe_flashcomm as mf
    codecs = {c: bench_codec(c) for c in cfg["codecs"]}
    try:
        from moe_flashcomm.codec import cuda as kernels
        if rank == 0 and dev == "cuda":
            t0 = time.perf_counter()
            n = kernels.precompile(codecs.values(), [torch.bfloat16])
            print(f"[{path}] {n} kernels compiled or cached in {time.perf_counter() - t0:.1f} s",
                  flush=True)
    except ImportError as e:
        print(f"[{path}] no CUDA codec kernels ({e}): the reference codec runs (slow)", flush=True)
    dist.barrier()

    rows = []
    show = rank == 0 and not cfg.get("no_progress")
    steps = len(cfg["hiddens"]) * len(cfg["sizes"])
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"{path:>7}", file=sys.stdout, mininterval=2)

    def measure(x, name, fn, **extra):
        big = x.numel() * 2 >= (64 << 20)
        ms = time_calls(fn, cfg["budget_s"], 3 if big else 10, 200, dev)
        T, H = x.shape
        rows.append(dict(path=path, hidden=H, tokens=T, size_bytes=T * H * 2,
                         pair_bytes=(T // world) * H * 2, variant=name, ms=ms, **extra))
        return ms

    for H in cfg["hiddens"]:
        for size in cfg["sizes"]:
            T = a2a_tokens(size, H, world)
            x = bench_input(T, H, rank, dev)
            out = torch.empty_like(x)
            nccl = measure(x, "nccl", lambda: dist.all_to_all_single(out, x))
            for name, c in codecs.items():
                measure(x, name, lambda: mf.all_to_all(x, codec=c, gate=False), codec=name)
                rows[-1]["nccl_ms"] = nccl
                for algo in cfg.get("algorithms", ["flat"]):  # 2 GPUs as 2 nodes x 1 GPU
                    if algo != "flat":
                        measure(x, f"{name}/{algo}", lambda: mf.all_to_all(
                            x, codec=c, gate=False, algorithm=algo, topology=mf.Topology(1)),
                            codec=name, algorithm=algo, nccl_ms=nccl)
            x = out = None  # free before the next size
            if dev == "cuda":
                torch.cuda.empty_cache()
            if bar:
                bar.update()
    if bar:
        bar.close()

    # the size gate fitted on these numbers, then timed where it sends bf16
    table = fitted_gate(rows).get(path, {})
    gate = {path: table}
    size_gate = mf.SizeGate(gate)
    for H in cfg["hiddens"] if cfg.get("gated", True) else ():
        for size in cfg["sizes"]:
            T = a2a_tokens(size, H, world)
            pair = (T // world) * H * 2
            gated = [n for n, c in codecs.items() if pair < size_gate.threshold(path, c)]
            if not gated:
                continue
            x = bench_input(T, H, rank, dev)
            for name in gated:
                # (on CPU the link path is "cpu", which no gate applies to: the dry run times
                # what the gate sends, bf16, so that its table means what a GPU run's does)
                c = codecs[name] if dev == "cuda" else "bf16"
                measure(x, name + "+gate", lambda: mf.all_to_all(x, codec=c, gate=size_gate),
                        codec=name, gated=True)
            del x

    # chunk count sweep at one size
    if cfg.get("chunk_sweep"):
        H, size = cfg["chunk_sweep"]["hidden"], cfg["chunk_sweep"]["size"]
        T = size // (2 * H) // world * world
        x = bench_input(T, H, rank, dev)
        for name in cfg["chunk_sweep"]["codecs"]:
            c = bench_codec(name)
            for k in cfg["chunk_sweep"]["chunks"]:
                measure(x, f"{name}/chunks={k}", lambda: mf.all_to_all(x, codec=c, gate=False, chunks=k),
                        codec=name, chunks=k, sweep=True)
        del x

    # encode / decode alone (no transfer) at the chunk-sweep size: where the time goes
    if cfg.get("chunk_sweep") and rank == 0 and path == cfg["paths"][0] and dev == "cuda":
        from moe_flashcomm.comm.exchange import decode, encode
        H, size = cfg["chunk_sweep"]["hidden"], cfg["chunk_sweep"]["size"]
        T = size // (2 * H) // world  # the rows a rank sends to its one peer
        x = bench_input(T, H, rank, dev)
        for name in cfg["codecs"]:
            c = bench_codec(name)
            if c.is_passthrough:
                continue
            rec = encode(x, c)
            for stage, fn in (("encode", lambda: encode(x, c)),
                              ("decode", lambda: decode(rec, c, H, x.dtype)),
                              ("copy", lambda: x.clone())):
                rows.append(dict(path="local", hidden=H, tokens=T, size_bytes=T * H * 2,
                                 variant=f"{name}/{stage}", codec=name, stage=stage,
                                 ms=burst_ms(fn), record_bytes=rec.shape[1]))
        del x

    if rank == 0:
        Path(part).write_text(json.dumps(dict(rows=rows, gate=gate)))
    dist.barrier()
    dist.destroy_process_group()


def fitted_gate(rows: list) -> dict:
    """The all-to-all gate of a run's rows, as ``python -m moe_flashcomm.tune_gate --from-bench``
    fits its JSON: on the flat, always-quantized timings (--algorithms' rows would count as
    the flat call's); {} where no codec is quantized."""
    if all(r.get("codec") in (None, "bf16") for r in rows):
        return {}
    return fit_from_rows(rows)


def run_paths(cfg: dict, out: Path) -> dict:
    """Run the sweep on every path (fresh processes each); merged rows and fitted gate."""
    rows, gate = [], {}
    for path in cfg["paths"]:
        part = out / f"part_{path}.json"
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(2, free_port(), path, cfg, str(part)), nprocs=2, join=True)
        data = json.loads(part.read_text())
        part.unlink()
        rows += data["rows"]
        gate.update(data["gate"])
        print(f"[{path}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return dict(rows=rows, gate=gate)


# ---- report -----------------------------------------------------------------------------------
def library_rows(rows: list, gate: dict) -> list:
    """Per (path, hidden, size, codec): what the library does with the size gate ``gate``
    (the timing of the gated call where the gate sends bf16, the quantized one elsewhere),
    with the NCCL time. A size the gate sends as bf16 but the run never timed gated (a gate
    refitted with --refit) takes the bf16 codec's time there, else NCCL's (``untimed``)."""
    size_gate = SizeGate(gate)
    nccl = {(r["path"], r["hidden"], r["tokens"]): r["ms"] for r in rows if r["variant"] == "nccl"}
    gated = {(r["path"], r["hidden"], r["tokens"], r["codec"]): r["ms"] for r in rows if r.get("gated")}
    bf16 = {(r["path"], r["hidden"], r["tokens"]): r["ms"] for r in rows if r["variant"] == "bf16"}
    out = []
    for r in rows:
        if r.get("codec") is None or r.get("gated") or r.get("sweep") or r["path"] == "local" \
                or r.get("algorithm"):
            continue
        key = (r["path"], r["hidden"], r["tokens"], r["codec"])
        c = bench_codec(r["codec"])
        is_gated = r["pair_bytes"] < size_gate.threshold(r["path"], c)
        base = nccl[key[:3]]
        untimed = is_gated and key not in gated
        ms = r["ms"]
        if is_gated:  # timed gated, else (a refitted gate) what bf16 took at that point
            ms = bf16.get(key[:3], base) if untimed else gated[key]
        out.append(dict(path=r["path"], hidden=r["hidden"], size_bytes=r["size_bytes"],
                        codec=r["codec"], nccl_ms=base, raw_ms=r["ms"], ms=ms, gated=is_gated,
                        untimed=untimed, speedup=base / ms, raw_speedup=base / r["ms"]))
    return out


def print_tables(result: dict) -> str:
    lib = library_rows(result["rows"], result["gate"])
    codecs = [c for c in CODECS if any(r["codec"] == c for r in lib)]
    asked = result.get("meta", {}).get("config", {}).get("sizes", [])  # (2 ranks: run_paths)
    lines = [n for H in sorted({r["hidden"] for r in lib}) if (n := rounded_sizes_note(asked, H, 2))]
    for path in LINK_EMULATION:
        for H in sorted({r["hidden"] for r in lib if r["path"] == path}):
            sel = [r for r in lib if r["path"] == path and r["hidden"] == H]
            lines.append(f"\n{path}, hidden {H}: NCCL bf16 ms, then NCCL time / ours "
                         f"(gate on; * = sent as bf16 by the gate; raw quantized in brackets)")
            lines.append(f"{'size':>7} {'nccl ms':>9} " + " ".join(f"{c:>15}" for c in codecs))
            for size in sorted({r["size_bytes"] for r in sel}):
                cells = {r["codec"]: r for r in sel if r["size_bytes"] == size}
                base = next(iter(cells.values()))["nccl_ms"]
                row = []
                for c in codecs:
                    r = cells.get(c)
                    row.append(f"{'':>15}" if r is None else
                               f"{r['speedup']:6.2f}{'~' if r['untimed'] else '*' if r['gated'] else ' '}"
                               f"({r['raw_speedup']:5.2f})")
                lines.append(f"{fmt_size(size):>7} {base:9.3f} " + " ".join(row))
    algos = [r for r in result["rows"] if r.get("algorithm")]
    if algos:
        flat = {(r["path"], r["hidden"], r["tokens"], r["codec"]): r["ms"] for r in result["rows"]
                if r.get("codec") and not (r.get("gated") or r.get("sweep") or r.get("algorithm"))}
        lines.append("\nother algorithms (2 GPUs as 2 nodes x 1 GPU; ms, flat ms / this):")
        for r in algos:
            base = flat.get((r["path"], r["hidden"], r["tokens"], r["codec"]))
            lines.append(f"  {r['path']:>7} H{r['hidden']} {fmt_size(r['size_bytes']):>5} "
                         f"{r['variant']:>18}: {r['ms']:.3f} ms  "
                         f"{base / r['ms'] if base else float('nan'):.2f}")
    sweep = [r for r in result["rows"] if r.get("sweep")]
    if sweep:
        nccl = {(r["path"], r["hidden"], r["tokens"]): r["ms"] for r in result["rows"] if r["variant"] == "nccl"}
        lines.append("\nchunk sweep (ms, NCCL/ours):")
        for r in sweep:
            base = nccl.get((r["path"], r["hidden"], r["tokens"]))
            ratio = f"{base / r['ms']:.2f}" if base else "-"
            lines.append(f"  {r['path']:>7} H{r['hidden']} {fmt_size(r['size_bytes'])} "
                         f"{r['variant']:>16}: {r['ms']:.3f} ms  {ratio}")
    local = [r for r in result["rows"] if r["path"] == "local"]
    if local:
        lines.append(f"\nlocal stages, {local[0]['tokens']} tokens x {local[0]['hidden']} "
                     f"({fmt_size(local[0]['size_bytes'])} bf16, one peer's share):")
        for r in local:
            lines.append(f"  {r['variant']:>14}: {r['ms']:.4f} ms")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    lib = library_rows(result["rows"], result["gate"])
    hiddens = sorted({r["hidden"] for r in lib})
    paths = [p for p in LINK_EMULATION if any(r["path"] == p for r in lib)]
    fig, axes = plt.subplots(len(hiddens), len(paths), figsize=(5.5 * len(paths), 4 * len(hiddens)),
                             squeeze=False, sharey=True)
    for i, H in enumerate(hiddens):
        for j, path in enumerate(paths):
            ax = axes[i][j]
            for c in CODECS:
                sel = sorted((r for r in lib if r["path"] == path and r["hidden"] == H
                              and r["codec"] == c), key=lambda r: r["size_bytes"])
                if not sel:
                    continue
                xs = [r["size_bytes"] for r in sel]
                line, = ax.plot(xs, [r["speedup"] for r in sel], marker="o", ms=3, label=c)
                ax.plot(xs, [r["raw_speedup"] for r in sel], ls=":", color=line.get_color(), lw=1)
            ratio_axes(ax, f"{path}, hidden {H}", "bytes per rank (bf16)",
                       "NCCL bf16 time / ours" if j == 0 else None, 0.95)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, png, "moe_flashcomm.all_to_all vs NCCL all_to_all_single, 2 GPUs "
                "(solid: gate on; dotted: always quantized)")


def chunk_sweep(text: str):
    """--chunk-sweep SIZE:HIDDEN:CODECS:CHUNKS as a dict, '' as None (an argparse type)."""
    if not text:
        return None
    try:
        if text.count(":") != 3:
            raise ValueError("not 4 fields")
        size, hidden, codecs, chunks = text.split(":")
        return dict(size=parse_size(size), hidden=positive_int(hidden),
                    codecs=csv_arg(allowed=CODECS)(codecs), chunks=csv_arg(positive_int)(chunks))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; expected SIZE:HIDDEN:CODECS:CHUNKS, "
                                         "e.g. 256M:7168:int8,int4:1,2,4") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench_all2all"),
                    help=f"folder to write bench_all2all.json, table.txt, gate.json "
                         f"(--cpu-dry-run: {DRY_RUN_GATE}) and bench_all2all.png to")
    ap.add_argument("--paths", type=PATHS_ARG, default=",".join(LINK_EMULATION),
                    help="link emulations to time, comma-separated: a fresh pair of processes each")
    ap.add_argument("--hidden", type=csv_arg(positive_int), default=None,
                    help="hidden sizes to time, comma-separated (default 4096,7168; --quick: 7168)")
    ap.add_argument("--codecs", type=csv_arg(allowed=CODECS), default=",".join(CODECS),
                    help="codecs to time against NCCL, comma-separated; bf16 is the library's "
                         "exchange unquantized")
    ap.add_argument("--sizes", type=SIZES_ARG, default=None,
                    help=f"per-rank bf16 bytes, e.g. 64K,1M,256M (default {','.join(SIZES)}; "
                         f"--cpu-dry-run: {','.join(CPU_SIZES)})")
    ap.add_argument("--quick", action="store_true",
                    help="sizes " + ",".join(QUICK_SIZES) + ", hidden 7168 (--sizes and --hidden win)")
    ap.add_argument("--budget", type=float_above(0), default=0.25, help="seconds of timed calls per point")
    ap.add_argument("--chunk-sweep", type=chunk_sweep, default=argparse.SUPPRESS,
                    help=f"SIZE:HIDDEN:CODECS:CHUNKS, or '' for none (default {CHUNK_SWEEP}; "
                         f"--cpu-dry-run: {CPU_CHUNK_SWEEP})")
    ap.add_argument("--plot", type=Path, help="only replot this JSON")
    ap.add_argument("--refit", action="store_true", help="with --plot: refit the gate")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (tqdm)")
    ap.add_argument("--algorithms", nargs="+", default=["flat"],
                    choices=["flat", "hierarchical", "auto"],
                    help="all_to_all algorithms to time per codec (not flat: as 2 nodes x 1 GPU)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help=f"gloo on CPU, to check this script without GPUs (timings meaningless; "
                         f"its gate goes to {DRY_RUN_GATE}, not gate.json)")
    return ap


def run_config(args) -> dict:
    """The workers' config of a run: --quick's or the default sizes and hidden sizes where
    --sizes and --hidden are not given, the chunk sweep."""
    sizes = args.sizes or [parse_size(s) for s in (CPU_SIZES if args.cpu_dry_run else
                                                   QUICK_SIZES if args.quick else SIZES)]
    sweep = args.chunk_sweep if hasattr(args, "chunk_sweep") else \
        chunk_sweep(CPU_CHUNK_SWEEP if args.cpu_dry_run else CHUNK_SWEEP)  # (not given)
    cfg = dict(paths=args.paths, codecs=args.codecs,
               hiddens=args.hidden or ([7168] if args.quick else [4096, 7168]),
               sizes=sizes, budget_s=args.budget,
               no_progress=args.no_progress, device="cpu" if args.cpu_dry_run else "cuda",
               algorithms=args.algorithms)
    if sweep:
        cfg["chunk_sweep"] = sweep
    return cfg


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.refit and not args.plot:
        ap.error("--refit: only with --plot (a run fits its gate anyway)")
    if args.plot:
        result = read_json(ap, args.plot)
        if args.refit:  # the current gate fit on the always-quantized timings
            result["gate"] = fitted_gate(result["rows"])
        print_tables(result)
        if any(r["untimed"] for r in library_rows(result["rows"], result["gate"])):
            print("~ (for *): the refitted gate sends these as bf16, sizes this run did not time "
                  "gated: the bf16 codec's time stands in (in the plot too)")
        plot(result, args.plot.with_suffix(".png"))
        return
    check_out(ap, args.out, folder=True)
    if not args.cpu_dry_run:
        require_gpus(2, "--cpu-dry-run checks this script without GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args)
    t0 = time.perf_counter()
    result = run_paths(cfg, args.out)
    result["meta"] = dict(
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        device=f"2x {torch.cuda.get_device_name(0)}" if not args.cpu_dry_run else "cpu (dry run)",
        torch=torch.__version__,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if not args.cpu_dry_run else None,
        date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - t0, 1),
        config=cfg)
    (args.out / "bench_all2all.json").write_text(json.dumps(result, indent=1))
    # a dry run's gate (of meaningless timings) stays out of gate.json, where a real run's is read
    gate = args.out / (DRY_RUN_GATE if args.cpu_dry_run else "gate.json")
    gate.write_text(json.dumps(dict(  # what was not measured keeps its default
        thresholds=with_defaults(result["gate"], DEFAULT_THRESHOLDS), units="bf16 bytes per peer",
        device=result["meta"]["device"], date=result["meta"]["date"],
        source="tools/bench_all2all.py"), indent=1))
    (args.out / "table.txt").write_text(print_tables(result))
    plot(result, args.out / "bench_all2all.png")
    dry = f" (a dry run: timings meaningless, {gate.name} not a gate to use)" if args.cpu_dry_run else ""
    print(f"total {time.perf_counter() - t0:.0f} s; JSON, table, gate and plot in {args.out}{dry}")


if __name__ == "__main__":
    main()
