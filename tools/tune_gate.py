#!/usr/bin/env python
"""Fit the size gate of moe_flashcomm.all_to_all for this machine and write it as JSON.

For every link path and codec it finds the smallest message (bf16 bytes per peer) from
which the quantized all-to-all is never slower than NCCL's bf16 all_to_all_single, timing
both on 2 GPUs with tools/bench_all2all.py's worker; smaller messages are sent as bf16.

    python tools/tune_gate.py --out gate.json                    # measure (2 GPUs)
    python tools/tune_gate.py --from-bench out/bench_all2all.json --out gate.json
    python tools/tune_gate.py --from-bench ... --python          # DEFAULT_THRESHOLDS literal
    MOE_FLASHCOMM_GATE_FILE=gate.json python train.py            # use it
"""
from __future__ import annotations

import argparse
import datetime
import json
import pprint
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_all2all as bench  # noqa: E402

from moe_flashcomm.comm.gate import codec_key, fit_thresholds  # noqa: E402


def fit_from_rows(rows: list) -> dict:
    """Thresholds from bench_all2all rows (the always-quantized timings)."""
    nccl = {(r["path"], r["hidden"], r["tokens"]): r["ms"] for r in rows if r["variant"] == "nccl"}
    fit = [dict(path=r["path"], hidden=r["hidden"], pair_bytes=r["pair_bytes"], ms=r["ms"],
                nccl_ms=nccl[(r["path"], r["hidden"], r["tokens"])],
                codec=codec_key(bench.codec_of(r["codec"])))
           for r in rows if r.get("codec") not in (None, "bf16") and not r.get("gated")
           and not r.get("sweep") and r["path"] in bench.PATH_ENV]
    return fit_thresholds(fit)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gate.json"))
    ap.add_argument("--from-bench", type=Path, help="fit on a tools/bench_all2all.py JSON instead of measuring")
    ap.add_argument("--paths", default=",".join(bench.PATH_ENV))
    ap.add_argument("--hidden", default="4096,7168")
    ap.add_argument("--codecs", default=",".join(c for c in bench.CODECS if c != "bf16"))
    ap.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M")
    ap.add_argument("--python", action="store_true", help="also print a DEFAULT_THRESHOLDS literal")
    args = ap.parse_args(argv)
    if args.from_bench:
        data = json.loads(args.from_bench.read_text())
        rows, meta = data["rows"], data.get("meta", {})
    else:
        cfg = dict(paths=args.paths.split(","), codecs=args.codecs.split(","),
                   hiddens=[int(h) for h in args.hidden.split(",")],
                   sizes=[bench.parse_size(s) for s in args.sizes.split(",")], budget_s=0.2,
                   gated=False)
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench.run_paths(cfg, Path(tmp))["rows"]
        import torch
        meta = dict(device=f"2x {torch.cuda.get_device_name(0)}", date=datetime.date.today().isoformat())
    table = fit_from_rows(rows)
    args.out.write_text(json.dumps(dict(thresholds=table, units="bf16 bytes per peer",
                                        device=meta.get("device"), date=meta.get("date"),
                                        source="tools/tune_gate.py"), indent=1))
    for path, row in table.items():
        print(f"{path:>8}: " + ", ".join(f"{c} {bench.fmt_size(v) if v < 1 << 60 else 'never'}"
                                         for c, v in sorted(row.items())))
    print(f"wrote {args.out} (use it with MOE_FLASHCOMM_GATE_FILE={args.out})")
    if args.python:
        print("DEFAULT_THRESHOLDS = " + pprint.pformat(table, width=90))


if __name__ == "__main__":
    main()
