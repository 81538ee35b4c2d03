"""The size gate: its fit rule (tools/tune_gate.py, DEFAULT_THRESHOLDS) on made-up timings,
the schema of its tables and files, and the codecs it never gates."""
import json

import pytest

from moe_flashcomm import CodecConfig
from moe_flashcomm.comm.gate import (MIN_NCCL_MS, NEVER_PAYS, PASSTHROUGH, SizeGate,
                                     fit_thresholds, wire_gate)

MiB = 1 << 20


def rows(path, codec, points, hidden=4096):
    """points: (MiB per peer, codec ms, NCCL ms)."""
    return [dict(path=path, codec=codec, hidden=hidden, pair_bytes=int(m * MiB), ms=ms, nccl_ms=n)
            for m, ms, n in points]


def test_threshold_is_the_smallest_size_that_pays_from_there_on():
    fit = fit_thresholds(rows("host", "int4", [(1, 0.2, 0.1), (8, 0.5, 0.6), (32, 0.9, 1.5),
                                               (128, 2.0, 6.0)]))
    assert fit == {"host": {"int4": 8 * MiB}}
    # a loss above a win: the win below it does not count
    fit = fit_thresholds(rows("host", "int4", [(8, 0.5, 0.6), (32, 1.6, 1.5), (128, 2.0, 6.0)]))
    assert fit == {"host": {"int4": 128 * MiB}}
    assert fit_thresholds(rows("host", "int8", [(8, 0.7, 0.6)])) == {"host": {"int8": NEVER_PAYS}}


def test_sizes_where_nccl_is_faster_than_the_quantized_host_time_do_not_pay():
    """GPU time 4x faster, but NCCL's call is shorter than a quantized call's host time:
    back-to-back calls would lose, so the gate keeps bf16 there."""
    points = [(0.5, 0.25, 0.375), (2, 0.45, 1.1), (8, 1.0, 4.3)]
    assert MIN_NCCL_MS > 0.375
    assert fit_thresholds(rows("network", "int8", points)) == {"network": {"int8": 2 * MiB}}
    assert fit_thresholds(rows("network", "int8", points), min_nccl_ms=0) == \
        {"network": {"int8": MiB // 2}}


# ---- the gate's schema ---------------------------------------------------------------------

def _gate_file(tmp_path, data) -> str:
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_gate_file_as_tune_gate_writes_it_loads(tmp_path):
    data = dict(thresholds={"host": {"int4": 1 << 20, "*": 5}}, units="bf16 bytes per peer",
                device="2x H200", date="2026-12-04", source="tools/tune_gate.py",
                all_reduce={"network": {"fp8": 7}})
    gate = SizeGate.load(_gate_file(tmp_path, data))
    assert gate.threshold("host", CodecConfig(bits=4)) == 1 << 20
    assert gate.threshold("host", CodecConfig(bits=8)) == 5
    assert gate.all_reduce_threshold("network", CodecConfig(bits="fp8")) == 7


@pytest.mark.parametrize("data, needle", [
    ({"thresholds": [["host", 5]]}, "thresholds must be a table {path: {codec: bytes}}, got list"),
    ({"thresholds": {"host": [["int4", 5]]}}, "thresholds['host'] must be a table {codec: bytes}, got list"),
    ({"thresholds": {}, "all_reduce": ["host"]}, "all_reduce must be a table"),
    ({"thresholds": {}, "all_reduce": {"host": 5}}, "all_reduce['host'] must be a table"),
    ({"thresholds": {"host": {"int44": 5}}},
     "unknown codec key 'int44' in thresholds['host']; allowed: int2, int3, int4, int5, int6, int7, "
     "int8, fp8, * (bf16 and native are never gated)"),
    ({"thresholds": {"host": {"fp9": 5}}}, "unknown codec key 'fp9'"),
    ({"thresholds": {"host": {"bf16": 5}}}, "unknown codec key 'bf16'"),
    ({"thresholds": {}, "all_reduce": {"network": {"int1": 5}}}, "unknown codec key 'int1' in all_reduce['network']"),
    ({"thresholds": {"hosts": {"int4": 5}}}, "unknown path 'hosts' in thresholds; allowed: "),
    ({"thresholds": {"host": {"int4": 5.0}}}, "thresholds['host']['int4'] must be an int >= 0 (bytes), got 5.0"),
    ({"thresholds": {"host": {"int4": True}}}, "must be an int >= 0"),
    ({"thresholds": {}, "allreduce": {}}, "unknown key(s) 'allreduce'; allowed: thresholds, all_reduce, "
                                          "units, device, date, source"),
    ({"threshold": {}}, "needs a 'thresholds' object"),
    ([1, 2], "needs a 'thresholds' object"),
])
def test_a_gate_file_is_checked_against_the_schema(tmp_path, data, needle):
    """Each mistake is a ValueError that names the key (never AttributeError, never ignored)."""
    path = _gate_file(tmp_path, data)
    with pytest.raises(ValueError) as e:
        SizeGate.load(path)
    assert needle in str(e.value) and (path in str(e.value) or "needs" not in needle), str(e.value)
    if isinstance(data, dict) and "thresholds" in data:  # the same tables given as a dict
        with pytest.raises(ValueError) as e:
            SizeGate.coerce(data)
        assert needle in str(e.value), str(e.value)


def test_bf16_and_native_are_never_gated_and_native_all_reduces_with_torch():
    gate = SizeGate({"host": {"*": 1 << 40}}, all_reduce={"host": {"*": 0}})
    native, bf16, int4 = CodecConfig(bits="native"), CodecConfig(bits="bf16"), CodecConfig(bits=4)
    assert gate.threshold("host", native) == gate.threshold("host", bf16) == 0
    assert wire_gate(native, 100, 1 << 40) is native
    assert wire_gate(int4, 100, 1 << 40) == PASSTHROUGH
    # the all-reduce: "native" is torch.distributed.all_reduce at every size, gate or not
    for g in (gate, SizeGate.coerce(False)):
        assert g.all_reduce_threshold("host", native) >= 1 << 62
        assert g.all_reduce_threshold("host", bf16) == 0
