"""The size gate's fit rule (tools/tune_gate.py, DEFAULT_THRESHOLDS) on made-up timings."""
from moe_flashcomm.comm.gate import MIN_NCCL_MS, NEVER_PAYS, fit_thresholds

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
