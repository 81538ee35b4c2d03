import re
from pathlib import Path

import pytest

from moe_flashcomm import CodecConfig, record_bytes, record_layout
from moe_flashcomm.codec.format import plane_widths

ALL_BITS = [2, 3, 4, 5, 6, 7, 8, "fp8", "bf16"]
WIRE_DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def a16(n):
    return -(-n // 16) * 16


def documented_record_bytes(hidden, bits, group, spikes):
    """The formula written in docs/wire-format.md, restated independently of format.py."""
    if bits == "bf16":
        return a16(2 * hidden)
    groups = -(-hidden // group)
    padded = groups * group
    if bits == "fp8":
        return a16(a16(padded) + 2 * groups)
    widths = [8] if bits == 8 else [w for w in (4, 2, 1) if bits & w]
    payload = sum(a16(padded * w // 8) for w in widths)
    return a16(payload + groups * (4 + (6 if spikes else 0)))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("spikes", [True, False])
def test_record_bytes_matches_documented_formula(bits, group, spikes):
    for hidden in (1, 7, 31, 32, 100, 129, 1000, 4096, 7168, 7173):
        cfg = CodecConfig(bits=bits, group_size=group, spikes=spikes)
        assert record_bytes(hidden, cfg) == documented_record_bytes(hidden, bits, group, spikes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_sections_are_aligned_and_disjoint(bits):
    for hidden in (3, 130, 7168):
        L = record_layout(hidden, CodecConfig(bits=bits))
        spans = [(p.offset, p.offset + p.nbytes) for p in L.planes]
        assert all(p.offset % 16 == 0 for p in L.planes)
        n = L.n_groups
        for off, size in ((L.scale, 2), (L.minimum, 2), (L.lo_value, 2), (L.hi_value, 2),
                          (L.lo_index, 1), (L.hi_index, 1)):
            if off is not None:
                spans.append((off, off + n * size))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] <= L.record_bytes and L.record_bytes % 16 == 0


def test_native_record_bytes_depend_on_the_dtype():
    """docs/wire-format.md: align16(H * itemsize); the other codecs ignore the dtype."""
    import torch
    native = CodecConfig(bits="native")
    for hidden in (1, 7, 100, 4096, 7173):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert record_bytes(hidden, native, dtype) == a16(hidden * dtype.itemsize)
            L = record_layout(hidden, native, dtype)
            assert [(p.width, p.offset, p.nbytes) for p in L.planes] == \
                [(8 * dtype.itemsize, 0, hidden * dtype.itemsize)]
            assert L.scale is None and L.n_groups == 0
            for bits in ALL_BITS:
                cfg = CodecConfig(bits=bits)
                assert record_bytes(hidden, cfg, dtype) == record_bytes(hidden, cfg)
    with pytest.raises(ValueError, match="depends on the dtype"):
        record_bytes(10, native)
    with pytest.raises(TypeError, match="dtype must be"):
        record_bytes(10, native, torch.float64)


def test_layout_traces_under_torch_compile_without_warnings():
    """The codec's compiled path sizes its records with record_layout inside the traced code:
    one graph, no warning, the eager sizes."""
    import warnings
    import torch

    def sizes(x):
        L = record_layout(x.shape[1], CodecConfig(bits=3, group_size=64), x.dtype)
        N = record_layout(x.shape[1], CodecConfig(bits="native"), x.dtype)
        return x.new_empty((x.shape[0], L.record_bytes + N.record_bytes))

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torch.compile(sizes, fullgraph=True, backend="eager")(torch.zeros(2, 1000))
    assert got.shape[1] == record_bytes(1000, CodecConfig(bits=3, group_size=64)) + a16(4000)


def test_bit_splitting_planes():
    assert [plane_widths(b) for b in range(2, 9)] == [
        (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1), (8,)]
    L = record_layout(256, CodecConfig(bits=7))
    assert [(p.width, p.shift) for p in L.planes] == [(4, 3), (2, 1), (1, 0)]


def test_bad_hidden():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="hidden"):
            record_bytes(bad, CodecConfig())


def test_wire_format_doc_table_matches_record_bytes():
    """Every row of the size table in docs/wire-format.md equals record_bytes."""
    rows = re.findall(r"^\| *(\d+) *\| *(\w+) *\| *(\d+) *\| *(on|off|-) *\| *(\d+) *\|", WIRE_DOC.read_text(), re.M)
    assert len(rows) >= 9 * 2 * 2
    seen = set()
    for hidden, bits, group, spikes, size in rows:
        bits = int(bits) if bits.isdigit() else bits
        cfg = CodecConfig(bits=bits, group_size=int(group), spikes=spikes == "on")
        assert record_bytes(int(hidden), cfg) == int(size), (hidden, bits, group, spikes)
        seen.add((bits, spikes))
    assert {b for b, _ in seen} == set(ALL_BITS)


def test_exchange_header_matches_the_doc():
    """docs/wire-format.md, "Exchange headers": the words, codes and sizes comm/frame.py uses."""
    import torch
    from moe_flashcomm.comm import frame
    doc = WIRE_DOC.read_text()
    section = doc[doc.index("## Exchange headers"):doc.index("## Sizes")]
    assert f"a {frame.HEADER_BYTES}-byte header" in section
    assert f"{frame.WORDS}\nlittle-endian int64 words" in section
    assert f"`{frame.MAGIC:#X}`".replace("0X", "0x") in section
    for i, name in enumerate(frame.OPERATIONS, start=1):
        assert f"{i} {name}" in section
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.uint8: "uint8", torch.int64: "int64", torch.int32: "int32",
             torch.int16: "int16", torch.int8: "int8"}
    for i, dtype in enumerate(frame.DTYPES, start=1):
        assert f"{i} {names[dtype]}" in section
    assert f"{frame.FRAME_BYTES >> 20} MiB (`FRAME_BYTES`" in section
    flags = next(line for line in section.splitlines() if line.startswith("| 10 | flags: "))
    assert f"{frame.ABORTED} = the sender found a disagreement earlier in this call" in flags
    assert f"{frame.REJECTED} = the sender rejected its own arguments" in flags
    assert f"{frame.GAVE_UP} = (with {frame.ABORTED}) the sender stopped waiting for a silent peer " \
        "earlier in this call" in flags
    assert f"{frame.FAILED} = (with {frame.ABORTED}) the sender failed on its own earlier in " \
        "this call" in flags
    assert frame.ABORTED | frame.REJECTED | frame.GAVE_UP | frame.FAILED == 15  # one bit each
    for cfg in (CodecConfig(bits=4), CodecConfig(bits=3, group_size=32, spikes=False,
                                                  rounding="stochastic"),
                CodecConfig(bits="fp8"), CodecConfig(bits="bf16"), CodecConfig(bits="native")):
        code = frame.wire_code(cfg)
        assert frame.wire_text(code) == f"{cfg} records"
        bits = cfg.bits if isinstance(cfg.bits, int) else {"fp8": 9, "bf16": 10, "native": 11}[cfg.bits]
        assert code == 2 | bits << 4 | cfg.group_size << 8 | cfg.spikes << 20 \
            | (cfg.rounding == "stochastic") << 21
    assert frame.wire_code(None) == frame.RAW_WIRE == 1
