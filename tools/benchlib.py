"""What the benchmarks share. The link emulation, sizes, codec names, process setup, free
ports, argument checks (argparse types, --help's formatter, --out, "needs a CUDA GPU") and
matplotlib where installed are the size-gate tuner's (moe_flashcomm.tune_gate, which uses
them too, as do the recipes), gate files the gate's; re-exported here."""
from __future__ import annotations

import json

from moe_flashcomm.tune_gate import (CPU_SIZES, LINK_EMULATION, PATHS_ARG, SIZES_ARG, bench_codec, csv_arg,
                                     float_above, fmt_size, free_port, init_link_worker, is_dry_run)
from moe_flashcomm.comm.gate import write_gate
from moe_flashcomm.tune_gate import (HelpFormatter, check_gate_out, check_out, parse_size, positive_int,
                                     pyplot, require_gpus)

__all__ = ["CPU_SIZES", "HelpFormatter", "LINK_EMULATION", "PATHS_ARG", "QUANTIZED", "SIZES_ARG",
           "a2a_tokens", "burst_ms",
           "bench_codec", "check_gate_out", "check_out", "csv_arg", "float_above", "fmt_size", "free_port",
           "init_link_worker",
           "is_dry_run", "parse_size", "positive_int", "pyplot", "ratio_axes", "read_json", "require_gpus",
           "rounded_sizes_note", "save_figure", "write_gate"]

# the quantized codecs by their command-line names
QUANTIZED = ("fp8",) + tuple(f"int{b}" for b in range(2, 9))


def a2a_tokens(size: int, hidden: int, world: int) -> int:
    """Rows of the all-to-all timed for ``size`` bf16 bytes asked: whole rows of ``hidden``,
    a multiple of ``world`` (the even split), rounded down (``world`` rows at least)."""
    return max(world, size // (2 * hidden) // world * world)


def rounded_sizes_note(asked, hidden: int, world: int) -> str:
    """A table's note where its sizes (whole rows, ``a2a_tokens``) are not those asked (a
    56K row where 64K was asked, at hidden 7168); "" where every size is as asked."""
    moved = [f"{fmt_size(s)} -> {fmt_size(b)}" for s in asked
             if (b := a2a_tokens(s, hidden, world) * hidden * 2) != s]
    if not moved:
        return ""
    return (f"note: at hidden {hidden} the sizes are whole token rows split evenly over {world} "
            f"ranks, rounded down from those asked: {', '.join(moved)}")


def read_json(parser, path, option: str = "--plot") -> dict:
    """A recorded run's JSON object (``--plot FILE``); a file that is missing, unreadable or
    not such a JSON ends the run through ``parser`` (one line naming ``option``, status 2)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        parser.error(f"{option} {path}: cannot read it: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        parser.error(f"{option} {path}: no \"rows\" list: not a JSON this tool wrote")
    return data


def burst_ms(fn, before=None, warmup: int = 3, rounds: int = 5, calls: int = 10) -> float:
    """Median ms per call of ``fn`` on the GPU: ``rounds`` bursts of ``calls`` back-to-back
    calls between two CUDA events (kernel time, not launch latency), after ``warmup`` calls.
    ``before()`` runs ahead of each burst (e.g. a barrier so two ranks start together)."""
    import statistics

    import torch
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        if before is not None:
            before()
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / calls)
    return statistics.median(ts)


def ratio_axes(ax, title: str, xlabel: str, ylabel, floor: float, log_y: bool = True) -> None:
    """Style a panel of "NCCL time / ours" against bytes: parity at 1, the floor of the
    5% bound dashed, log2 axes, a grid; ``ylabel`` None on panels beside the first."""
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(floor, color="r", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, png, title: str) -> None:
    """Title, save and close ``fig`` (pyplot keeps every figure open until it is closed)."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot().close(fig)
    print(f"plot: {png}")
