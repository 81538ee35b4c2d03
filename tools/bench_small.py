#!/usr/bin/env python
"""Small and mid-size messages: is the library as shipped ever slower than NCCL bf16? 2 GPUs.

The issues' bound: at no size (all-to-all: from 64 KiB per rank) more than 5% slower than
NCCL bf16, with the default size gate. Below the gate's thresholds the library issues the
same NCCL collective as the baseline, so any difference is host time or noise; this tool
measures it with less noise than tools/bench_all2all.py's per-call timing (which reads
host-bound calls one event pair at a time, after the baseline's own series):

- Interleaved: every round times one burst of each variant (NCCL first in one round, last
  in the next, order rotating), so drift hits all alike; median over rounds of the time per
  call, the slower rank's (all bursts of a variant on a rank, max over ranks per burst).
- One untimed call of the same variant before each burst lines the two GPUs up.
- Two regimes per burst of K back-to-back calls between two CUDA events:
    issue   the calls as the host issues them: below a few MiB this is host-bound, so the
            Python wrapper's time per call shows in full;
    device  the same burst queued behind a GPU sleep long enough that the host is ahead
            (checked per burst: the start event must still be pending after the last
            call is issued): the GPU time of the calls, what a training step sees when
            its host runs ahead, and how nccl-tests times collectives.

Variants, on the same bf16 tensor, the library with its default gate:
  all-to-all  nccl: dist.all_to_all_single(torch.empty_like(x), x)  (DeepSpeed's _AllToAll)
              <codec>: moe_flashcomm.all_to_all(x, codec=<codec>)
  all-reduce  nccl: dist.all_reduce(x); <codec>: moe_flashcomm.all_reduce(x, codec=<codec>)
              (x restored before each burst, outside the timed region)

    python tools/bench_small.py --out out/small                 # 3 paths, ~3 min on 2 H200s
    python tools/bench_small.py --paths nvlink --ops all_reduce --sizes 1M,4M
    python tools/bench_small.py --plot out/small/bench_small.json
    python tools/bench_small.py --cpu-dry-run --out /tmp/small  # gloo: checks the script only
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchlib import (CPU_SIZES, LINK_EMULATION, PATHS_ARG, QUANTIZED, SIZES_ARG, HelpFormatter,  # noqa: E402
                      a2a_tokens, bench_codec, check_out, csv_arg, fmt_size, free_port,
                      init_link_worker, is_dry_run, positive_int, pyplot, ratio_axes, read_json,
                      require_gpus, rounded_sizes_note, save_figure)

A2A_CODECS = ("bf16", "fp8", "int8", "int6", "int4", "int3", "int2")
AR_CODECS = ("int4", "int8", "fp8", "int2")
A2A_SIZES = ("64K", "256K", "1M", "4M", "16M", "64M")
AR_SIZES = ("1M", "4M", "16M", "64M", "256M")
MODES = ("issue", "device")
OPS = ("all_to_all", "all_reduce")
FLOOR = 1 / 1.05  # "never more than 5% slower"
BURST_MS = 2.0  # calls per burst: about this much GPU time, 3..30 calls
HOST_MS = 1.0  # more host time than any call issue takes


class Burst:
    """Times bursts of back-to-back calls on one rank (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.cycles_per_ms = self._sleep_rate() if self.cuda else 0.0

    @staticmethod
    def _sleep_rate() -> float:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # load the kernel
        s.record()
        torch.cuda._sleep(2_000_000)
        e.record()
        torch.cuda.synchronize()
        return 2_000_000 / s.elapsed_time(e)

    def run(self, fn, calls: int, mode: str, lead_ms: float) -> tuple[float, bool]:
        """(ms per call, host ahead): one aligning call, then ``calls`` calls between two
        events; ``mode == "device"``: all of it queued behind a sleep of ``lead_ms``."""
        if not self.cuda:
            fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) * 1e3 / calls, False
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        if mode == "device":
            torch.cuda._sleep(int(lead_ms * self.cycles_per_ms))
        fn()  # both GPUs leave this collective together
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        ahead = not s.query()  # the GPU had not reached the burst when the host finished it
        torch.cuda.synchronize()
        return s.elapsed_time(e) / calls, ahead


def _input(shape, rank: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    x = torch.randn(*shape, device=device, generator=g)
    x += (torch.rand(*shape, device=device, generator=g) < 0.001) * 30  # outliers: spikes
    return x.bfloat16()


def _cases(cfg: dict, rank: int, world: int, mf):
    """(op, hidden, size, {variant: (fn, prep)}) per measured point."""
    dev = cfg["device"]
    if "all_to_all" in cfg["ops"]:
        for H in cfg["hiddens"]:
            for size in cfg["a2a_sizes"]:
                T = a2a_tokens(size, H, world)
                x = _input((T, H), rank, dev)
                fns = {"nccl": (lambda x=x: dist.all_to_all_single(torch.empty_like(x), x), None)}
                for name in cfg["a2a_codecs"]:
                    c = bench_codec(name)
                    fns[name] = (lambda x=x, c=c: mf.all_to_all(x, codec=c), None)
                yield "all_to_all", H, T * H * 2, fns
    if "all_reduce" in cfg["ops"]:
        for size in cfg["ar_sizes"]:
            x0 = _input((size // 2,), rank, dev)
            x = x0.clone()
            prep = lambda x=x, x0=x0: x.copy_(x0)  # noqa: E731
            fns = {"nccl": (lambda x=x: dist.all_reduce(x), prep)}
            for name in cfg["ar_codecs"]:
                c = bench_codec(name)
                fns[name] = (lambda x=x, c=c: mf.all_reduce(x, codec=c), prep)
            yield "all_reduce", 0, size, fns


def _worker(rank: int, world: int, port: int, path: str, cfg: dict, part: str) -> None:
    dev = cfg["device"]
    init_link_worker(rank, world, port, path, dev)
    import moe_flashcomm as mf
    burst = Burst(dev)
    rows, t_start = [], time.perf_counter()
    points = list(_cases(cfg, rank, world, mf))  # inputs are small: all made up front
    bar = None
    if rank == 0 and not cfg["no_progress"]:
        from tqdm import tqdm
        bar = tqdm(total=len(points), desc=f"{path:>7}", file=sys.stdout, mininterval=2)
    for op, H, size, fns in points:
        # warm up (first calls compile kernels, check configurations, set up buffers) and
        # size the bursts: about BURST_MS of the slowest variant's per-call time
        per_call = 0.0
        for fn, prep in fns.values():
            for _ in range(3):
                if prep:
                    prep()
                fn()
            ms, _ = burst.run(fn, 3, "issue", 0)
            per_call = max(per_call, ms)
        agreed = torch.tensor([per_call], dtype=torch.float64, device=dev)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # every rank runs the same bursts
        per_call = agreed.item()
        calls = int(min(30, max(3, BURST_MS / max(per_call, 1e-3))))
        # the sleep must outlast issuing the burst: a call's host time is below twice its
        # measured time and below HOST_MS (the P2P call at 256 MiB: 0.23 ms)
        lead_ms = min(2 * per_call, HOST_MS) * (calls + 1) + 0.5
        names = list(fns)
        times = {(n, m): [] for n in names for m in cfg["modes"]}
        ahead = {n: 0 for n in names}
        for r in range(cfg["rounds"]):
            order = names[r % len(names):] + names[:r % len(names)]
            for mode in cfg["modes"]:
                for n in order:
                    fn, prep = fns[n]
                    if prep:
                        prep()
                    ms, was_ahead = burst.run(fn, calls, mode, lead_ms)
                    times[(n, mode)].append(ms)
                    ahead[n] += was_ahead and mode == "device"
        keys = list(times)
        flat = torch.tensor([t for k in keys for t in times[k]], dtype=torch.float64,
                            device=dev)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)  # the slower rank, burst by burst
        flat = flat.view(len(keys), cfg["rounds"]).tolist()
        ahead_all = torch.tensor([ahead[n] for n in names], device=dev)
        dist.all_reduce(ahead_all, op=dist.ReduceOp.MIN)
        for (n, mode), ts in zip(keys, flat):
            rows.append(dict(path=path, op=op, hidden=H, size_bytes=size, variant=n, mode=mode,
                             ms=statistics.median(ts), rounds_ms=ts, calls=calls,
                             host_ahead=(int(ahead_all[names.index(n)]) if mode == "device"
                                         else None)))
        if bar:
            bar.update()
        elif rank == 0:
            print(f"[{path}] {op} {f'H {H} ' if H else ''}{fmt_size(size)}: {calls} calls per "
                  f"burst, {time.perf_counter() - t_start:.0f} s", flush=True)
    if bar:
        bar.close()
    if rank == 0:
        Path(part).write_text(json.dumps(dict(rows=rows)))
    dist.barrier()
    dist.destroy_process_group()


# ---- report -----------------------------------------------------------------------------------
def ratios(rows: list) -> list:
    """Per (path, op, hidden, size, mode, variant != nccl): NCCL ms / ours."""
    base = {(r["path"], r["op"], r["hidden"], r["size_bytes"], r["mode"]): r["ms"]
            for r in rows if r["variant"] == "nccl"}
    out = []
    for r in rows:
        if r["variant"] != "nccl":
            b = base[(r["path"], r["op"], r["hidden"], r["size_bytes"], r["mode"])]
            out.append(dict(r, nccl_ms=b, ratio=b / r["ms"]))
    return out


def print_tables(result: dict) -> str:
    rs = ratios(result["rows"])
    asked = result.get("meta", {}).get("config", {}).get("a2a_sizes", [])  # (2 ranks: main)
    lines = [n for H in sorted({r["hidden"] for r in rs if r["op"] == "all_to_all"})
             if (n := rounded_sizes_note(asked, H, 2))]
    for path in LINK_EMULATION:
        for op in ("all_to_all", "all_reduce"):
            sel = [r for r in rs if r["path"] == path and r["op"] == op]
            if not sel:
                continue
            variants = list(dict.fromkeys(r["variant"] for r in sel))
            for H in sorted({r["hidden"] for r in sel}):
                for mode in MODES:
                    pts = [r for r in sel if r["hidden"] == H and r["mode"] == mode]
                    if not pts:
                        continue
                    lines.append(f"\n{path} {op}{f', hidden {H}' if H else ''}, {mode}: NCCL "
                                 f"bf16 us per call, then NCCL time / ours (default gate)")
                    lines.append(f"{'size':>9} {'nccl us':>8} " + " ".join(f"{v:>6}" for v in variants))
                    for size in sorted({r["size_bytes"] for r in pts}):
                        cells = {r["variant"]: r for r in pts if r["size_bytes"] == size}
                        nccl = next(iter(cells.values()))["nccl_ms"] * 1e3
                        row = " ".join(f"{cells[v]['ratio']:6.2f}" if v in cells else " " * 6
                                       for v in variants)
                        lines.append(f"{fmt_size(size):>9} {nccl:8.1f} {row}")
    if is_dry_run(result.get("meta", {})):  # gloo's timings: a verdict would mean nothing
        lines.append("\nworst NCCL/ours per path and regime: not checked on a dry run "
                     "(--cpu-dry-run: timings meaningless)")
        checked = ()
    else:
        lines.append("\nworst NCCL/ours per path and regime (>= 0.952 is within 5%):")
        checked = LINK_EMULATION
    for path in checked:
        for op in ("all_to_all", "all_reduce"):
            for mode in MODES:
                sel = [r for r in rs if r["path"] == path and r["op"] == op and r["mode"] == mode]
                if sel:
                    w = min(sel, key=lambda r: r["ratio"])
                    where = f"{w['variant']}, {fmt_size(w['size_bytes'])}"
                    if w["hidden"]:
                        where += f", H {w['hidden']}"
                    lines.append(f"  {path:>7} {op:>10} {mode:>6}: {w['ratio']:.3f} ({where})"
                                 f"{'' if w['ratio'] >= FLOOR else '  > 5% slower'}")
    behind = [r for r in result["rows"] if r["mode"] == "device" and r["host_ahead"] is not None
              and r["host_ahead"] < len(r["rounds_ms"])]
    if behind:
        lines.append(f"\n{len(behind)} device-regime points where the host was not ahead in "
                     f"every burst (their GPU time may include host time)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rs = ratios(result["rows"])
    paths = [p for p in LINK_EMULATION if any(r["path"] == p for r in rs)]
    ops = [o for o in ("all_to_all", "all_reduce") if any(r["op"] == o for r in rs)]
    fig, axes = plt.subplots(len(ops), len(paths), figsize=(5.5 * len(paths), 4 * len(ops)),
                             squeeze=False, sharey=True)
    for i, op in enumerate(ops):
        for j, path in enumerate(paths):
            ax = axes[i][j]
            for mode in MODES:
                sel = [r for r in rs if r["path"] == path and r["op"] == op and r["mode"] == mode]
                if not sel:
                    continue
                hidden = max(r["hidden"] for r in sel)  # all-reduce rows: 0
                for color, v in enumerate(dict.fromkeys(r["variant"] for r in sel)):
                    pts = sorted((r["size_bytes"], r["ratio"]) for r in sel
                                 if r["variant"] == v and r["hidden"] == hidden)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                            ls="-" if mode == "device" else ":", label=f"{v} ({mode})",
                            color=f"C{color}")
            ratio_axes(ax, f"{path}, {op}", "bytes per rank (bf16)",
                       "NCCL bf16 time / ours" if j == 0 else None, FLOOR, log_y=False)
            ax.legend(fontsize=6, ncol=2)
    save_figure(fig, png, "moe_flashcomm (default size gate) vs NCCL bf16, 2 GPUs: solid = GPU "
                "time (host ahead), dotted = as issued (largest hidden size)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench_small"),
                    help="folder to write bench_small.json, table.txt and bench_small.png to")
    ap.add_argument("--paths", type=PATHS_ARG, default=",".join(LINK_EMULATION),
                    help="link emulations to time, comma-separated: a fresh pair of processes each")
    ap.add_argument("--ops", type=csv_arg(allowed=OPS), default=",".join(OPS),
                    help="collectives to time, comma-separated")
    ap.add_argument("--hidden", type=csv_arg(positive_int), default="4096,7168",
                    help="hidden sizes of the all-to-all, comma-separated")
    ap.add_argument("--a2a-codecs", type=csv_arg(allowed=A2A_CODECS), default=",".join(A2A_CODECS),
                    help="all-to-all codecs to time against NCCL, comma-separated")
    ap.add_argument("--ar-codecs", type=csv_arg(allowed=QUANTIZED), default=",".join(AR_CODECS),
                    help="all-reduce codecs to time against NCCL, comma-separated, of "
                         + ",".join(QUANTIZED))
    ap.add_argument("--sizes", type=SIZES_ARG, default=None,
                    help=f"all-to-all bf16 bytes per rank (default {','.join(A2A_SIZES)}; "
                         f"--cpu-dry-run: {','.join(CPU_SIZES)})")
    ap.add_argument("--ar-sizes", type=SIZES_ARG, default=None,
                    help=f"all-reduce bf16 bytes per rank (default {','.join(AR_SIZES)}; "
                         f"--cpu-dry-run: {','.join(CPU_SIZES)})")
    ap.add_argument("--modes", type=csv_arg(allowed=MODES), default=",".join(MODES),
                    help="timing regimes (see above), comma-separated; --cpu-dry-run: issue only")
    ap.add_argument("--rounds", type=positive_int, default=9,
                    help="rounds of one burst per variant; the median over rounds counts")
    ap.add_argument("--plot", type=Path, help="only print and plot this JSON")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (tqdm): a line per point instead")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="gloo on CPU, to check this script without GPUs (timings meaningless)")
    args = ap.parse_args(argv)
    if args.plot:
        result = read_json(ap, args.plot)
        print_tables(result)
        plot(result, args.plot.with_suffix(".png"))
        return
    check_out(ap, args.out, folder=True)
    if not args.cpu_dry_run:
        require_gpus(2, "--cpu-dry-run checks this script without GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, sizes in (("sizes", A2A_SIZES), ("ar_sizes", AR_SIZES)):
        if getattr(args, name) is None:
            setattr(args, name, SIZES_ARG(",".join(CPU_SIZES if args.cpu_dry_run else sizes)))
    cfg = dict(ops=args.ops, modes=["issue"] if args.cpu_dry_run else args.modes,
               rounds=args.rounds, hiddens=args.hidden, a2a_codecs=args.a2a_codecs,
               ar_codecs=args.ar_codecs, a2a_sizes=args.sizes, ar_sizes=args.ar_sizes,
               no_progress=args.no_progress, device="cpu" if args.cpu_dry_run else "cuda")
    t0 = time.perf_counter()
    rows = []
    for path in args.paths:
        part = args.out / f"part_{path}.json"
        mp.spawn(_worker, args=(2, free_port(), path, cfg, str(part)), nprocs=2, join=True)
        rows += json.loads(part.read_text())["rows"]
        part.unlink()
        print(f"[{path}] done at {time.perf_counter() - t0:.0f} s", flush=True)
    result = dict(rows=rows, meta=dict(
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        device=f"2x {torch.cuda.get_device_name(0)}" if not args.cpu_dry_run else "cpu (dry run)",
        torch=torch.__version__,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if not args.cpu_dry_run else None,
        date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - t0, 1),
        config=cfg))
    (args.out / "bench_small.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.txt").write_text(print_tables(result))
    plot(result, args.out / "bench_small.png")
    print(f"total {time.perf_counter() - t0:.0f} s; JSON, table and plot in {args.out}")


if __name__ == "__main__":
    main()
