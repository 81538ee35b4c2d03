"""Instructions on the common path of a common-path-only encode build (tools/sass_common_path.sh).

Walks the SASS (``cuobjdump -sass``) from the kernel entry to the first unpredicated EXIT and
counts the instructions issued. Conditional branches are taken when they
  - are the first conditional branch (v5: the copy for 128-value groups), unless --no-first
    (v4, fp32) or --first-not (v5's generic copy, L at run time);
  - jump over a CALL (the fast division / reciprocal paths);
  - jump over a SHFL.BFLY whose offset matches --skip (default 10|8: 4 lanes per group);
  - jump over >= 8 FSETP.EQ and no LDS (v5: the full-group spike search, not the scalar one).
Everything else falls through: predicated-off instructions still count (a warp issues them).

    python tools/sass_common_path.py kernel.sass [--no-first | --first-not] [--skip=10|8] [trace.txt]
"""
from __future__ import annotations

import re
import sys


def walk(sass: str, argv: list[str]) -> tuple[int, list[str]]:
    ins, order = {}, []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,5})\*/\s+(.*?)\s*;", line)
        if m:
            a = int(m.group(1), 16)
            ins[a] = m.group(2).strip()
            order.append(a)
    idx = {a: i for i, a in enumerate(order)}
    skip = next((a.split("=", 1)[1] for a in argv if a.startswith("--skip=")), "10|8")
    pc, first_done, trace = 0, False, []
    while True:
        t = ins[pc]
        trace.append(f"{pc:04x} {t}")
        pred = t.startswith("@")
        body = t.split(None, 1)[1] if pred else t
        opc = body.split()[0]
        if opc == "EXIT" and not pred:
            break
        if opc == "BRA":
            tgt = int(body.split()[-1], 16)
            take = not pred
            if pred:
                between = [ins[a] for a in order[idx[pc] + 1: idx[tgt]]] if tgt > pc else []
                if not first_done and "--first-not" in argv:
                    take = False
                elif not first_done and "--no-first" not in argv:
                    take = True
                elif any(x.startswith("CALL") or " CALL" in x for x in between):
                    take = True
                elif any(re.search(rf"SHFL\.BFLY .*, 0x({skip}), ", x) for x in between):
                    take = True
                elif sum("FSETP.EQ" in x for x in between) >= 8 and not any("LDS" in x for x in between):
                    take = True
                first_done = True
            if take:
                pc = tgt
                continue
        pc = order[idx[pc] + 1]
    return len(trace), trace


def main() -> None:
    n, trace = walk(open(sys.argv[1]).read(), sys.argv[2:])
    print(n)
    out = [a for a in sys.argv[2:] if not a.startswith("--")]
    if out:
        open(out[0], "w").write("\n".join(trace) + "\n")


if __name__ == "__main__":
    main()
