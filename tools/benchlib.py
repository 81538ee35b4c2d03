"""What the 2-GPU benchmarks share: the link emulation of DESIGN.md, sizes, codec names."""
from __future__ import annotations

import socket

PATH_ENV = {  # DESIGN.md, "Emulating links on a 2-GPU host"; NCCL reads it at start
    "nvlink": {},
    "host": {"NCCL_P2P_DISABLE": "1"},
    "network": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"},
}


def parse_size(s: str) -> int:
    """'64K', '256M', '1G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def codec_of(name: str):
    """'int4' / 'fp8' / 'bf16' -> the CodecConfig the benchmarks use (group 128, spikes)."""
    from moe_flashcomm import CodecConfig
    bits = int(name[3:]) if name.startswith("int") and name[3:].isdigit() else name
    return CodecConfig(bits=bits, group_size=128, spikes=True)


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


def init_worker(rank: int, world: int, port: int, path: str, device: str) -> None:
    """One benchmark process: the link emulation of ``path`` (before NCCL starts), the
    launcher's variables, the process group (NCCL on GPU ``rank``, or gloo on CPU)."""
    import os

    import torch
    import torch.distributed as dist
    os.environ.update(PATH_ENV[path])
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (KINDS.md)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or None with a note when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
