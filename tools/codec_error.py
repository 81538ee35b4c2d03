"""Codec accuracy: relative L2 and max error for every width, spikes on/off and group size,
on Gaussian, Student-t (nu = 3) and outlier-channel activations.

    python tools/codec_error.py [--tokens 256] [--hidden 4096] [--out out/codec_error.json]

Prints a table (bits per value beside each row, so error reads against size), writes JSON and,
when matplotlib is installed, a PNG of error against bits per value.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moe_flashcomm import CodecConfig, decode, encode, record_layout
from moe_flashcomm.codec.config import GROUP_SIZES

from benchlib import HelpFormatter, check_out, positive_int, pyplot

try:
    from tqdm import tqdm
except ImportError:  # progress bar is a nicety
    def tqdm(it, **_):  # noqa: D103
        return it


def make_data(kind: str, tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """bf16 activations [tokens, hidden] of the named distribution."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = torch.randn(tokens, hidden, generator=g)
    elif kind == "student-t3":
        # t = z / sqrt(chi2_nu / nu) with chi2_3 = sum of three squared normals
        z = torch.randn(tokens, hidden, generator=g)
        chi2 = (torch.randn(3, tokens, hidden, generator=g) ** 2).sum(0)
        x = z / (chi2 / 3).sqrt()
    elif kind == "outlier-channels":
        # LLM-style activations: a few channels carry values ~100x the rest, in every token
        x = torch.randn(tokens, hidden, generator=g)
        channels = torch.randperm(hidden, generator=g)[:4]
        x[:, channels] = 100 * (1 + torch.rand(tokens, 4, generator=g))
    else:
        raise ValueError(f"unknown distribution {kind!r}")
    return x.to(torch.bfloat16)


def configs(groups):
    for bits in (2, 3, 4, 5, 6, 7, 8):
        for spikes in (True, False):
            for g in groups:
                yield CodecConfig(bits=bits, group_size=g, spikes=spikes)
    for g in groups:
        yield CodecConfig(bits="fp8", group_size=g)


def measure(x: torch.Tensor, cfg: CodecConfig) -> dict:
    y = decode(encode(x, cfg), cfg, x.shape[1], x.dtype).float()
    xf = x.float()
    return {"rel_l2": ((y - xf).norm() / xf.norm()).item(), "max_abs": (y - xf).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=256, help="token rows per distribution")
    ap.add_argument("--hidden", type=positive_int, default=4096, help="values per token row, >= 4")
    ap.add_argument("--groups", type=int, nargs="+", default=list(GROUP_SIZES), choices=GROUP_SIZES,
                    help="group sizes (values sharing one scale) to measure")
    ap.add_argument("--out", type=Path, default=Path("out/codec_error.json"),
                    help="JSON file to write, with a PNG plot beside it")
    args = ap.parse_args()
    if args.hidden < 4:  # (make_data's outlier channels)
        ap.error(f"--hidden: expected an int >= 4 (4 outlier channels), got {args.hidden}")
    check_out(ap, args.out)

    kinds = ("gaussian", "student-t3", "outlier-channels")
    data = {k: make_data(k, args.tokens, args.hidden) for k in kinds}
    cfgs = list(configs(args.groups))
    rows = []
    for cfg, kind in tqdm([(c, k) for c in cfgs for k in kinds], desc="codec error", unit="cfg",
                          disable=None):
        bpv = record_layout(args.hidden, cfg).bits_per_value
        rows.append({"bits": cfg.bits, "group_size": cfg.group_size, "spikes": cfg.spikes,
                     "data": kind, "bits_per_value": bpv, **measure(data[kind], cfg)})

    by = {(r["bits"], r["group_size"], r["spikes"], r["data"]): r for r in rows}
    head = f"{'codec':>8} {'group':>5} {'spikes':>6} {'bits/val':>8} |" + "".join(
        f" {k + ' relL2':>24} {'max':>9} |" for k in kinds)
    print(head)
    print("-" * len(head))
    for cfg in cfgs:
        line = f"{str(cfg.bits):>8} {cfg.group_size:>5} {('on' if cfg.spikes else 'off'):>6} "
        line += f"{record_layout(args.hidden, cfg).bits_per_value:>8.3f} |"
        for k in kinds:
            r = by[(cfg.bits, cfg.group_size, cfg.spikes, k)]
            line += f" {r['rel_l2']:>24.4f} {r['max_abs']:>9.3f} |"
        print(line)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python tools/codec_error.py", "tokens": args.tokens, "hidden": args.hidden,
            "input_dtype": "bfloat16", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
            "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    plot(rows, kinds, args.out.with_suffix(".png"), args.groups)


def plot(rows, kinds, path: Path, groups) -> None:
    """Error against bits per value: the integer codecs at group 128 (or, where the run did
    not measure 128, the first of ``groups``), fp8 at every group run."""
    plt = pyplot()
    if plt is None:
        return
    shown = 128 if 128 in groups else groups[0]
    fp8_groups = ",".join(str(g) for g in sorted(set(groups)))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, kind in zip(axes, kinds):
        for spikes, style in ((True, "o-"), (False, "s--")):
            pts = sorted((r["bits_per_value"], r["rel_l2"]) for r in rows
                         if r["data"] == kind and r["spikes"] == spikes and r["bits"] != "fp8"
                         and r["group_size"] == shown)
            ax.plot(*zip(*pts), style, label=f"int2..8 g{shown} spikes {'on' if spikes else 'off'}")
        fp8 = [(r["bits_per_value"], r["rel_l2"]) for r in rows if r["data"] == kind and r["bits"] == "fp8"]
        ax.plot(*zip(*sorted(fp8)), "^", label=f"fp8 (g{fp8_groups})")
        ax.set(title=kind, xlabel="wire bits per value", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative L2 error")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
