"""Print the record-size table of docs/wire-format.md (tests check the doc against the code).

    python tools/wire_format_table.py
"""
import argparse

from moe_flashcomm import CodecConfig, record_layout
from benchlib import HelpFormatter


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.parse_args(argv)
    print("| hidden | bits | group | spikes | record bytes | bits/value | vs bf16 |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for hidden in (4096, 7168):
        for bits in (2, 3, 4, 5, 6, 7, 8, "fp8", "bf16"):
            for group in ((128,) if bits == "bf16" else (32, 128)):
                for spikes in ((True, False) if isinstance(bits, int) else (False,)):
                    cfg = CodecConfig(bits=bits, group_size=group, spikes=spikes)
                    L = record_layout(hidden, cfg)
                    flag = ("on" if spikes else "off") if isinstance(bits, int) else "-"
                    print(f"| {hidden} | {bits} | {group} | {flag} | {L.record_bytes} | "
                          f"{L.bits_per_value:.3f} | {16 / L.bits_per_value:.2f}x |")


if __name__ == "__main__":
    main()
