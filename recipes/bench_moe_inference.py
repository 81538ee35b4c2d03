"""MoE inference throughput: one DeepSpeed MoE layer of realistic shape, expert parallel over
all ranks, timed with stock DeepSpeed (its all-to-all in the layer's dtype: bf16 on GPUs,
fp32 on CPU) and with moe_flashcomm codecs.

On GPUs (set the NCCL link emulation of docs/design.md, "Link emulation", in the environment;
--path names it and is checked against it):
    deepspeed --num_gpus 2 recipes/bench_moe_inference.py --path nvlink
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 deepspeed --num_gpus 2 recipes/bench_moe_inference.py --path network
On a CPU-only machine it starts gloo processes with a tiny shape (smoke run):
    python recipes/bench_moe_inference.py
There the codecs are slower than stock: without CUDA the torch reference codec (the
specification, written for clarity, not speed) encodes and decodes every message.
Reports tokens/s (all ranks) and milliseconds per MoE layer forward, the speed-up over stock
and the relative error of the layer's output against stock (the codecs' effect),
and writes JSON (and a PNG plot with --plot).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preflight  # noqa: E402
from finetune_moe import init_rank, launch, log, world_size  # noqa: E402

from moe_flashcomm import CodecConfig, env  # noqa: E402
from moe_flashcomm.comm.topology import intra_node_path  # noqa: E402
from moe_flashcomm.tune_gate import (LINK_ALIASES, LINK_EMULATION, check_out, float_above,  # noqa: E402
                                     positive_int, pyplot)

# name: (hidden, expert ffn, experts, top-k)
PRESETS = {
    "mixtral": (4096, 14336, 8, 2),
    "deepseek": (7168, 2048, 64, 8),
    "tiny": (256, 512, 4, 2),  # CPU smoke run
    # small hidden sizes with the routing shapes of the two above: filled-slot shares on CPU
    "mixtral-routing": (256, 512, 8, 2),
    "deepseek-routing": (256, 256, 64, 8),
}
CODECS = {"bf16": {"bits": "bf16"}, "int8": {"bits": 8}, "int4": {"bits": 4}, "int2": {"bits": 2},
          "fp8": {"bits": "fp8"}}


class Expert(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, ffn, bias=False), nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def parse_args(argv=None):
    p = preflight.Parser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS),
                   help="default: mixtral deepseek on GPU, tiny on CPU")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=None,
                   help="tokens per rank (batch x sequence); default 1024 4096 16384 on GPU, 64 256 on CPU")
    p.add_argument("--codecs", nargs="+", default=["int8", "int4", "int2"], choices=sorted(CODECS),
                   help="codecs of dispatch and combine to time against stock DeepSpeed")
    p.add_argument("--capacity-factor", type=float_above(0), default=1.25,
                   help="the gate's capacity factor (eval_capacity_factor too)")
    p.add_argument("--zipf", type=float_above(0, inclusive=True), default=0.0,
                   help="skewed expert popularity: the gate's logit of expert e gets -s*log(e+1) "
                        "(popularity ~ 1/(e+1)^s); 0: the random gate")
    p.add_argument("--skip-padding", nargs="+", default=["on"], choices=["on", "off"],
                   help="time the codecs with skip_padding on (row keys <codec>_...) and/or off "
                        "(<codec>_padded_...)")
    p.add_argument("--reps", type=positive_int, default=10, help="timed forwards per point")
    p.add_argument("--path", default="nvlink" if torch.cuda.is_available() else "cpu",
                   help="label of the link emulation in the environment (nvlink, host-memory, network)")
    p.add_argument("--out", type=Path, default=Path("out/moe_inference"),
                   help="folder of moe_inference_<path>.json")
    p.add_argument("--plot", action="store_true", help="also write moe_inference_<path>.png")
    p.add_argument("--local_rank", type=int, default=env.local_rank() or 0, help=argparse.SUPPRESS)
    p.add_argument("--cpu-ranks", type=positive_int, default=2,
                   help="gloo processes to start when not launched")
    p.add_argument("--deepspeed_config", type=Path, default=None,
                   help="accepted for the launcher: checked, its codecs unused (see --codecs)")
    args = p.parse_args(argv)
    check_out(p, args.out, folder=True)  # before the run, not after it
    args.presets = args.presets or (["mixtral", "deepseek"] if torch.cuda.is_available() else ["tiny"])
    return args


def check_args(args) -> None:
    """In the parent, before any rank starts: a mistake exits with status 2 and one line."""
    preflight.check_env_variables()
    world = world_size(args)
    if world == 1:  # (DeepSpeed makes no all-to-all for an expert-parallel group of one)
        preflight.fail("one rank: its experts are all local, so there is no all-to-all to time; "
                       "run 2 or more (--cpu-ranks, deepspeed --num_gpus)")
    for name in args.presets:
        experts = PRESETS[name][2]
        if experts % world:
            preflight.fail(f"preset {name}: its {experts} experts must be divisible by the "
                           f"{world} ranks (expert parallel over all ranks)")
    if args.deepspeed_config is not None:
        preflight.load_ds_config(args.deepspeed_config, {})
    preflight.check_gate_variable()  # every layer here uses the default gate
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.path):  # (it names the output file)
        preflight.fail(f"--path {args.path!r}: the label goes into the file name "
                       "moe_inference_<path>.json: letters, digits, '-', '_' and '.' only")
    one_node = (env.local_size() or world) == world  # (across nodes the label is the user's)
    problem = one_node and path_label_problem(args.path, "cuda" if torch.cuda.is_available()
                                                        else "cpu")
    if problem:
        preflight.fail(problem)


def path_label_problem(label: str, device_type: str) -> Optional[str]:
    """Why ``--path`` would mislabel the run, or None: on GPUs a link class's name must be the
    class NCCL's environment makes (a shell that exports NCCL_P2P_DISABLE=1 would write host
    or network timings under "nvlink"); other labels are free."""
    name = LINK_ALIASES.get(label, label)
    if device_type != "cuda" or name not in LINK_EMULATION:
        return None
    actual = intra_node_path(device_type)
    if actual == name:
        return None
    said = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"))
    want = " ".join(f"{k}={v}" for k, v in LINK_EMULATION[name].items())
    return (f"--path {label}: NCCL's environment ({said}) makes the link class {actual!r}, "
            f"not {name!r}; run with {want}, or label the run --path {actual}")


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps (after two warm-up calls), CUDA events on GPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.distributed.barrier()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    t = torch.tensor(sorted(times)[len(times) // 2], device=device)  # NCCL reduces device tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    return t.item()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| over all ranks (the max)."""
    e = torch.stack([(y - ref).norm() / ref.norm().clamp_min(1e-30)])
    torch.distributed.all_reduce(e, op=torch.distributed.ReduceOp.MAX)
    return e.item()


def bench(args) -> None:
    init_rank(args)  # first: it quiets ranks but 0 before DeepSpeed's import warns
    from deepspeed.moe.layer import MoE

    import moe_flashcomm

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    token_counts = args.tokens or ([1024, 4096, 16384] if gpu else [64, 256])
    if not gpu:
        log("CPU run: the codecs are slower than stock here, because without CUDA kernels the "
            "torch reference codec encodes and decodes every message (a smoke run, not a speed test)")
    keys = [codec if skip == "on" else f"{codec}_padded" for codec in args.codecs
            for skip in args.skip_padding]
    rows = []
    for name in args.presets:
        hidden, ffn, experts, k = PRESETS[name]
        torch.manual_seed(0)
        layer = MoE(hidden_size=hidden, expert=Expert(hidden, ffn), num_experts=experts, ep_size=world, k=k,
                    capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()
        layer = layer.to(device, dtype).eval()
        if args.zipf:  # x[..., 0] = 1 below: this column adds -s*log(e+1) to expert e's logit
            with torch.no_grad():
                popularity = torch.arange(1, experts + 1, dtype=torch.float32).log()
                layer.deepspeed_moe.gate.wg.weight[:, 0] = (-args.zipf * popularity).to(device, dtype)
        for tokens in token_counts:
            x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
            if args.zipf:
                x[..., 0] = 1.0
            row = {"preset": name, "hidden": hidden, "ffn": ffn, "experts": experts, "top_k": k,
                   "tokens_per_rank": tokens, "path": args.path, "world": world, "zipf": args.zipf}
            with torch.no_grad():
                moe_flashcomm.disable_deepspeed(layer)
                row["stock_s"] = timed(lambda: layer(x), args.reps)
                stock = layer(x)[0].float()
                for key in keys:
                    codec = CODECS[key.split("_")[0]]
                    stats = moe_flashcomm.enable_deepspeed(layer, {
                        "dispatch": codec, "combine": codec,
                        "skip_padding": not key.endswith("_padded")})["deepspeed_moe"]
                    stats.reset()
                    row[f"{key}_s"] = timed(lambda: layer(x), args.reps)
                    # this rank's bytes to other ranks per forward (dispatch + combine); the
                    # stock exchange's, in the layer's dtype; the share of capacity slots that went
                    forwards = stats.calls["dispatch"]
                    row[f"{key}_bytes"] = stats.link_bytes() / forwards
                    row["stock_bytes"] = (sum(stats.slots_stock.values()) * hidden * dtype.itemsize
                                          / forwards)
                    row[f"{key}_slot_share"] = stats.slot_share()
                    # the layer's output error from the codec, relative to the output's norm
                    row[f"{key}_rel_err"] = rel_err(layer(x)[0].float(), stock)
                moe_flashcomm.disable_deepspeed(layer)
            rows.append(row)
            log(row_line(row, keys, dtype))
        layer = None  # (freed before the next preset; the timed lambdas above are done)
        if gpu:
            torch.cuda.empty_cache()
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"),
                "device": torch.cuda.get_device_name() if gpu else "cpu (gloo)", "path": args.path,
                "world_size": world, "dtype": str(dtype), "capacity_factor": args.capacity_factor,
                "zipf": args.zipf, "skip_padding": args.skip_padding,
                "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
        path = args.out / f"moe_inference_{args.path}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        log(f"wrote {path}")
        if args.plot:
            plot(rows, keys, path.with_suffix(".png"), str(dtype).removeprefix("torch."))


def row_line(row: dict, keys: list, dtype: torch.dtype) -> str:
    """What a run prints of one measured row: stock, then each codec against it; the bytes
    against the stock exchange's, in ``dtype`` (the layer's: fp32 on CPU, bf16 on GPUs)."""
    stock = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))
    line = (f"{row['preset']:>8} tokens/rank {row['tokens_per_rank']:>6}: stock "
            f"{row['stock_s'] * 1e3:8.2f} ms "
            f"({row['tokens_per_rank'] * row['world'] / row['stock_s']:>10.0f} tok/s)")
    for key in keys:
        line += (f" | {key} {row[f'{key}_s'] * 1e3:8.2f} ms x{row['stock_s'] / row[f'{key}_s']:.2f}, "
                 f"{row['stock_bytes'] / row[f'{key}_bytes']:.2f}x fewer bytes than stock {stock}"
                 f" (err {row[f'{key}_rel_err']:.1e})")
    return line


def plot(rows: list, codecs: list, path: Path, stock_dtype: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    presets = sorted({r["preset"] for r in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, name in zip(axes[0], presets):
        rs = [r for r in rows if r["preset"] == name]
        t = [r["tokens_per_rank"] for r in rs]
        ax.plot(t, [r["tokens_per_rank"] * r["world"] / r["stock_s"] for r in rs], "k-o",
                label=f"stock ({stock_dtype})")
        for c in codecs:
            ax.plot(t, [r["tokens_per_rank"] * r["world"] / r[f"{c}_s"] for r in rs], "-o", label=c)
        ax.set(xscale="log", xlabel="tokens per rank", ylabel="tokens/s", title=f"{name} ({rs[0]['path']})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    # each codec as the config's own text writes it (int4/g128+spikes, bf16): group and spikes
    # only where they apply
    codecs = ", ".join(str(CodecConfig.coerce(CODECS[name])) for name in args.codecs)
    preflight.say(f"moe_flashcomm: dispatch and combine with {codecs}, each against stock DeepSpeed")
    preflight.check_extension_build(cpu_run=env.rank() is None and not torch.cuda.is_available())
    launch(bench, args)


if __name__ == "__main__":
    main()
