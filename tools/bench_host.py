"""Host and GPU time per call of the quantized intra-node all-to-all (peer-to-peer transport)
and of the codec, against NCCL's own ``all_to_all_single`` measured in the same run.

Two processes (``--world``); each rank on its own GPU when there are enough, else all on GPU 0
(gloo carries the small agreement collectives, CUDA IPC the data: host time is representative
there, bandwidth is not). NCCL's baseline is ``all_to_all_single`` on a one-rank NCCL group.
Processes sharing a GPU take turns on it, so their GPU times say nothing, unless they run
under CUDA MPS (``--mps``: started by the caller), where their kernels run side by side.

Per size (bf16 bytes per rank) and codec it prints:
  host_us     host time of one forward call under autograd (x.requires_grad), the host ahead
              of the GPU (bursts queued behind a GPU sleep), median over rounds;
  nccl_us     the same for NCCL's all_to_all_single of the bf16 tensor, its bursts taking
              turns with ours (ratio: the median of ours / NCCL's per round);
  gpu_us      GPU time of one call (CUDA events around a burst queued behind a GPU sleep, so
              the GPU runs the calls back to back, per call);
  kernels_us  the sum of the call's kernel and copy times (torch.profiler, per call; the
              same way); gpu_us / kernels_us - 1 is the GPU's idle time inside a call (a
              kernel's time includes its waits for a peer: where the ranks' calls do not
              start together, the sum over-counts);
and the host time of ``moe_flashcomm.encode`` / ``decode`` (8 x 7168 bf16), both in the two
processes and first in this one alone, with its parts (``codec_alone``). Launches go through
the launcher MOE_FLASHCOMM_NATIVE_LAUNCH picks; ``--launchers both`` also times ctypes against
the compiled launcher (csrc/launcher.cpp) in the same run, the two taking turns with NCCL.
A plot of host µs per size and codec goes beside the JSON (``--plot JSON``: only that).

    python tools/bench_host.py --out docs/data/bench_host.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_flashcomm as mf  # noqa: E402
from benchlib import (SIZES_ARG, HelpFormatter, check_out, csv_arg, fmt_size, parse_size,  # noqa: E402
                      positive_int, pyplot, read_json, require_gpus, save_figure)

H = 7168
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
CODECS = {"int4": mf.CodecConfig(bits=4), "int8": mf.CodecConfig(bits=8),
          "int2": mf.CodecConfig(bits=2), "fp8": mf.CodecConfig(bits="fp8")}
BURST, ROUNDS = 16, 31


def _burst_us(fn, burst: int, clock=time.perf_counter) -> float:
    """Host time of one call in a burst of ``burst`` calls, the GPU kept busy so the host runs
    ahead (``clock=time.thread_time``: the calling thread's CPU time instead of wall time)."""
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()  # both ranks start their bursts together (their kernels pair up)
    torch.cuda._sleep(2_000_000)  # ~1 ms of GPU work queued first
    t = clock()
    for _ in range(burst):
        fn()
    return (clock() - t) / burst * 1e6


def _host_us(fn, rounds=ROUNDS, burst=BURST, clock=time.perf_counter) -> float:
    """Median over ``rounds`` bursts of the host time of one call."""
    times = [_burst_us(fn, burst, clock) for _ in range(rounds)]
    torch.cuda.synchronize()
    return statistics.median(times)


def _turns(fns: dict, rounds=ROUNDS, burst=BURST, before: Optional[dict] = None) -> dict:
    """Host µs of one call of each of ``fns`` per round: they take turns, burst by burst,
    so a change in the host's load reaches all alike. ``before[name]()`` runs (untimed)
    before each of that one's bursts."""
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before and name in before:
                before[name]()
            times[name].append(_burst_us(fn, burst))
    torch.cuda.synchronize()
    return times


def _ratio(times: dict, a: str, b: str) -> float:
    """The median of the per-round ratios a / b of ``_turns``' times."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _profile(fn, calls=64) -> str:
    import cProfile
    import io
    import pstats
    torch.cuda.synchronize()
    torch.cuda._sleep(5_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def _gpu_us(fn, calls=20) -> float:
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(5_000_000)  # the host queues every call before the GPU starts them
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / calls


def _kernels_us(fn, calls=5) -> float:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(5_000_000)  # (as _gpu_us; its spin_kernel is left out below)
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages()
                if e.device_time_total and not e.key.startswith("ProfilerStep")
                and "spin_kernel" not in e.key)
    return total / calls


def codec_alone(both: bool = False) -> dict:
    """Host µs of ``encode`` / ``decode`` of 8 x 7168 bf16 (int4) in one process with the GPU
    to itself, and of their parts: the output allocation, the prepared driver launch
    (``Launch``), the bare ``cuLaunchKernel`` and a trivial driver call through ctypes, a torch
    add for scale; then (``busy_*``) the same with another Python thread of the process
    spinning, where a driver call that gives up the GIL (ctypes ``CDLL``) waits for it.
    ``both``: first ``encode`` / ``decode`` through ctypes and through the compiled launcher,
    taking turns (``*_ctypes_us``, ``*_compiled_us``), and their ratios."""
    import ctypes
    import threading
    from moe_flashcomm import kernels as K
    from moe_flashcomm.codec import cuda as C
    x8 = torch.randn(8, H, dtype=torch.bfloat16, device="cuda")
    cfg = mf.CodecConfig(bits=4)
    rec = mf.encode(x8, cfg)
    mf.decode(rec, cfg, H, torch.bfloat16)
    dev = torch.cuda.current_device()
    launch, = C.encode_launches(dev, 8, H, cfg, torch.bfloat16, True)  # the codec's own
    name, ((blocks, x_off, r_off, args),) = C.encode_pieces(8, H, cfg, torch.bfloat16, True)
    function = K.KERNELS.function(dev, "codec_encode.cu", name)
    by_ctypes = K.CtypesLaunch(dev, function, blocks, K.BLOCK, K.ArgumentBlock((x_off, r_off, args)))
    params = by_ctypes._params
    stream = K.raw_stream(dev)
    xp, rp = x8.data_ptr(), rec.data_ptr()
    driver = K.KERNELS.driver
    released = ctypes.CDLL("libcuda.so.1").cuLaunchKernel  # the GIL given up around the call
    released.argtypes, released.restype = driver.launch.argtypes, ctypes.c_int
    ctx = ctypes.c_void_p()
    t = dict(encode_us=lambda: mf.encode(x8, cfg),
             decode_us=lambda: mf.decode(rec, cfg, H, torch.bfloat16),
             empty_us=lambda: torch.empty(8, rec.shape[1], dtype=torch.uint8, device="cuda"),
             launch_us=lambda: launch(stream, xp, rp),
             ctypes_launch_us=lambda: by_ctypes(stream, xp, rp),
             driver_launch_us=lambda: driver.launch(function, blocks, 1, 1, 256, 1, 1, 0,
                                                    stream, params, None),
             driver_trivial_us=lambda: driver._lib.cuCtxGetCurrent(ctypes.byref(ctx)),
             torch_add_us=lambda: x8.add(1))
    launcher = "ctypes" if K.KERNELS.native is None else "compiled"
    out = {}
    if both:
        fns, before = {}, {}
        for kind in ("ctypes", "compiled"):
            use = (lambda c: lambda: K.KERNELS.use_launcher(c))(kind == "compiled")
            use()
            mf.encode(x8, cfg), mf.decode(rec, cfg, H, torch.bfloat16)  # this launcher's repeats
            fns[f"encode_{kind}_us"], before[f"encode_{kind}_us"] = t["encode_us"], use
            fns[f"decode_{kind}_us"], before[f"decode_{kind}_us"] = t["decode_us"], use
        times = _turns(fns, burst=64, before=before)
        out.update({name: statistics.median(v) for name, v in times.items()})
        for op in ("encode", "decode"):
            out[f"{op}_compiled_over_ctypes"] = _ratio(times, f"{op}_compiled_us", f"{op}_ctypes_us")
        K.KERNELS.use_launcher(launcher == "compiled")
    out.update({name: _host_us(fn, burst=64) for name, fn in t.items()})
    out["launcher"] = launcher
    spinning = [True]

    def spin() -> None:
        n = 0
        while spinning[0]:
            n += 1
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    busy = dict(busy_launch_us=t["launch_us"], busy_encode_us=t["encode_us"],
                busy_released_launch_us=lambda: released(function, blocks, 1, 1, 256, 1, 1, 0,
                                                         stream, params, None),
                busy_torch_add_us=t["torch_add_us"])
    out.update({name: _host_us(fn, rounds=3, burst=8) for name, fn in busy.items()})
    spinning[0] = False
    thread.join()
    return out


def _worker(rank, world, port, out_path, sizes, codecs, profile, alone, both, mps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    gpus = torch.cuda.device_count()
    torch.cuda.set_device(rank if gpus >= world else 0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    own_nccl = [dist.new_group([r], backend="nccl") for r in range(world)][rank]
    from moe_flashcomm import kernels as K
    launcher = "ctypes" if K.KERNELS.native is None else "compiled"
    comm = mf.Communicator(gate=False)
    # both: a second communicator whose calls are prepared through the other launcher (each
    # call keeps the launches it was prepared with), the two taking turns with NCCL
    other = mf.Communicator(gate=False) if both else None
    kinds = {launcher: comm, ("compiled" if launcher == "ctypes" else "ctypes"): other}
    rows_out = []
    for size in sizes:
        T = max(world, size // (2 * H) // world * world)
        x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
        xg = x.clone().requires_grad_()
        y = torch.empty_like(x)
        nccl = lambda: dist.all_to_all_single(y, x, group=own_nccl)  # noqa: E731
        nccl()
        for name in codecs:
            cfg = CODECS[name]
            call = lambda: comm.all_to_all(xg, codec=cfg)  # noqa: E731
            fns = dict(nccl=nccl, ours=call)
            for kind, c in kinds.items():
                if c is not None and c is not comm:
                    K.KERNELS.use_launcher(kind == "compiled")
                    fns[kind] = (lambda c: lambda: c.all_to_all(xg, codec=cfg))(c)
                    fns[kind]()  # its plans and launches, made through that launcher
                    K.KERNELS.use_launcher(launcher == "compiled")
            call()  # plans, buffers
            times = _turns(fns)
            host_us, nccl_us = statistics.median(times["ours"]), statistics.median(times["nccl"])
            ratio = _ratio(times, "ours", "nccl")
            row = dict(size=size, rows=T, codec=name, launcher=launcher, host_us=host_us,
                       nccl_us=nccl_us, ratio=ratio,
                       host_cpu_us=_host_us(call, clock=time.thread_time),
                       gpu_us=_gpu_us(call), kernels_us=_kernels_us(call))
            if both:
                times[launcher] = times.pop("ours")
                for kind in ("ctypes", "compiled"):
                    row[f"host_{kind}_us"] = statistics.median(times[kind])
                    row[f"{kind}_over_nccl"] = _ratio(times, kind, "nccl")
                row["compiled_over_ctypes"] = _ratio(times, "compiled", "ctypes")
            if profile == (size, name):
                text = _profile(call)
                if rank == 0:
                    print(text, flush=True)
            rows_out.append(row)
            if rank == 0:
                # processes sharing a GPU take turns on it and spin waiting for each other:
                # their GPU and kernel times say nothing about a call's own (kept in the JSON)
                gpu = (f"GPU {row['gpu_us']:9.1f} us  kernels {row['kernels_us']:9.1f} us "
                       f"(idle {row['gpu_us'] / max(row['kernels_us'], 1e-3) - 1:+.1%})"
                       if gpus >= world or mps else "GPU shared by the processes: no GPU times")
                print(f"{size >> 10:>8} KiB {name:>5}: host {host_us:7.1f} us "
                      f"(cpu {row['host_cpu_us']:6.1f})  (NCCL {nccl_us:6.1f}, ours / NCCL "
                      f"{ratio:4.2f})  {gpu}", flush=True)
                if both:
                    print(f"{'':>22}ctypes {row['host_ctypes_us']:7.1f} us ({row['ctypes_over_nccl']:4.2f}"
                          f" x NCCL)  compiled {row['host_compiled_us']:7.1f} us "
                          f"({row['compiled_over_nccl']:4.2f} x NCCL)  compiled / ctypes "
                          f"{row['compiled_over_ctypes']:4.2f}", flush=True)
    # the codec alone, 8 x 7168 bf16
    x8 = torch.randn(8, H, dtype=torch.bfloat16, device="cuda")
    cfg = mf.CodecConfig(bits=4)
    rec = mf.encode(x8, cfg)
    mf.decode(rec, cfg, H, torch.bfloat16)
    codec = dict(encode_us=_host_us(lambda: mf.encode(x8, cfg), burst=64),
                 decode_us=_host_us(lambda: mf.decode(rec, cfg, H, torch.bfloat16), burst=64),
                 torch_add_us=_host_us(lambda: x8.add(1), burst=64))
    if rank == 0:
        print(f"codec 8 x {H} bf16 int4: encode {codec['encode_us']:.1f} us, decode "
              f"{codec['decode_us']:.1f} us (torch add {codec['torch_add_us']:.1f} us)")
        meta = dict(device=torch.cuda.get_device_name(), gpus=gpus, torch=torch.__version__,
                    date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                    launcher=launcher, world=world, mps=mps)
        Path(out_path).write_text(json.dumps(dict(meta=meta, rows=rows_out, codec=codec,
                                                  codec_alone=alone), indent=1))
    for c in kinds.values():
        if c is not None:
            c.close()
    dist.destroy_process_group()


def plot(result: dict, png: Path) -> None:
    """Host µs per call against bf16 bytes per rank, a panel per codec: ours (each launcher
    timed), NCCL's all_to_all_single in the same run, and the 30 µs target."""
    plt = pyplot()
    if plt is None:
        return
    rows, meta = result["rows"], result["meta"]
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fig, axes = plt.subplots(1, len(codecs), figsize=(4.2 * len(codecs), 3.6), squeeze=False,
                             sharey=True)
    series = ([("host_compiled_us", "compiled launcher"), ("host_ctypes_us", "ctypes")]
              if "host_compiled_us" in rows[0] else
              [("host_us", f"ours ({meta['launcher']})" if "launcher" in meta else "ours")])
    # (runs recorded before meta had "launcher" do not say which one they timed)
    series.append(("nccl_us", "NCCL all_to_all_single"))
    top = 1.08 * max(r[key] for r in rows for key, _ in series)
    for ax, name in zip(axes[0], codecs):
        sel = sorted((r for r in rows if r["codec"] == name), key=lambda r: r["size"])
        sizes = [r["size"] for r in sel]
        for key, label in series:
            ax.plot(sizes, [r[key] for r in sel], marker="o", ms=3, label=label)
        ax.axhline(30, color="r", lw=0.6, ls="--", label="30 µs")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [fmt_size(s) for s in sizes], fontsize=7)
        ax.set_ylim(0, top)
        ax.set_title(name)
        ax.set_xlabel("bf16 bytes per rank")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("host µs per call")
    axes[0][0].legend(fontsize=7)
    args = meta["command"].split()  # (runs recorded before meta had "world": its argument)
    world = meta.get("world") or (int(args[args.index("--world") + 1]) if "--world" in args else 2)
    save_figure(fig, png, f"quantized peer-to-peer all-to-all, host time per call\n{world} "
                f"processes on {meta['gpus']} x {meta['device']}, {meta['date']}")


def profile_arg(text: str) -> tuple:
    """--profile SIZE:CODEC as (bytes, codec name)."""
    size, _, name = text.partition(":")
    try:
        if name not in CODECS:
            raise ValueError(f"codec {name!r} is not one of {', '.join(CODECS)}")
        return parse_size(size), name
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; expected SIZE:CODEC, e.g. 1M:int4") from None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/bench_host.json"),
                   help="JSON file to write, with a PNG plot beside it")
    p.add_argument("--sizes", type=SIZES_ARG, default=",".join(fmt_size(s) for s in SIZES),
                   help="bf16 bytes per rank, comma-separated, e.g. 64K,1M")
    p.add_argument("--codecs", type=csv_arg(allowed=CODECS), default=",".join(CODECS),
                   help="codecs of the all-to-all to time, comma-separated")
    p.add_argument("--profile", type=profile_arg, default=None,
                   help="SIZE:CODEC: print a cProfile of rank 0's calls")
    p.add_argument("--world", type=positive_int, default=2,
                   help="processes (each on its own GPU when there are enough, else all on GPU 0)")
    p.add_argument("--no-codec-alone", action="store_true",
                   help="skip the codec's parts in a process of its own")
    p.add_argument("--codec-only", action="store_true",
                   help="only the codec's host time in one process (no all-to-all)")
    p.add_argument("--launchers", choices=("env", "both"), default="env",
                   help="env: launch as MOE_FLASHCOMM_NATIVE_LAUNCH says; both: also time "
                        "ctypes against the compiled launcher, taking turns in one run")
    p.add_argument("--mps", action="store_true",
                   help="the processes share GPU 0 through CUDA MPS, which the caller started "
                        "(nvidia-cuda-mps-control -d, $CUDA_MPS_PIPE_DIRECTORY): their kernels "
                        "run side by side, so GPU times are reported")
    p.add_argument("--plot", type=Path, help="only plot this JSON (beside it, as .png)")
    a = p.parse_args()
    if a.plot:
        return plot(read_json(p, a.plot), a.plot.with_suffix(".png"))
    check_out(p, a.out)
    require_gpus()
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control")
    if a.mps and not pipe.exists():
        sys.exit(f"bench_host.py: --mps, but no MPS control daemon at {pipe.parent}; start one "
                 f"with nvidia-cuda-mps-control -d (same CUDA_MPS_PIPE_DIRECTORY)")
    alone = None
    if not a.no_codec_alone:
        with mp.get_context("spawn").Pool(1) as pool:  # a process with the GPU to itself
            alone = pool.apply(codec_alone, (a.launchers == "both",))
        print(f"codec alone, 8 x 7168 bf16 int4, {alone['launcher']} launcher: " + ", ".join(
            f"{k[:-3]} {v:.1f} us" for k, v in alone.items() if k.endswith("_us")), flush=True)
        if a.launchers == "both":
            print("codec alone, compiled / ctypes: " + ", ".join(
                f"{op} {alone[f'{op}_compiled_over_ctypes']:.2f}" for op in ("encode", "decode")),
                flush=True)
    if a.codec_only:
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(a.world, port, str(a.out), a.sizes, a.codecs, a.profile, alone,
                            a.launchers == "both", a.mps), nprocs=a.world, join=True)
    plot(json.loads(a.out.read_text()), a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
