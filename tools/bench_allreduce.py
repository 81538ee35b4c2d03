#!/usr/bin/env python
"""Benchmark moe_flashcomm.all_reduce against NCCL bf16 all_reduce, 2 GPUs.

For each emulated link class (docs/design.md, "Link emulation"; NCCL's environment must be
set before NCCL starts: one pair of fresh processes, one process group, per path) and each tensor size (bf16 bytes per
rank, 1 MiB .. 1 GiB by default) it times, on the same bf16 tensor:

  nccl          torch.distributed.all_reduce (the baseline)
  <codec>       moe_flashcomm.all_reduce(x, codec=<codec>, gate=False): always quantized
  <codec>+gate  moe_flashcomm.all_reduce(x, codec=<codec>): the size gate as shipped (or
                --gate FILE): what a user gets

CUDA events around each call (the input is restored before each call, outside the timed
region, since all-reduce works in place), after warm-up; the median over calls, the slower
rank's. Ratios are NCCL time / ours (> 1: faster than NCCL). Prints a table and the
targets, writes JSON and a PNG plot, and the all-reduce size gate fitted on this run
(--gate-out FILE: a gate file for MOE_FLASHCOMM_GATE_FILE; an existing file keeps its
all-to-all thresholds). A total time budget (--budget) skips the largest sizes when the
run would not fit.

    python tools/bench_allreduce.py --out out/bench_allreduce            # ~4 min on 2 H200s
    python tools/bench_allreduce.py --paths host,network --sizes 256M --codecs int4
    python tools/bench_allreduce.py --device cpu --out out/ar_cpu        # gloo dry run
    python tools/bench_allreduce.py --plot out/bench_allreduce/bench_allreduce.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from moe_flashcomm.tune_gate import median_ms  # noqa: E402
from benchlib import (LINK_EMULATION, PATHS_ARG, QUANTIZED, SIZES_ARG, HelpFormatter, check_gate_out, check_out, bench_codec,  # noqa: E402
                      csv_arg, float_above, fmt_size, free_port, init_link_worker, parse_size,
                      is_dry_run, positive_int, pyplot, ratio_axes, read_json, require_gpus,
                      save_figure, write_gate)

CODECS = ("int4", "int8", "fp8", "int2")
SIZES = ("1M", "4M", "16M", "64M", "256M", "1G")
CPU_SIZES = ("16K", "64K", "256K")
TARGETS = (  # (path, codec, size, minimum NCCL/ours): the targets, 2x H200
    ("host", "int4", 256 << 20, 2.5),
    ("network", "int4", 256 << 20, 3.0),
)
NVLINK_FLOOR = 1 / 1.05  # NVLink, gate on: never more than 5% slower than NCCL


# ---- worker (one process per GPU) ------------------------------------------------------------
def _time(fn, prep, reps: int, dev: str, warmup: int = 2) -> float:
    """Median ms of ``fn`` over ``reps`` calls, ``prep`` run before each call outside the
    timed region; the max over ranks (every rank runs the same calls)."""
    for _ in range(warmup):
        prep()
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return median_ms(fn, reps, dev, prep)


def _agree(flag: bool, dev: str) -> bool:
    """Rank 0's decision, on every rank."""
    t = torch.tensor([int(flag)], device=dev)
    dist.broadcast(t, 0)
    return bool(t.item())


def _input(n: int, rank: int, dev: str) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    x = torch.randn(n, device=dev, generator=g)
    x += (torch.rand(n, device=dev, generator=g) < 0.001) * 30  # outliers for the spikes
    return x.bfloat16()


def _worker(rank: int, world: int, port: int, path: str, cfg: dict, part: str) -> None:
    dev = cfg["device"]  # "cpu" (gloo, host timers): a dry run without GPUs
    if cfg.get("gate_file"):
        os.environ["MOE_FLASHCOMM_GATE_FILE"] = cfg["gate_file"]
    init_link_worker(rank, world, port, path, dev)
    import moe_flashcomm as mf
    from moe_flashcomm.comm import all_reduce as ar
    codecs = {c: bench_codec(c) for c in cfg["codecs"]}
    if rank == 0 and dev == "cuda":
        try:
            t0 = time.perf_counter()
            n = ar.precompile(codecs.values(), [torch.bfloat16])
            print(f"[{path}] {n} kernels compiled or cached in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        except ImportError as e:
            print(f"[{path}] no CUDA kernels ({e}): the reference codec runs (slow)", flush=True)
    dist.barrier()

    rows: list = []
    t_start, budget = time.perf_counter(), cfg["budget_s"]
    last = None  # (size, seconds) of the previous point
    for size in cfg["sizes"]:
        if last is not None:  # the next point takes about (size ratio) x the last one
            projected = last[1] * size / last[0]
            if _agree(time.perf_counter() - t_start + projected > budget, dev):
                rows.append(dict(path=path, size_bytes=size, variant="skipped"))
                if rank == 0:
                    print(f"[{path}] {fmt_size(size)}: skipped (time budget)", flush=True)
                continue
        t0 = time.perf_counter()
        n = size // 2
        src = _input(n, rank, dev)
        x = torch.empty_like(src)
        reps = cfg["reps"] if size < (256 << 20) else max(3, cfg["reps"] // 3)

        def prep():
            x.copy_(src)

        def measure(name: str, fn, **extra) -> float:
            ms = _time(fn, prep, reps, dev)
            rows.append(dict(path=path, size_bytes=size, variant=name, ms=ms, **extra))
            return ms

        nccl = measure("nccl", lambda: dist.all_reduce(x))
        for name, c in codecs.items():
            for chunks in cfg["chunks"]:
                tag = name if chunks is None else f"{name}/chunks={chunks}"
                measure(tag, lambda: mf.all_reduce(x, codec=c, gate=False, chunks=chunks),
                        codec=name, chunks=chunks, nccl_ms=nccl)
            measure(name + "+gate", lambda: mf.all_reduce(x, codec=c), codec=name, gated=True,
                    nccl_ms=nccl)
        src = x = None  # free before the next size
        if dev == "cuda":
            torch.cuda.empty_cache()
        last = (size, time.perf_counter() - t0)
        if rank == 0:
            cells = " ".join(f"{r['variant']}={nccl / r['ms']:.2f}" for r in rows
                             if r["size_bytes"] == size and r.get("codec"))
            print(f"[{path}] {fmt_size(size)}: nccl {nccl:.3f} ms; NCCL/ours {cells}", flush=True)

    if rank == 0:
        Path(part).write_text(json.dumps(dict(rows=rows)))
    dist.barrier()
    dist.destroy_process_group()


def run_paths(cfg: dict, out: Path) -> dict:
    """Run every path in fresh processes (NCCL's environment is read at its start)."""
    rows = []
    t_all = time.perf_counter()
    for i, path in enumerate(cfg["paths"]):
        part = out / f"part_{path}.json"
        left = cfg["total_budget_s"] - (time.perf_counter() - t_all)
        path_cfg = dict(cfg, budget_s=max(5.0, left / (len(cfg["paths"]) - i)))
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(2, free_port(), path, path_cfg, str(part)), nprocs=2, join=True)
        rows += json.loads(part.read_text())["rows"]
        part.unlink()
        print(f"[{path}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return dict(rows=rows)


# ---- report -----------------------------------------------------------------------------------
def _results(rows: list) -> dict:
    """{(path, size, codec): dict(nccl, raw, gate)}: ms of NCCL, always quantized (the
    default chunking; no "raw" where --chunks left out auto), gate on."""
    out: dict = {}
    for r in rows:
        if not r.get("codec") or (r.get("chunks") is not None):
            continue
        cell = out.setdefault((r["path"], r["size_bytes"], r["codec"]), {"nccl": r["nccl_ms"]})
        cell["gate" if r.get("gated") else "raw"] = r["ms"]
    return out


def fitted_gate(rows: list) -> dict:
    """All-reduce thresholds ``{path: {codec_key: bf16 bytes}}`` from this run (gate.fit_thresholds:
    the smallest size from which the codec is never slower than NCCL at a larger size)."""
    from moe_flashcomm.comm.gate import codec_key, fit_thresholds
    pts = [dict(path=p, codec=codec_key(bench_codec(c)), hidden=0, pair_bytes=s, ms=v["raw"],
                nccl_ms=v["nccl"])
           for (p, s, c), v in _results(rows).items() if "raw" in v and p != "cpu"]
    return fit_thresholds(pts)


def report(result: dict) -> str:
    res = _results(result["rows"])
    codecs = [c for c in CODECS + tuple(sorted({k[2] for k in res})) if any(k[2] == c for k in res)]
    codecs = list(dict.fromkeys(codecs))
    lines = []
    for path in LINK_EMULATION:
        sizes = sorted({s for (p, s, _) in res if p == path})
        if not sizes:
            continue
        lines.append(f"\n{path}: NCCL bf16 all_reduce ms, then NCCL time / ours "
                     "(gate on; always quantized in brackets)")
        lines.append(f"{'size':>6} {'nccl ms':>10} " + " ".join(f"{c:>15}" for c in codecs))
        for s in sizes:
            cells = {c: res.get((path, s, c)) for c in codecs}
            base = next(v for v in cells.values() if v)["nccl"]
            row = [f"{'':>15}" if v is None else f"{base / v['gate']:7.2f} "
                   + (f"({base / v['raw']:5.2f})" if "raw" in v else f"({'-':>5})")
                   for v in cells.values()]
            lines.append(f"{fmt_size(s):>6} {base:10.3f} " + " ".join(row))
    chunked = [r for r in result["rows"] if r.get("chunks") is not None]
    if chunked:
        lines.append("\npipelining (ms, NCCL/ours):")
        for r in chunked:
            lines.append(f"  {r['path']:>7} {fmt_size(r['size_bytes']):>5} {r['variant']:>16}: "
                         f"{r['ms']:.3f} ms  {r['nccl_ms'] / r['ms']:.2f}")
    skipped = [r for r in result["rows"] if r["variant"] == "skipped"]
    if skipped:
        lines.append("\nskipped (time budget): " + ", ".join(
            f"{r['path']} {fmt_size(r['size_bytes'])}" for r in skipped))
    if is_dry_run(result.get("meta", {})):
        lines.append("\ntargets (2x H200): not checked on a dry run (--device cpu: timings meaningless)")
        targets = ()
    else:
        lines.append("\ntargets (2x H200):")
        targets = TARGETS
    for path, codec, size, floor in targets:
        v = res.get((path, size, codec))
        got = (f"{v['nccl'] / v['raw']:.2f}x (gate on {v['nccl'] / v['gate']:.2f}x)" if v and "raw" in v
               else "not measured")
        lines.append(f"  {path} {codec} {fmt_size(size)}: >= {floor}x over NCCL bf16: {got}")
    nv = [(s, c, v["nccl"] / v["gate"]) for (p, s, c), v in res.items() if p == "nvlink" and "gate" in v]
    if nv and targets:
        worst = min(nv, key=lambda t: t[2])
        ok = "ok" if worst[2] >= NVLINK_FLOOR else "MISSED"
        lines.append(f"  nvlink, gate on, never > 5% slower (ratio >= {NVLINK_FLOOR:.3f}): worst "
                     f"{worst[2]:.3f} ({worst[1]} {fmt_size(worst[0])}): {ok}")
    gate = result.get("fitted_gate")
    if gate:
        lines.append(f"\nall-reduce gate fitted on this run (bf16 bytes of the tensor): {gate}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    res = _results(result["rows"])
    paths = [p for p in LINK_EMULATION if any(k[0] == p for k in res)]
    if not paths:
        return
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4.2), squeeze=False,
                             sharey=True)
    for j, path in enumerate(paths):
        ax = axes[0][j]
        for c in dict.fromkeys(k[2] for k in res):
            pts = sorted((s, v) for (p, s, cc), v in res.items() if p == path and cc == c)
            if not pts:
                continue
            xs = [s for s, _ in pts]
            line, = ax.plot(xs, [v["nccl"] / v["gate"] for _, v in pts], marker="o", ms=3, label=c)
            raw = [(s, v["nccl"] / v["raw"]) for s, v in pts if "raw" in v]
            if raw:
                ax.plot(*zip(*raw), ls=":", color=line.get_color(), lw=1)
        for p, codec, size, floor in TARGETS:
            if p == path:
                ax.plot([size], [floor], marker="_", ms=14, color="r")
        ratio_axes(ax, path, "tensor bytes per rank (bf16)",
                   "NCCL bf16 all_reduce time / ours" if j == 0 else None, NVLINK_FLOOR)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, png, "moe_flashcomm.all_reduce vs NCCL all_reduce, 2 ranks "
                "(solid: gate on; dotted: always quantized; red ticks: targets)")


def write_all_reduce_gate(path: Path, table: dict) -> None:
    """A gate file with this run's all-reduce table (the defaults for the paths and codecs not
    measured); an existing gate file's all-to-all thresholds and notes are kept
    (benchlib.write_gate)."""
    from moe_flashcomm.comm.gate import DEFAULT_ALL_REDUCE_THRESHOLDS, with_defaults
    # (a whole row would also drop the path's "*")
    write_gate(path, all_reduce=with_defaults(table, DEFAULT_ALL_REDUCE_THRESHOLDS))
    print(f"gate file: {path} (use: MOE_FLASHCOMM_GATE_FILE={path})")


def chunks_arg(text: str) -> list:
    """--chunks: comma-separated 'auto' (None: the library's choice) or ints >= 1."""
    return csv_arg(lambda c: None if c == "auto" else positive_int(c))(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench_allreduce"),
                    help="folder to write bench_allreduce.json, bench_allreduce.txt and "
                         "bench_allreduce.png to")
    ap.add_argument("--paths", type=PATHS_ARG, default=",".join(LINK_EMULATION),
                    help="link emulations to time, comma-separated: a fresh pair of processes each")
    ap.add_argument("--codecs", type=csv_arg(allowed=QUANTIZED), default=",".join(CODECS),
                    help="codecs to time against NCCL, comma-separated, of " + ",".join(QUANTIZED))
    ap.add_argument("--sizes", type=SIZES_ARG, default=None,
                    help=f"bf16 bytes per rank (default {','.join(SIZES)}; cpu: {','.join(CPU_SIZES)})")
    ap.add_argument("--chunks", type=chunks_arg, default="auto",
                    help="pipeline ranges to time, e.g. auto,1,2,4 (auto: the library's choice; "
                         "the table's always-quantized column and the fitted gate need it)")
    ap.add_argument("--reps", type=positive_int, default=15, help="timed calls per point (a third from 256M)")
    ap.add_argument("--budget", type=float_above(0), default=170.0,
                    help="total seconds for the whole run; the largest sizes are skipped past it")
    ap.add_argument("--gate", type=Path, help="gate file for the '+gate' variant (default: shipped)")
    ap.add_argument("--gate-out", type=Path, help="write the fitted all-reduce gate here (not with --device cpu)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: gloo on CPU to check this script (timings meaningless)")
    ap.add_argument("--plot", type=Path, help="only report and replot this JSON")
    args = ap.parse_args(argv)
    if args.plot:
        result = read_json(ap, args.plot)
        report(result)
        plot(result, args.plot.with_suffix(".png"))
        return
    check_out(ap, args.out, folder=True)
    if args.gate_out and args.device == "cpu":  # nothing fitted: it would write the defaults
        ap.error("--gate-out: a dry run (--device cpu) fits no gate; run it on 2 GPUs")
    if args.gate_out and None not in args.chunks:  # (the fit is on the default chunking's times)
        ap.error("--gate-out: the fit needs the library's chunking: add auto to --chunks")
    check_gate_out(ap, args.gate_out, option="--gate-out")
    from moe_flashcomm import SizeGate
    try:  # the '+gate' variant's table, read in every worker: checked here, not there
        SizeGate.load(args.gate) if args.gate else SizeGate.default()
    except ValueError as e:
        ap.error(f"--gate: {e}" if args.gate else str(e))
    if args.device == "cuda":
        require_gpus(2, "--device cpu for a dry run")
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = args.sizes or [parse_size(s) for s in (CPU_SIZES if args.device == "cpu" else SIZES)]
    cfg = dict(paths=args.paths, codecs=args.codecs, sizes=sorted(sizes), reps=args.reps,
               chunks=args.chunks, total_budget_s=args.budget, device=args.device,
               gate_file=str(args.gate.resolve()) if args.gate else None)
    t0 = time.perf_counter()
    result = run_paths(cfg, args.out)
    result["fitted_gate"] = fitted_gate(result["rows"]) if args.device == "cuda" else {}
    result["meta"] = dict(
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        device=f"2x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "cpu (gloo)",
        torch=torch.__version__,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
        date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - t0, 1),
        config=cfg)
    out_json = args.out / "bench_allreduce.json"
    out_json.write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "bench_allreduce.txt").write_text(text + "\n")
    plot(result, out_json.with_suffix(".png"))
    if args.gate_out:
        write_all_reduce_gate(args.gate_out, result["fitted_gate"])
    print(f"json: {out_json}")


if __name__ == "__main__":
    main()
