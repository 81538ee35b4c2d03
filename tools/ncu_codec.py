r"""A fixed workload of codec kernels for Nsight Compute (hardware counters of one launch each).

Inside an NVTX range "profile", on rotating buffers (so a launch reads from DRAM, not L2): an SM
copy of the tokens (``x * 1``, the bandwidth reference), then each requested encode (and
decode), ``--reps`` times each; inputs, records and kernels are made before the range. Profile
it with, for example:

    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
        --section WarpStateStats python3 tools/ncu_codec.py --size 64 --hidden 7168 --bits 4 8

(``--clock-control none`` leaves the GPU's clocks as they are: on a shared machine, do not
lock or reset them.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_flashcomm import CodecConfig  # noqa: E402
from moe_flashcomm.codec import cuda as C  # noqa: E402

from bench_codec import buffers_needed, tokens  # noqa: E402
from benchlib import HelpFormatter, positive_int, require_gpus  # noqa: E402

MiB = 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", type=positive_int, default=64, help="MiB of bf16 tokens")
    p.add_argument("--hidden", type=positive_int, default=7168, help="values per token row")
    p.add_argument("--bits", type=int, nargs="+", default=[4], choices=range(2, 9), metavar="BITS",
                   help="integer widths to profile, 2 to 8: an encode kernel each (and a decode one, "
                        "with --decode)")
    p.add_argument("--reps", type=positive_int, default=2, help="launches of each kernel")
    p.add_argument("--decode", action="store_true", help="also decode")
    p.add_argument("--defines", nargs="*", default=[], help="kernel variant defines (A/B)")
    args = p.parse_args(argv)
    T = args.size * MiB // (2 * args.hidden)
    if T < 1:  # (not one token row)
        p.error(f"--hidden {args.hidden}: more values than --size {args.size} MiB holds")
    require_gpus()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n = buffers_needed(2 * T * args.hidden, l2) + 1
    xs = [tokens(T, args.hidden, seed=i) for i in range(n)]
    ys = [torch.empty_like(x) for x in xs]
    cfgs = [CodecConfig(bits=b) for b in args.bits]
    recs = {c: [C.encode_impl(x, c, 0, None, tuple(args.defines)) for x in xs] for c in cfgs}
    for c in cfgs:  # the decode kernels too, before the range
        C.decode_impl(recs[c][0], c, args.hidden, torch.bfloat16, None, tuple(args.defines), out=ys[0])
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    for i in range(args.reps):
        torch.mul(xs[i % n], 1, out=ys[i % n])
    for cfg in cfgs:
        for i in range(args.reps):
            C.encode_impl(xs[i % n], cfg, 0, None, tuple(args.defines), out=recs[cfg][i % n])
        if args.decode:
            for i in range(args.reps):
                C.decode_impl(recs[cfg][i % n], cfg, args.hidden, torch.bfloat16, None, tuple(args.defines),
                              out=ys[i % n])
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"ran: T={T} H={args.hidden} bits={args.bits} reps={args.reps} buffers={n}")


if __name__ == "__main__":
    main()
