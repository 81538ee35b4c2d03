"""Fit the all-to-all size gate for this machine and write it as JSON.

For every link path and codec it finds the smallest message (bf16 bytes per peer) from which
the quantized all-to-all is not slower than NCCL's bf16 ``all_to_all_single`` (and NCCL's
call is long enough to hide the quantized call's host time: ``gate.fit_thresholds``), timing
both on 2 GPUs; smaller messages then go as bf16. Each path gets a fresh pair of processes
with NCCL's link emulation set before NCCL starts (docs/design.md, "Link emulation").

    python -m moe_flashcomm.tune_gate --out gate.json              # measure (2 GPUs)
    python -m moe_flashcomm.tune_gate --from-bench out/bench_all2all/bench_all2all.json --out gate.json
    python -m moe_flashcomm.tune_gate --from-bench a.json b.json --python  # runs joined; also a DEFAULT_THRESHOLDS literal
    MOE_FLASHCOMM_GATE_FILE=gate.json python train.py              # use it

``--paths`` and ``--codecs`` measure some link paths or codecs only: the paths and codecs not
measured keep the thresholds the ``--out`` file already holds (so link classes can be tuned
one run at a time), else DEFAULT_THRESHOLDS. ``--cpu-dry-run`` runs the same
code on gloo processes (timings meaningless) to check a setup without GPUs; without ``--out``
it writes its file to a new temporary path (which it prints), never over ./gate.json. The
2-GPU benchmarks in tools/ share this module's link emulation and timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pprint
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .codec import CodecConfig
from .comm.gate import (DEFAULT_THRESHOLDS, NEVER_PAYS, codec_key, fit_thresholds, kept_fields,
                        with_defaults, write_gate)

# NCCL environment per emulated link class on one 2-GPU host; NCCL reads it when it starts.
# Both variables are set for every class: one the caller's shell exports would measure
# another class under this one's name.
LINK_EMULATION = {
    "nvlink": {"NCCL_P2P_DISABLE": "0", "NCCL_SHM_DISABLE": "0"},   # default NCCL (NVLink)
    "host": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "0"},     # through host memory (PCIe)
    "network": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"},  # sockets over loopback
}
# other names a command line may give a link class (docs/design.md, tools/gpu_suite.sh and
# recipes/bench_moe_inference.py --path say host-memory)
LINK_ALIASES = {"host-memory": "host"}
CODECS = ("fp8", "int8", "int6", "int4", "int3", "int2")
SIZES = ("64K", "256K", "1M", "4M", "16M", "64M")
CPU_SIZES = ("64K", "256K")  # --cpu-dry-run (here and in tools/): the reference codec is slow on CPU
HIDDEN = (4096, 7168)
BUDGET_S = 0.2  # seconds of timed calls per measured point


def parse_size(s: str) -> int:
    """'64K', '256M', '1G' or a plain number of bytes, > 0."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        n = int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)
    except (ValueError, IndexError, OverflowError):
        n = 0
    if n < 1:
        raise ValueError(f"size {s!r}: expected bytes > 0, or a number with K, M or G")
    return n


def fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def bench_codec(name: str) -> CodecConfig:
    """'int4' / 'fp8' / 'bf16' -> the CodecConfig the measurements use (group 128, spikes)."""
    bits = name[3:] if name.startswith("int") else name
    return CodecConfig(bits=int(bits) if bits.isdigit() else bits, group_size=128, spikes=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_link_worker(rank: int, world: int, port: int, path: str, device: str) -> None:
    """One measuring process: the link emulation of ``path`` (before NCCL starts), the
    launcher's variables, the process group (NCCL on GPU ``rank``, or gloo on CPU)."""
    import torch
    import torch.distributed as dist
    os.environ.update(LINK_EMULATION[path])
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)


def bench_input(tokens: int, hidden: int, rank: int, device: str):
    """bf16 [tokens, hidden] normal values with 0.1% outliers of +30 (for the spikes)."""
    import torch
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    x = torch.randn(tokens, hidden, device=device, generator=g)
    x += (torch.rand(tokens, hidden, device=device, generator=g) < 0.001) * 30
    return x.bfloat16()


def time_calls(fn: Callable[[], object], budget_s: float, min_reps: int, max_reps: int,
               device: str, warmup: int = 3) -> float:
    """Median ms per call over back-to-back calls (CUDA events on GPU), the max over ranks.
    Every rank runs the same number of calls (agreed through an all_reduce)."""
    import torch
    import torch.distributed as dist

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = torch.tensor([time.perf_counter() - t0], device=device)
    dist.all_reduce(one, op=dist.ReduceOp.MAX)
    reps = int(max(min_reps, min(max_reps, budget_s / max(one.item(), 1e-6))))
    dist.barrier()
    return median_ms(fn, reps, device)


def median_ms(fn: Callable[[], object], reps: int, device: str,
              prep: Callable[[], object] = lambda: None) -> float:
    """Median ms of ``reps`` calls of ``fn`` (CUDA events on GPU), ``prep`` run before each
    outside the timed region; the max over ranks (every rank makes the same calls)."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for s, e in pairs:
            prep()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        times = []
        for _ in range(reps):
            prep()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    med = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def _measure_path(rank: int, world: int, port: int, path: str, cfg: dict, out: str) -> None:
    """Worker: NCCL bf16 and every codec (gate off) at every size of ``cfg``; rank 0 writes
    the rows to ``out``."""
    import torch
    import torch.distributed as dist

    import moe_flashcomm as mf
    device = cfg["device"]
    init_link_worker(rank, world, port, path, device)
    codecs = {name: bench_codec(name) for name in cfg["codecs"]}
    rows = []
    for hidden in cfg["hiddens"]:
        for size in cfg["sizes"]:
            tokens = max(world, size // (2 * hidden) // world * world)
            x = bench_input(tokens, hidden, rank, device)
            out_buf = torch.empty_like(x)
            reps = (3 if size >= 64 << 20 else 10, 200)
            nccl = time_calls(lambda: dist.all_to_all_single(out_buf, x), cfg["budget_s"], *reps, device)
            for name, c in codecs.items():
                ms = time_calls(lambda: mf.all_to_all(x, codec=c, gate=False), cfg["budget_s"],
                                *reps, device)
                rows.append(dict(path=path, hidden=hidden, tokens=tokens, size_bytes=tokens * hidden * 2,
                                 pair_bytes=(tokens // world) * hidden * 2, variant=name, codec=name,
                                 ms=ms, nccl_ms=nccl))
            x = out_buf = None  # (freed before the next size)
            if device == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            print(f"[{path}] hidden {hidden} measured", flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def measure(paths, hiddens, sizes, codecs, budget_s: float = 0.2, device: str = "cuda") -> list:
    """Rows (one per path, hidden size, size and codec) from a fresh pair of processes per path."""
    import torch.multiprocessing as mp
    cfg = dict(hiddens=list(hiddens), sizes=list(sizes), codecs=list(codecs), budget_s=budget_s,
               device=device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            part = Path(tmp) / f"{path}.json"
            mp.spawn(_measure_path, args=(2, free_port(), path, cfg, str(part)), nprocs=2, join=True)
            rows += json.loads(part.read_text())
    return rows


def fit_from_rows(rows: list) -> dict:
    """Thresholds ``{path: {codec_key: bytes}}`` from measured rows: this module's, or a
    tools/bench_all2all.py JSON's (its always-quantized rows; every row needs ``nccl_ms`` or
    an ``nccl`` row of the same path, hidden size and tokens). ValueError: what rows lack."""
    timed = [r for r in rows if r.get("codec") not in (None, "bf16") and not r.get("gated")
             and not r.get("sweep") and not r.get("algorithm") and r.get("path") in LINK_EMULATION]
    if not timed:
        raise ValueError(f"no always-quantized all-to-all rows of a link path ({', '.join(LINK_EMULATION)})")
    nccl = _nccl_times(rows)
    fit = []
    for r in timed:
        lacks = [k for k in ("hidden", "pair_bytes", "ms") if k not in r]
        base = r.get("nccl_ms") or nccl.get(_point(r))
        if lacks or base is None:
            raise ValueError(f"its {r['path']} {r['codec']} rows lack " + (", ".join(lacks) or
                             "an NCCL time (nccl_ms, or an nccl row of its hidden size and tokens)"))
        fit.append(dict(path=r["path"], hidden=r["hidden"], pair_bytes=r["pair_bytes"], ms=r["ms"],
                        nccl_ms=base, codec=codec_key(bench_codec(r["codec"]))))
    return fit_thresholds(fit)


def _point(row: dict) -> tuple:
    """The measured point of a row: its NCCL row has the same."""
    return row.get("path"), row.get("hidden"), row.get("tokens")


def _nccl_times(rows: list) -> dict:
    """``{point: ms}`` of the NCCL rows of one run."""
    return {_point(r): r["ms"] for r in rows if r.get("variant") == "nccl" and "ms" in r}


def is_dry_run(meta: dict) -> bool:
    """Whether a benchmark JSON's ``meta`` says it ran on CPU: the 2-GPU benchmarks and this
    tuner run there only as a dry run (``"cpu (dry run)"``, bench_allreduce.py's
    ``"cpu (gloo)"``), whose timings are meaningless."""
    return str(meta.get("device") or "").startswith("cpu")


def load_bench(path: Path) -> tuple:
    """(rows, meta) of a tools/bench_all2all.py JSON; ValueError naming the file and what it
    lacks (an all-reduce benchmark, a gate file, anything else), or that it is a dry run
    (its fit would be a gate, or a link model, of meaningless timings)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} has no \"rows\" list: not a tools/bench_all2all.py JSON")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    if is_dry_run(meta):
        raise ValueError(f"{path} is a dry run (device {meta['device']!r}): its timings are "
                         "meaningless, nothing to fit; run the benchmark on 2 GPUs")
    try:
        fit_from_rows(rows)  # (cheap) what the fit needs is there
    except ValueError as e:
        raise ValueError(f"{path}: {e}: not a tools/bench_all2all.py JSON") from None
    # each row with its own run's NCCL time: rows of several runs joined (--from-bench a b)
    # are compared with their own run's NCCL, not with the last file's of the same point
    nccl = _nccl_times(rows)
    rows = [r if r.get("nccl_ms") or _point(r) not in nccl else dict(r, nccl_ms=nccl[_point(r)])
            for r in rows]
    return rows, meta


# ---- command-line checks and files, shared with the tools in tools/ (benchlib re-exports) ----

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, and every option's default once: not where the help
    names it already, nor a default that says nothing (None, a flag's False, empty); a list
    as it is typed (``1 2 4``, not ``[1, 2, 4]``). The recipes' parsers use it too."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d in ("", []) or "default" in (action.help or ""):
            return action.help
        text = super()._get_help_string(action)
        if isinstance(d, (list, tuple)):
            text = text.replace("%(default)s", " ".join(map(str, d)).replace("%", "%%"))
        return text


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def float_above(low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > ``low`` (>= with ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= low if inclusive else value > low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} "
                                             f"{low:g}, got {text!r}")
        return value
    return parse


def csv_arg(item: Callable[[str], object] = str, allowed=None) -> Callable[[str], list]:
    """An argparse ``type``: a comma-separated list, each item one of ``allowed`` (if given),
    converted by ``item`` (whose ValueError says why not: parse_size, positive_int); an item
    repeated (or another spelling of one: 1M and 1024K) counts once, as it is measured once."""
    def parse(text: str) -> list:
        out = []
        for v in (v.strip() for v in text.split(",")):
            if allowed is not None and v not in allowed:
                raise argparse.ArgumentTypeError(f"{v!r} is not one of {', '.join(allowed)}")
            try:
                value = item(v)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            if value not in out:
                out.append(value)
        return out
    return parse


SIZES_ARG = csv_arg(parse_size)


def link_class(name: str) -> str:
    """A link class of LINK_EMULATION by its name or one of LINK_ALIASES."""
    link = LINK_ALIASES.get(name, name)
    if link not in LINK_EMULATION:
        aliases = ", ".join(f"{alias} for {to}" for alias, to in LINK_ALIASES.items())
        raise ValueError(f"{name!r} is not one of {', '.join(LINK_EMULATION)} (or {aliases})")
    return link


PATHS_ARG = csv_arg(link_class)  # --paths of this tuner and the benchmarks in tools/


def _out_problem(path: Path, folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written (a file, or a folder with ``folder``), or None. Missing
    folders above it are fine (the tools make them), so a run ends at its start, not after
    its measurements."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return f"{path} is {'not ' if folder else ''}a directory"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def check_out(parser: argparse.ArgumentParser, path: Optional[Path], folder: bool = False,
              option: str = "--out") -> None:
    """End the run through ``parser`` (one line, exit status 2) where ``path`` (a file, or a
    folder with ``folder``; None: not given) cannot be written: checked at the start, not
    after the measurements."""
    problem = path and _out_problem(path, folder)
    if problem:
        parser.error(f"{option}: {problem}")


def check_gate_out(parser: argparse.ArgumentParser, path: Optional[Path], option: str = "--out") -> None:
    """``check_out`` for a gate file, and the tables an existing one keeps (``kept_fields``)."""
    check_out(parser, path, option=option)
    try:
        if path:
            kept_fields(path)
    except ValueError as e:
        parser.error(f"{option}: {e}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None with a note when
    matplotlib (not a dependency) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def require_gpus(n: int = 1, hint: str = "") -> None:
    """End the run with one line (exit status 1) where this machine has fewer than ``n``
    CUDA GPUs: GPU-only tools say so instead of failing in torch.cuda."""
    import torch
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < n:
        sys.exit(f"{Path(sys.argv[0]).name}: needs {'a CUDA GPU' if n == 1 else f'{n} CUDA GPUs'}"
                 f", found {found}{f' ({hint})' if hint else ''}")


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moe_flashcomm.tune_gate", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default gate.json; --cpu-dry-run: a new temporary file, "
                         "printed); an existing gate file keeps its all_reduce table and the "
                         "thresholds of what this run does not measure; another file is refused")
    ap.add_argument("--from-bench", type=Path, nargs="+", metavar="JSON",
                    help="fit on tools/bench_all2all.py JSONs (runs joined, each row against its "
                         "own run's NCCL time; not a dry run's) "
                         "instead of measuring")
    # (None: not given; --from-bench refuses the measuring options)
    ap.add_argument("--paths", type=PATHS_ARG, default=None,
                    help=f"link emulations to measure, comma-separated: a fresh pair of processes "
                         f"each; the others keep the --out file's thresholds, else the "
                         f"built-in ones "
                         f"(default {','.join(LINK_EMULATION)})")
    ap.add_argument("--hidden", type=csv_arg(positive_int), default=None,
                    help=f"hidden sizes to time, comma-separated (default {','.join(map(str, HIDDEN))})")
    ap.add_argument("--codecs", type=csv_arg(allowed=CODECS), default=None,
                    help=f"codecs to time and fit a threshold for, comma-separated; the others keep "
                         f"the --out file's thresholds, else the built-in ones "
                         f"(default {','.join(CODECS)})")
    ap.add_argument("--sizes", type=SIZES_ARG, default=None,
                    help=f"bf16 bytes per rank, e.g. 64K,1M,64M (default {','.join(SIZES)}; "
                         f"--cpu-dry-run: {','.join(CPU_SIZES)})")
    ap.add_argument("--budget", type=float_above(0), default=None,
                    help=f"seconds of timed calls per point (default {BUDGET_S})")
    ap.add_argument("--python", action="store_true", help="also print a DEFAULT_THRESHOLDS literal")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="gloo on CPU, to check the setup without GPUs (timings meaningless); "
                         "without --out it writes a temporary file, not gate.json")
    args = ap.parse_args(argv)
    if args.from_bench:  # it fits stored runs: a measuring option would be ignored
        given = [o for o in ("paths", "hidden", "codecs", "sizes", "budget", "cpu_dry_run")
                 if getattr(args, o) not in (None, False)]
        if given:
            ap.error(f"--{given[0].replace('_', '-')}: not with --from-bench (it fits the stored "
                     f"runs as they were measured)")
    if args.out is None and not args.cpu_dry_run:
        args.out = Path("gate.json")
    check_gate_out(ap, args.out)  # (a dry run's temporary file is made new: nothing to check)
    if args.from_bench:
        rows, devices, dates = [], [], []
        for f in args.from_bench:
            try:
                more, meta = load_bench(f)
            except ValueError as e:
                ap.error(f"--from-bench {e}")
            rows += more
            devices.append(meta.get("device"))
            dates.append(meta.get("date"))
        meta = dict(device=" + ".join(sorted({d for d in devices if d})) or None,
                    date=max((d for d in dates if d), default=None))
    else:
        import torch
        device = "cpu" if args.cpu_dry_run else "cuda"
        if device == "cuda":
            require_gpus(2, "--from-bench fits a stored run, --cpu-dry-run checks the setup")
        sizes = args.sizes or SIZES_ARG(",".join(CPU_SIZES if args.cpu_dry_run else SIZES))
        rows = measure(args.paths or list(LINK_EMULATION), args.hidden or HIDDEN, sizes,
                       args.codecs or CODECS, args.budget or BUDGET_S, device)
        meta = dict(device="cpu (dry run)" if args.cpu_dry_run else f"2x {torch.cuda.get_device_name(0)}",
                    date=datetime.date.today().isoformat())
    fitted = fit_from_rows(rows)
    # what was not measured keeps the file's thresholds (a link class tuned at a time), else
    # the defaults (checked above: kept_fields refuses what would not load)
    old = kept_fields(args.out) if args.out else {}
    previous = None if is_dry_run(old) else old.get("thresholds")  # (a dry run's: meaningless)
    table = with_defaults(fitted, with_defaults(previous, DEFAULT_THRESHOLDS) if previous
                          else DEFAULT_THRESHOLDS)
    if args.out is None:  # a dry run's meaningless thresholds stay out of ./gate.json
        fd, name = tempfile.mkstemp(prefix="gate_dry_run_", suffix=".json")
        os.close(fd)
        args.out = Path(name)
    write_gate(args.out, thresholds=table, units="bf16 bytes per peer", device=meta.get("device"),
               date=meta.get("date"), source="python -m moe_flashcomm.tune_gate")
    for path, row in fitted.items():
        print(f"{path:>8}: " + ", ".join(f"{c} {fmt_size(v) if v < NEVER_PAYS else 'never'}"
                                         for c, v in sorted(row.items())))
    kept = []
    for path, row in table.items():
        missing = [c for c in row if c not in fitted.get(path, {})]
        if missing:
            kept.append(" ".join([path] + (missing if path in fitted else [])))
    if kept:
        print(f"not measured, {'kept as the file had them (else the defaults)' if previous else 'the defaults kept'}: "
              + ", ".join(kept))
    if args.cpu_dry_run:
        print(f"wrote {args.out} (a dry run: timings meaningless, not a gate to use)")
    else:
        print(f"wrote {args.out} (use it with MOE_FLASHCOMM_GATE_FILE={args.out})")
    if args.python:
        print("DEFAULT_THRESHOLDS = " + pprint.pformat(table, width=90))


if __name__ == "__main__":
    main(sys.argv[1:])
