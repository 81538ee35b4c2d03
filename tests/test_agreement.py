"""Ranks that disagree at any call raise a clear error on every rank that sees it, within
seconds, and the group works afterwards (comm/frame.py: every exchange over gloo carries
a header). Real gloo process groups; each test is killed if it runs past its limit."""
from __future__ import annotations

import datetime
import functools
import gc
import os
import re
import time

import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm.codec import CodecConfig, record_bytes
from moe_flashcomm.comm import ConfigMismatchError
from moe_flashcomm.comm import all_reduce, autograd, exchange, frame, hierarchical
from moe_flashcomm.comm.frame import FRAME_BYTES, PeerTimeoutError
from moe_flashcomm.comm.gate import SizeGate
from moe_flashcomm.comm.all_reduce import reference_all_reduce
from tests import a2a_cases
from tests.a2a_cases import make_input
from tests.distributed import spawn

LIMIT_S = 10  # what every disagreement must take at most, on every rank


def _raises(fn, exc, *patterns):
    """Run ``fn``; it must raise ``exc`` within LIMIT_S, its message holding ``patterns``."""
    start = time.monotonic()
    with pytest.raises(exc) as info:
        fn()
    took = time.monotonic() - start
    assert took < LIMIT_S, took
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    return str(info.value)


def _codec_switch(rank, world):
    comm = mf.Communicator(gate=False)
    x = make_input(rank, 4 * world, (256,), torch.float32, 1)
    int4, int8 = CodecConfig(bits=4), CodecConfig(bits=8)
    g32 = CodecConfig(bits=4, group_size=32, spikes=False)
    assert record_bytes(256, int4) == record_bytes(256, g32)  # the same size on the wire
    want = {c: comm.all_to_all(x, codec=c) for c in (int4, int8, g32)}  # every rank used all
    # a configuration every rank has used, used differently: a bigger record...
    _raises(lambda: comm.all_to_all(x, codec=int8 if rank == 1 else int4), ConfigMismatchError,
            "exchange #4", "int8/g128+spikes", "int4/g128+spikes", "the codecs differ")
    # ... and records of the same size (these used to decode to garbage)
    _raises(lambda: comm.all_to_all(x, codec=g32 if rank == 1 else int4), ConfigMismatchError,
            "int4/g32 records", "int4/g128+spikes records")
    # a configuration new to one rank (its first-use check meets the others' exchange):
    # the rank that checks names its configuration, the one that exchanges what is new
    said = _raises(lambda: comm.all_to_all(x, codec=3 if rank == 1 else int4),
                   ConfigMismatchError, "consistency check")
    assert ("first-use check of moe_flashcomm.all_to_all with row_shape=(256,)" in said
            if rank == 1 else "its codec is none this rank has used (LinkCodecs(" in said), said
    # the backward: gradient codecs every rank has used, used differently
    y = x.clone().requires_grad_()
    int6 = CodecConfig(bits=6)
    for g in (int8, int6):
        comm.all_to_all(y, codec=int4, grad_codec=g).sum().backward()
    out = comm.all_to_all(y, codec=int4, grad_codec=int8 if rank == 0 else int6)
    _raises(lambda: out.sum().backward(), ConfigMismatchError, "all_to_all backward",
            "the codecs differ")
    # and the group works afterwards, bit for bit as before
    for c, expected in want.items():
        assert torch.equal(comm.all_to_all(x, codec=c), expected)
    comm.close()


def test_codec_switch_after_warm_up_gloo_2():
    spawn(_codec_switch, 2, timeout=240)


def _split_sizes(rank, world):
    comm = mf.Communicator(gate=False)
    for codec, hidden, rows in ((4, 64, 5), ("native", 1024, FRAME_BYTES // 4096 + 300)):
        # rank 0 sends `rows` rows to rank 1, which expects rows + 2; rank 1 sends rows + 1 to
        # rank 0, which expects rows - 1 (this direction aborted the process inside gloo).
        # The long case (about 5 MiB) takes the second round on both ends.
        x = make_input(rank, 2 * rows + 1, (hidden,), torch.float32, 2)
        send = [rows + 1, rows]  # (rank 0 keeps rows + 1; rank 1 keeps rows)
        recv = [rows + 1, rows - 1] if rank == 0 else [rows + 2, rows]
        msg = _raises(lambda: comm.all_to_all(x, recv, send, codec=codec), ConfigMismatchError)
        if rank == 0:
            assert f"rank 1: it sends {rows + 1} rows to this rank; this rank expects {rows - 1}" in msg
            assert f"rank 1: it expects {rows + 2} rows from this rank; this rank sends {rows}" in msg
        else:
            assert f"rank 0: it sends {rows} rows to this rank; this rank expects {rows + 2}" in msg
            assert f"rank 0: it expects {rows - 1} rows from this rank; this rank sends {rows + 1}" in msg
        # the transport stayed in step: an agreeing call right after is exact
        ok = [rows, rows]
        xs = x[:2 * rows].to(torch.bfloat16)
        got = comm.all_to_all(xs, ok, ok, codec="bf16")
        theirs = make_input(1 - rank, 2 * rows + 1, (hidden,), torch.float32, 2)[:2 * rows]
        mine = xs[rank * rows:(rank + 1) * rows]
        peer = theirs.to(torch.bfloat16)[rank * rows:(rank + 1) * rows]
        assert torch.equal(got, torch.cat([mine, peer] if rank == 0 else [peer, mine]))
    # one rank per node (topology 1): the hierarchical call's only step, the inter-node stage
    # on the whole group, carries the call's rows too. The gate makes rank 0's 16 rows int4
    # and the 5 rows rank 1 expects bf16: 1280 bytes both, which alone decoded garbage
    H = 128
    hier = mf.Communicator(gate={"cpu": {"int4": 10 * H * 2}}, topology=1, codec=4,
                           algorithm="hierarchical")
    x = make_input(rank, 18 if rank == 0 else 6, (H,), torch.bfloat16, 3)
    send, recv = ([2, 16], [2, 3]) if rank == 0 else ([3, 3], [5, 3])
    _raises(lambda: hier.all_to_all(x, recv, send), ConfigMismatchError,
            "rank 1: it expects 5 rows from this rank; this rank sends 16 to it" if rank == 0
            else "rank 0: it sends 16 rows to this rank; this rank expects 5 from it")
    even = [3, 3]  # (bf16 under the gate: exact, as "bf16" is)
    assert torch.equal(hier.all_to_all(x[:6], even, even),
                       comm.all_to_all(x[:6], even, even, codec="bf16"))
    hier.close()
    comm.close()


def test_split_sizes_disagree_gloo_2():
    spawn(_split_sizes, 2, timeout=240)


def _long_payloads(rank, world):
    comm = mf.Communicator(gate=False)
    hidden = 1024
    long_rows = FRAME_BYTES // (2 * hidden) + 77  # a bf16 payload past one frame
    # rank 0 sends rank 1 a long payload and gets a short one: rank 0's own send does not fit
    # its frame, while rank 1 sends one frame but must fetch the rest (round 2 on both ends)
    S = [[3, long_rows], [5, 2]]
    for codec in ("native", 4):
        for dtype in (torch.bfloat16, torch.float32):
            x = make_input(rank, sum(S[rank]), (hidden,), dtype, 7)
            got = comm.all_to_all(x, [S[p][rank] for p in range(world)], S[rank], codec=codec)
            want = a2a_cases.expected(rank, world, S, (hidden,), dtype, 7,
                                      lambda p: CodecConfig.coerce(codec))
            assert torch.equal(got, want), (codec, dtype)
    # a first-use check on rank 0 (exchange number 0) meets rank 1's call, whose long
    # payload rank 0 must drain: both raise at once, and the group works afterwards
    T = [[S[p][r] for p in range(world)] for r in range(world)]  # rank 1 sends the long one
    x = make_input(rank, sum(T[rank]), (hidden,), torch.float32, 8)
    recv = [T[p][rank] for p in range(world)]
    want = comm.all_to_all(x, recv, T[rank], codec="native")
    _raises(lambda: comm.all_to_all(x, recv, T[rank], codec=8 if rank == 0 else "native"),
            ConfigMismatchError, "consistency check")
    assert torch.equal(comm.all_to_all(x, recv, T[rank], codec="native"), want)
    comm.close()


def test_long_payloads_agree_gloo_2():
    """Payloads past one frame (4 MiB) move their rest point to point, on agreeing ranks too:
    exact, in either direction."""
    spawn(_long_payloads, 2, timeout=240)


def _rejected_before_a_late_long_call(rank, world):
    """Rank 0 rejects its arguments and stops waiting after 5 s (frame.REJECT_WAIT_S); rank 1
    comes 2 s later with a payload past one frame for rank 0. Rank 1 raises at once, naming
    rank 0, and the group works afterwards, long payloads included: rank 1 sent the rest of
    its payload point to point to a frame that had stopped waiting, both ranks waited out
    the timeout, and gloo closed the connection for good."""
    comm = mf.Communicator(gate=False, codec="native", timeout=10)
    rows = FRAME_BYTES // (512 * 4) + 100  # fp32 rows of 512: past 4 MiB per peer
    x = make_input(rank, 2 * rows, (512,), torch.float32, 9)
    s = [rows, rows]
    want = comm.all_to_all(x, s, s)
    small = make_input(rank, 4, (8,), torch.float32, 10)
    want_small = comm.all_to_all(small)
    if rank == 0:
        _raises(lambda: comm.all_to_all(x, s, [rows, rows + 1]), ValueError, "input_split_sizes")
    else:
        time.sleep(frame.REJECT_WAIT_S + 2)
        _raises(lambda: comm.all_to_all(x, s, s), ConfigMismatchError,
                "rank 0: it rejected its all_to_all")
    assert torch.equal(comm.all_to_all(small), want_small)
    assert torch.equal(comm.all_to_all(x, s, s), want)
    comm.close()


def test_a_rejected_call_that_stopped_waiting_meets_a_late_long_payload_gloo_2():
    spawn(_rejected_before_a_late_long_call, 2, timeout=120)


def _late_long_payload(rank, world, away):
    """Rank 1 comes to a call with payloads past one frame after rank 0's timeout. Rank 0
    raises PeerTimeoutError; rank 1's late call completes with rank 0's frame, which stayed
    posted, and its second round, which rank 0 serves; both ranks' next calls pair up, long
    ones too. (Nothing served rank 1's second round: both ranks waited out the timeout there
    and gloo closed the connection for good.) ``away``: rank 0 makes no call for longer than
    a timeout after rank 1 came, and the thread of its group's late frames serves rank 1
    (before, only rank 0's next call did)."""
    comm = mf.Communicator(gate=False, codec="native", timeout=3)
    rows = FRAME_BYTES // (512 * 4) + 100  # fp32 rows of 512: past 4 MiB per peer
    x = make_input(rank, 2 * rows, (512,), torch.float32, 11)
    small = make_input(rank, 4, (8,), torch.float32, 12)
    want, want_small = comm.all_to_all(x), comm.all_to_all(small)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError, match=r"nothing came from ranks \[1\] within 3 s"):
            comm.all_to_all(x)
        assert time.monotonic() - start < LIMIT_S
        if away:
            time.sleep(7)  # (rank 1 comes 1.5 s after the timeout, and waits for our rest)
    else:
        time.sleep(4.5)
        start = time.monotonic()
        assert torch.equal(comm.all_to_all(x), want)  # with rank 0's frame, and its rest
        assert time.monotonic() - start < 3  # (served: not waited out to its 3 s timeout)
        if away:
            time.sleep(5.5)
    assert torch.equal(comm.all_to_all(small), want_small)
    assert torch.equal(comm.all_to_all(x), want)
    comm.close()


def test_a_late_rank_with_a_long_payload_gloo_2():
    spawn(_late_long_payload, 2, False, timeout=120)


def test_a_late_rank_is_served_while_the_others_make_no_call_gloo_2():
    spawn(_late_long_payload, 2, True, timeout=120)


def _late_for_many_calls(rank, world):
    """Rank 1 misses nine calls with payloads past one frame in a row, then makes them: each
    completes with a frame rank 0 left (gloo keeps every one posted), whose rest rank 0's
    late-frame thread sends. Before, only the last 8 late frames were kept: rank 1 waited
    for the rest of the first one, and gloo closed the connection for good. (The ranks
    pace each other through the group's store, not the clock: a loaded machine's clock
    made the test fail.)"""
    store = torch.distributed.distributed_c10d._get_default_store()
    rows = FRAME_BYTES // (512 * 4) + 100  # fp32 rows of 512: past 4 MiB per peer
    xs = [make_input(rank, 2 * rows, (512,), torch.float32, 130 + i) for i in range(10)]
    torch.distributed.barrier()  # (the inputs take a while: the first call must not time out)
    comm = mf.Communicator(gate=False, codec="native", timeout=2)
    want = [comm.all_to_all(x) for x in xs]
    if rank == 0:
        for x in xs[:9]:
            with pytest.raises(PeerTimeoutError, match=r"nothing came from ranks \[1\]"):
                comm.all_to_all(x)
        store.set("missed", "9")
        store.wait(["caught up"], datetime.timedelta(seconds=60))
    else:
        store.wait(["missed"], datetime.timedelta(seconds=60))
        for x, expected in zip(xs[:9], want):
            assert torch.equal(comm.all_to_all(x), expected)
        store.set("caught up", "9")
    assert torch.equal(comm.all_to_all(xs[9]), want[9])
    comm.close()


def test_a_rank_late_for_many_long_calls_catches_up_gloo_2():
    spawn(_late_for_many_calls, 2, timeout=120)


def _silent_peer_long_payloads(rank, world):
    """A peer that does not come to calls with payloads past one frame costs each call one
    timeout, as for short ones (waiting once more for a frame left for the late peer cost
    two), also a call after an unfinished asynchronous one (the two frames share the call's
    one timeout: it cost two, and three before), and an all-reduce (its last call's "gave
    up" step, then its own, cost two)."""
    comm = mf.Communicator(gate=False, codec="native", timeout=3)
    rows = FRAME_BYTES // (512 * 4) + 100  # fp32 rows of 512: past 4 MiB per peer
    x = make_input(rank, 2 * rows, (512,), torch.float32, 14)
    y = make_input(rank, 1000, (), torch.float32, 15)
    comm.all_to_all(x)
    comm.all_reduce(y.clone(), codec=4)
    if rank == 1:
        time.sleep(25)
        os._exit(0)  # (the group is left to its timeouts)
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError, match=r"nothing came from ranks \[1\] within 3 s"):
            comm.all_to_all(x)
        assert time.monotonic() - start < 4.5
    handle = comm.all_to_all(x, async_op=True)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError):
        comm.all_to_all(x)  # the unfinished one first
    assert time.monotonic() - start < 4.5
    with pytest.raises(PeerTimeoutError):
        handle.wait()
    for i in range(3):  # (from the second: the first's "gave up" step waited the timeout)
        start = time.monotonic()
        said = (r"within 3 s" if i == 0 else
                rf"\(silent since exchange #{comm.framing.line(comm.group).count} of this group, "
                r"which waited out its timeout on them\)")
        with pytest.raises(PeerTimeoutError, match=r"nothing came from ranks \[1\] " + said):
            comm.all_reduce(y.clone(), codec=4)
        assert time.monotonic() - start < 4.5
    os._exit(0)


def test_a_silent_peer_costs_one_timeout_per_long_call_gloo_2():
    spawn(_silent_peer_long_payloads, 2, timeout=60)


def _queued_behind_a_timeout(rank, world):
    """The call after one that waited out its timeout on a silent rank: its exchange is not
    waited for, and what the ranks that made it sent may queue behind the earlier exchange
    in gloo. The error named them as silent too ("nothing came from ranks [1, 2]" where
    only rank 2 was; helper 64): now it names the earlier exchange and its silent rank."""
    comm = mf.Communicator(gate=False, timeout=2)
    y = make_input(rank, 3000, (), torch.float32, 16)
    comm.all_reduce(y.clone(), codec=4)
    if rank == 2:
        time.sleep(12)
        os._exit(0)  # (the group is left to its timeouts)
    with pytest.raises(PeerTimeoutError, match=r"nothing came from ranks \[2\] within 2 s"):
        comm.all_reduce(y.clone(), codec=4)
    with pytest.raises(PeerTimeoutError) as e:
        comm.all_reduce(y.clone(), codec=4)
    msg = str(e.value)
    assert ("waited out its timeout on ranks [2]. Only the ranks named there are known to be "
            "silent" in msg or "nothing came from ranks [2] (silent since exchange #" in msg), msg
    os._exit(0)


def test_a_call_after_a_timeout_names_only_the_silent_rank_gloo_3():
    spawn(_queued_behind_a_timeout, 3, timeout=60)


def _user_messages_beside_long_payloads(rank, world):
    """A user's own point-to-point message on the group, with a small tag, in flight while
    a call's payloads past one frame move their rest point to point: neither takes the
    other's (the second round's tags were the exchange numbers themselves, 0 to 65535)."""
    import torch.distributed as dist
    from moe_flashcomm.comm.frame import round_two_tag
    comm = mf.Communicator(gate=False, codec="native", timeout=10)
    rows = FRAME_BYTES // (512 * 4) + 100  # fp32 rows of 512: past 4 MiB per peer
    x = make_input(rank, 2 * rows, (512,), torch.float32, 13)
    want = comm.all_to_all(x)
    number = comm.framing.line(dist.group.WORLD).count + 1  # the next call's
    assert round_two_tag(number) > 1 << 24
    mine = torch.full((rows, 512), 100.0 + rank)  # the same size as a rest, unlike its bytes
    theirs = torch.empty_like(mine)
    sent = dist.isend(mine, 1 - rank, tag=number)
    assert torch.equal(comm.all_to_all(x), want)
    dist.irecv(theirs, 1 - rank, tag=number).wait()
    sent.wait()
    assert torch.equal(theirs, torch.full((rows, 512), 100.0 + (1 - rank)))
    comm.close()


def test_user_messages_beside_long_payloads_gloo_2():
    spawn(_user_messages_beside_long_payloads, 2, timeout=120)


def _shape_and_order(rank, world):
    comm = mf.Communicator(gate=False)
    x = make_input(rank, 4 * world, (64,), torch.float32, 3)
    comm.all_to_all(x)
    comm.all_to_all(x[:2 * world])  # both sizes are known to every rank
    # even splits of different token counts: the sizes disagree on every pair
    _raises(lambda: comm.all_to_all(x if rank == 2 else x[:2 * world]), ConfigMismatchError,
            "rows to this rank")
    # the same tokens grouped into rows of two shapes, both used before: the same bytes on
    # every pair; only the headers' row shape tells (flat, and the hierarchical stages)
    rows = {1: x.view(4 * world, 1, 64), 2: x.view(2 * world, 2, 64)}
    for algorithm in ("flat", "hierarchical"):
        for shaped in rows.values():
            comm.all_to_all(shaped, algorithm=algorithm)
        _raises(lambda: comm.all_to_all(rows[2 if rank == 1 else 1], algorithm=algorithm),
                ConfigMismatchError, "another shape" if algorithm == "flat" else "row shape")
    # a rank that skips a call: its next call pairs with the others' call it skipped (the
    # same bytes: nothing can tell), and their next call waits for it in vain: named
    if rank != 0:
        comm.all_to_all(x)
        _raises(lambda: comm.all_to_all(x), PeerTimeoutError, "nothing came from ranks [0]")
    else:
        comm.all_to_all(x)
        time.sleep(6)  # (leaving now would close its connections: a different error)
    os._exit(0)  # ranks 1 and 2 have an exchange in flight: leave without tearing down


def test_changed_shape_and_skipped_call_gloo_3():
    spawn(_shape_and_order, 3, timeout=240, env=dict(MOE_FLASHCOMM_TIMEOUT_S=4))


def _first_use_values(rank, world):
    """Ranks that disagree in a first-use check (each sees the others' hashes) name the
    others' values where they can tell them: bools, dtypes, values this rank used itself."""
    comm = mf.Communicator(gate=False)
    x = make_input(rank, 4 * world, (64,), torch.float32, 5)
    theirs = {0: 1, 1: 0}[rank]
    _raises(lambda: comm.all_to_all(x if rank == 0 else x.bfloat16()), ConfigMismatchError,
            f"ranks [{theirs}] have {torch.bfloat16 if rank == 0 else torch.float32}")
    y = x.clone().requires_grad_(rank == 1)
    _raises(lambda: comm.all_to_all(y), ConfigMismatchError,
            f"requires_grad: this rank has {rank == 1} (as do ranks [{rank}]); "
            f"ranks [{theirs}] have {rank == 0}")
    def codec(bits):
        return repr(mf.LinkCodecs.coerce(bits, "codec"))
    for bits in (8, 2):  # codecs every rank used: named; one this rank never used: not
        comm.all_to_all(x, codec=bits)
    said = _raises(lambda: comm.all_to_all(x, chunks=1, codec=8 if rank == 0 else 2),
                   ConfigMismatchError, "codec: this rank has")
    assert f"ranks [{theirs}] have {codec(2 if rank == 0 else 8)}" in said, said
    said = _raises(lambda: comm.all_to_all(x, chunks=2, codec=8 if rank == 0 else 3),
                   ConfigMismatchError, "codec: this rank has")
    assert ("ranks [1] have something else" if rank == 0
            else f"ranks [0] have {codec(8)}") in said, said
    comm.close()


def test_first_use_disagreements_name_the_values_gloo_2():
    spawn(_first_use_values, 2, timeout=120)


def _all_reduce_numel(rank, world):
    comm = mf.Communicator(gate=False)
    x = make_input(rank, 1500, (), torch.float32, 4)
    for numel in (1000, 1500, 5000):  # (1000 and 1500 pad to the same rows)
        comm.all_reduce(x[:numel].clone() if numel <= 1500 else torch.ones(numel))
    mine = 1000 if rank == 0 else 1500
    _raises(lambda: comm.all_reduce(x[:mine].clone()), ConfigMismatchError,
            "all_reduce reduce-scatter", f"reduces {2500 - mine} values; this rank reduces {mine}")
    _raises(lambda: comm.all_reduce(x[:1000].clone() if rank else torch.ones(5000)),
            ConfigMismatchError, "values; this rank reduces")
    # an empty tensor on one rank (it returned at once, leaving its peer to time out)
    comm.all_reduce(torch.ones(0))
    _raises(lambda: comm.all_reduce(torch.ones(0) if rank == 0 else x.clone()),
            ConfigMismatchError, "reduces 0 values" if rank else "reduces 1500 values")
    # "native" (the values themselves) against "bf16" records, both used before: named as
    # codecs, not as the sizes that follow from them
    for codec in ("native", "bf16"):
        comm.all_reduce(x.clone(), codec)
    other = "the torch.float32 values themselves (codec \"native\", or a codec gated off)"
    records = "torch.float32 values as records of 1024-value rows (a quantized codec or \"bf16\")"
    _raises(lambda: comm.all_reduce(x.clone(), "native" if rank else "bf16"),
            ConfigMismatchError, f"it sends {other if rank == 0 else records}; this rank sends "
            f"{records if rank == 0 else other}")
    # counts of another integer dtype on one rank: named (once "another dtype")
    counts = torch.arange(4 * world, dtype=torch.int64)
    comm.exchange_counts(counts)
    _raises(lambda: comm.exchange_counts(counts.int() if rank else counts), ConfigMismatchError,
            f"it sends {torch.int32 if rank == 0 else torch.int64} rows")
    # afterwards: the specification's result on every rank
    got = comm.all_reduce(x.clone())
    inputs = [make_input(r, 1500, (), torch.float32, 4) for r in range(world)]
    assert torch.equal(got, reference_all_reduce(inputs))
    comm.close()


def test_all_reduce_numel_disagrees_gloo_2():
    spawn(_all_reduce_numel, 2, timeout=240)


def _backend_sum_numel(rank, world):
    """The backend's own sum (the gated path and "native"): framed over gloo too, so a numel
    that differs raises on every rank where gloo would abort the process."""
    import torch.distributed as dist
    from moe_flashcomm.comm.gate import SizeGate
    # quantized from 1 MiB of bf16 on CPU (CPU is never gated by default)
    gated = mf.Communicator(gate=SizeGate({}, all_reduce={"cpu": {"*": 1 << 20}}))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        inputs = [make_input(r, 1003, (), dtype, 9) for r in range(world)]
        ordered = functools.reduce(torch.add, inputs)  # rounded in the dtype at each step
        for codec in (None, "native"):
            got = gated.all_reduce(inputs[rank].clone(), codec=codec)
            assert torch.equal(got, ordered), (dtype, codec)
            if world == 2:  # a + b = b + a: gloo's own bits
                stock = inputs[rank].clone()
                dist.all_reduce(stock)
                assert torch.equal(got, stock), (dtype, codec)
    # more than a frame of values: a reduce-scatter and an all-gather
    inputs = [make_input(r, (1 << 20) + 5, (), torch.float32, 10) for r in range(world)]
    got = gated.all_reduce(inputs[rank].clone(), codec="native")
    assert torch.equal(got, functools.reduce(torch.add, inputs)), "two steps"
    x = make_input(rank, 1500, (), torch.float32, 4)
    mine = 1000 + rank
    for codec in (None, "native"):
        _raises(lambda: gated.all_reduce(x[:mine].clone(), codec=codec), ConfigMismatchError,
                "all_reduce reduce-scatter", f"this rank reduces {mine}")
    # a size the gate sends to the backend on one rank and quantizes on the others
    big = 1 << 19
    _raises(lambda: gated.all_reduce(torch.ones(big if rank == 0 else 1000)),
            ConfigMismatchError, f"values; this rank reduces {big if rank == 0 else 1000}")
    # two steps on one rank, one on the others
    _raises(lambda: gated.all_reduce(torch.ones(1 << 21 if rank == 0 else 1000), codec="native"),
            ConfigMismatchError, f"values; this rank reduces {1 << 21 if rank == 0 else 1000}")
    got = gated.all_reduce(x.clone(), codec="native")  # the group works afterwards
    want = sum(make_input(r, 1500, (), torch.float32, 4) for r in range(world))
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    gated.close()


def test_backend_sum_numel_disagrees_gloo_2():
    spawn(_backend_sum_numel, 2, timeout=240)


def test_backend_sum_numel_disagrees_gloo_3():
    spawn(_backend_sum_numel, 3, timeout=240)


def _local_error_mid_call(rank, world):
    """One rank fails on its own between the steps of a framed all-reduce (its tensor, made
    under inference mode, cannot be written outside it): every rank raises in that call and
    the next calls sum the same calls of every rank (they summed one rank's call k + 1 with
    the others' call k, silently, for good; helper 64)."""
    comm = mf.Communicator(gate=False, timeout=10)
    # the backend's sum of more than a frame of fp32 (two steps); the quantized one in three
    # pieces, of whole rows of every rank (so that it writes into x itself, not a copy)
    for codec, chunks, n in (("native", None, (1 << 20) + 5), (8, 3, world * 3 * all_reduce.ROW)):

        def x(k: int, inference: bool = False) -> torch.Tensor:
            with torch.inference_mode(inference):
                return torch.full((n,), float((rank + 1) * 10 ** k))
        comm.all_reduce(x(0), codec, chunks=chunks)
        if rank == 1:
            _raises(lambda: comm.all_reduce(x(0, inference=True), codec, chunks=chunks),
                    RuntimeError, "inference")
        else:
            _raises(lambda: comm.all_reduce(x(0), codec, chunks=chunks), ConfigMismatchError,
                    "rank 1: it rejected its all_reduce", "an error of its own during the call")
        for k in (1, 2):
            want = torch.full((n,), float(sum(p + 1 for p in range(world)) * 10 ** k))
            got = comm.all_reduce(x(k), codec, chunks=chunks)
            assert torch.allclose(got, want, rtol=1e-2, atol=0), (codec, k, got[:2])
    comm.close()


def test_a_local_error_mid_all_reduce_raises_on_every_rank_gloo_3():
    spawn(_local_error_mid_call, 3, timeout=240)


def _fail_once(module, name: str):
    """``module.name`` replaced by a function that raises MemoryError once, then restores it
    (what running out of memory there would do)."""
    real = getattr(module, name)

    def fail(*args, **kwargs):
        setattr(module, name, real)
        raise MemoryError(f"out of memory in {name}")
    setattr(module, name, fail)


def _local_error_in_a_call(rank, world):
    """One rank fails on its own in a call (out of memory padding x for an all-reduce,
    planning, encoding or packing an all-to-all, reducing between a hierarchical
    all-reduce's stages): every rank raises in that call, and the next calls are right.
    Before, the peers paired the exchange it owed with its next call: no error where it
    failed, and wrong results from then on (helper 69 for the hierarchical ones)."""
    comm = mf.Communicator(gate=False, topology=2, timeout=10)
    n = world * 3 * all_reduce.ROW + 7  # (padded)

    def x(k: int) -> torch.Tensor:
        return torch.full((n,), float((rank + 1) * 10 ** k))
    y = make_input(rank, 4 * world, (256,), torch.float32, 3)

    def gradient(k: int, algorithm: str) -> torch.Tensor:
        leaf = (y * k).requires_grad_()
        comm.all_to_all(leaf, codec=8, grad_codec=8, algorithm=algorithm).backward(y)
        return leaf.grad
    runs = {  # the call, where it fails on rank 1, the sum or exchange it gives
        "int8 all_reduce": (lambda k: comm.all_reduce(x(k), 8), (all_reduce, "_padded")),
        "hierarchical all_reduce": (lambda k: comm.all_reduce(x(k), 8, algorithm="hierarchical"),
                                    (all_reduce, "_padded")),
        "int8 all_to_all, planned": (lambda k: comm.all_to_all(y * k, codec=8),
                                     (exchange, "cached_plan")),
        "int8 all_to_all, encoded": (lambda k: comm.all_to_all(y * k, codec=8),
                                     (exchange, "encode")),
        "hierarchical all_to_all, packed": (
            lambda k: comm.all_to_all(y * k, codec=8, algorithm="hierarchical"),
            (hierarchical, "_pack")),
        "hierarchical all_to_all with split sizes, packed after the counts": (
            lambda k: comm.all_to_all(y * k, [4] * world, [4] * world, codec=8,
                                      algorithm="hierarchical"), (hierarchical, "_pack")),
        "hierarchical all_reduce, encoded": (
            lambda k: comm.all_reduce(x(k), 8, algorithm="hierarchical"),
            (all_reduce, "_scatter_records")),
        "all_to_all backward": (lambda k: gradient(k, "flat"), (autograd._Call, "backward")),
        "hierarchical all_to_all backward": (lambda k: gradient(k, "hierarchical"),
                                             (autograd._Call, "backward")),
        "hierarchical all_reduce, reduced between the stages": (
            lambda k: comm.all_reduce(x(k), 8, algorithm="hierarchical"),
            (all_reduce, "reduce_chunk")),
    }
    for name, (call, (module, function)) in runs.items():
        want = {k: call(k) for k in (1, 2, 3)}  # (each planned and checked once)
        if rank == 1:
            _fail_once(module, function)
            _raises(lambda: call(1), MemoryError, function)
        else:  # before its first exchange it rejected the call, after one it failed in it
            said = _raises(lambda: call(1), ConfigMismatchError)
            assert re.search(r"rank 1: it (rejected its|failed on its own earlier in this call)",
                             said), (name, said)
        for k in (2, 3):
            assert torch.equal(call(k), want[k]), (name, k)
    comm.close()


def test_a_local_error_in_a_call_raises_on_every_rank_gloo_4():
    spawn(_local_error_in_a_call, 4, timeout=240)


def _silent_peer(rank, world):
    comm = mf.Communicator(gate=False, timeout=3)
    x = make_input(rank, 4 * world, (64,), torch.float32, 5)
    comm.all_to_all(x)
    if rank == 2:  # never makes the call
        time.sleep(8)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError) as info:
        comm.all_to_all(x)
    assert 3 <= time.monotonic() - start < LIMIT_S
    assert "nothing came from ranks [2]" in str(info.value)
    os._exit(0)  # an exchange is in flight: leave without tearing the group down


def test_silent_peer_is_named_gloo_3():
    spawn(_silent_peer, 3, timeout=120)


def _late_rank(rank, world):
    """A rank that comes to a call of several steps after the others gave up on it (their
    PeerTimeoutError) completes the first step with the frames they abandoned, and meets at
    its next step the headers-only frames they left for it: it raises in that same call,
    and the next calls pair up. Before, its later steps paired with the others' next call:
    from then on every rank got a mix of two calls' values, with no error. (It comes within
    the others' next call's timeout: a rank silent through that too makes it fail as well.)"""
    comm = mf.Communicator(gate=False, topology=2, timeout=2)
    xs = [make_input(rank, 4 * world, (64,), torch.float32, 20 + i) for i in range(3)]
    ys = [make_input(rank, 3000, (), torch.float32, 30 + i) for i in range(3)]
    longs = [make_input(rank, FRAME_BYTES // 4 + 4096, (), torch.float32, 40 + i) for i in range(3)]
    s = [4] * world
    calls = {  # each of several framed steps
        "int8 all_reduce": lambda i: comm.all_reduce(ys[i].clone(), codec=8),
        "native all_reduce past one frame": lambda i: comm.all_reduce(longs[i].clone(),
                                                                      codec="native"),
        "hierarchical all_to_all, split sizes": lambda i: comm.all_to_all(
            xs[i], s, s, algorithm="hierarchical"),
        "hierarchical all_reduce": lambda i: comm.all_reduce(ys[i].clone(),
                                                             algorithm="hierarchical")}
    for name, call in calls.items():
        want = [call(i) for i in range(3)]
        if rank == 3:
            time.sleep(3)  # past the others' timeout, within their next call's
            _raises(lambda: call(0), ConfigMismatchError,
                    "it stopped waiting for a silent rank earlier in this call")
        else:
            _raises(lambda: call(0), PeerTimeoutError, "nothing came from ranks [3]")
        for i in (1, 2):
            assert torch.equal(call(i), want[i]), (name, i)
    comm.close()


def test_a_late_rank_raises_in_the_call_it_was_late_for_gloo_4():
    spawn(_late_rank, 4, timeout=180)


def _late_to_the_first_call(rank, world):
    """A rank that came to the first module-level call on a group after the others' timeout
    (the check that makes the group's default communicator) passed that check alone, with the
    frame they left; its next check met the one they made again, and from then on the ranks
    disagreed at every call (the others making the communicator, it using the one it made).
    It now forgets the check it passed alone (helper 68): one error on each rank, then the
    calls pair up."""
    import torch.distributed as dist
    x = make_input(rank, 4 * world, (64,), torch.float32, 1)
    want = mf.all_to_all(x, codec=8, gate=False)  # (the same ranks: the same bits)
    g = dist.new_group(list(range(world)))
    if rank == 1:
        time.sleep(3)  # past the others' timeout (2 s)
        _raises(lambda: mf.all_to_all(x, group=g, codec=8, gate=False), ConfigMismatchError,
                "rank 0: it makes the first-use check of a configuration this rank checked "
                "with it before, so it missed that check")
    else:
        _raises(lambda: mf.all_to_all(x, group=g, codec=8, gate=False), PeerTimeoutError,
                "nothing came from ranks [1]")
    for _ in range(3):
        assert torch.equal(mf.all_to_all(x, group=g, codec=8, gate=False), want)


def test_a_rank_late_to_a_groups_first_call_gloo_2():
    spawn(_late_to_the_first_call, 2, timeout=120, env={"MOE_FLASHCOMM_TIMEOUT_S": 2})


def _rejected_and_late(rank, world):
    """Rank 0 rejects its arguments and rank 3 comes late, in one call of several steps. The
    ranks that time out in the first step saw rank 0's rejected header, and so leave no
    later step for it (as the late rank does, which sees the rejection). Before, their
    later steps waited for rank 0: within two calls the group was lost."""
    comm = mf.Communicator(gate=False, topology=2, timeout=2)
    rows = [4] * world
    xs = [make_input(rank, 4 * world, (64,), torch.float32, 60 + i) for i in range(3)]
    longs = [make_input(rank, FRAME_BYTES // 4 * world + 4096, (), torch.float32, 70 + i)
             for i in range(3)]
    calls = {  # name: (the call, rank 0's bad arguments)
        "native all_reduce past one frame": (
            lambda i: comm.all_reduce(longs[i].clone(), codec="native"),
            lambda: comm.all_reduce(longs[0].clone(), codec="native", op="max")),
        "hierarchical all_to_all, split sizes": (
            lambda i: comm.all_to_all(xs[i], rows, rows, algorithm="hierarchical"),
            lambda: comm.all_to_all(xs[0], rows, [5] + rows[1:], algorithm="hierarchical"))}
    for name, (call, bad) in calls.items():
        want = [call(i) for i in range(3)]
        if rank == 0:
            _raises(bad, ValueError)
        elif rank == 3:
            time.sleep(3)  # past the others' timeout
            _raises(lambda: call(0), ConfigMismatchError, "rank 0: it rejected its")
        else:
            _raises(lambda: call(0), PeerTimeoutError, "nothing came from ranks [3]")
        for i in (1, 2):
            assert torch.equal(call(i), want[i]), (name, i)
    # again, where ranks 0-2 make no call for over two timeouts after it: the threads of
    # their late frames serve rank 3's second round, though what came disagrees (rank 0's
    # rejection). Before, rank 3 waited that out there and gloo closed the connection.
    call, bad = calls["native all_reduce past one frame"]
    want = [call(i) for i in range(3)]
    start = time.monotonic()
    if rank == 0:
        _raises(bad, ValueError)
    elif rank == 3:
        time.sleep(3)
        _raises(lambda: call(0), ConfigMismatchError, "rank 0: it rejected its")
    else:
        _raises(lambda: call(0), PeerTimeoutError, "nothing came from ranks [3]")
    time.sleep(max(0.0, 8 - (time.monotonic() - start)))
    for i in (1, 2):
        assert torch.equal(call(i), want[i]), ("away", i)
    comm.close()


def test_a_rejecting_rank_and_a_late_rank_in_one_call_gloo_4():
    spawn(_rejected_and_late, 4, timeout=180)


def _late_calls_stay_paired(rank, world):
    """Three ways a late rank used to leave the ranks one call apart, with no error from
    then on (each later call mixed one rank's call k with the others' call k-1):
    - late for a call of one step (a native all-reduce within one frame): it completes the
      call with the frames the others abandoned, and they ended it with an all-gather such
      a call does not have;
    - slow between the steps of a chunked all-reduce's first piece: the others ended the
      call there, and its next piece paired with their next call;
    - late and rejecting its call: its peers could not know it would reject, and the step
      they ended the call with met its next call instead (it now posts that frame again)."""
    comm = mf.Communicator(gate=False, timeout=2)
    last = world - 1
    small = [make_input(rank, 3000, (), torch.float32, 90 + i) for i in range(3)]
    longs = [make_input(rank, FRAME_BYTES // 4 * world + 4096, (), torch.float32, 95 + i)
             for i in range(3)]
    chunked = [make_input(rank, world * 4096, (), torch.float32, 100 + i) for i in range(3)]
    slow = {"pieces": -1}  # the reduce-scatters this rank makes before it is slow
    reduce_chunk = all_reduce.reduce_chunk

    def slow_reduce(*args, **kwargs):  # (this process's own calls only)
        if slow["pieces"] == 0:
            time.sleep(3)  # past the timeout, between the piece's reduce-scatter and all-gather
        slow["pieces"] -= 1
        return reduce_chunk(*args, **kwargs)
    all_reduce.reduce_chunk = slow_reduce
    calls = {  # name: the call, and what makes rank `last` late (or late and rejecting)
        "native all_reduce within one frame": (
            lambda i: comm.all_reduce(small[i].clone(), codec="native"), None),
        "chunked bf16 all_reduce": (
            lambda i: comm.all_reduce(chunked[i].clone(), codec="bf16", chunks=2), None),
        "native all_reduce past one frame, late and rejected": (
            lambda i: comm.all_reduce(longs[i].clone(), codec="native"),
            lambda: comm.all_reduce(longs[0].clone(), codec="native", op="max"))}
    for name, (call, bad) in calls.items():
        want = [call(i) for i in range(3)]
        if rank != last:
            _raises(lambda: call(0), PeerTimeoutError, f"nothing came from ranks [{last}]")
        elif name.startswith("chunked"):
            slow["pieces"] = 0
            _raises(lambda: call(0), ConfigMismatchError,
                    "it stopped waiting for a silent rank earlier in this call")
        else:
            time.sleep(3)  # past the others' timeout
            if bad is None:  # (one step: it completes the call the others gave up on)
                assert torch.equal(call(0), want[0]), name
            else:
                _raises(bad, ValueError)
        for i in (1, 2):
            assert torch.equal(call(i), want[i]), (name, i)
    comm.close()
    # late and rejecting again, where rank 1 waits longer than the others (it sees the
    # rejection and ends the call; rank 0 gives up and leaves a step), and rank 1 then
    # rejects its next call: its rejected frame meets rank 0's stale step, as the others'
    # frames do, and posts again with them (before, only theirs did)
    mixed = mf.Communicator(gate=False, timeout=10 if rank == 1 else 2)
    xs = [make_input(rank, 4 * world, (64,), torch.float32, 105 + i) for i in range(3)]
    want = [mixed.all_to_all(x) for x in xs]
    mixed.all_reduce(longs[1].clone(), codec="native")
    if rank == last:
        time.sleep(3)
        _raises(lambda: mixed.all_reduce(longs[0].clone(), codec="native", op="max"), ValueError)
    else:
        _raises(lambda: mixed.all_reduce(longs[0].clone(), codec="native"),
                *((PeerTimeoutError,) if rank == 0 else (ConfigMismatchError, "it rejected")))
    if rank == 1:
        _raises(lambda: mixed.all_to_all(xs[0], [4] * world, [5] * world), ValueError)
    else:
        _raises(lambda: mixed.all_to_all(xs[0]), ConfigMismatchError,
                "rank 1: it rejected its all_to_all")
    for i in (1, 2):
        assert torch.equal(mixed.all_to_all(xs[i]), want[i]), ("mixed timeouts", i)
    mixed.close()


def test_late_ranks_leave_the_calls_paired_gloo_3():
    spawn(_late_calls_stay_paired, 3, timeout=180)


def _too_many_stale_frames(rank, world):
    """More "gave up" frames of earlier calls in a row than a frame posts again past
    (frame.STALE_KEPT; left here by hand, as no real sequence of calls was found to leave
    so many): the error says what was met, not only that the peer ran another operation."""
    comm = mf.Communicator(gate=False, timeout=2)
    x = make_input(rank, 4 * world, (64,), torch.float32, 120)
    comm.all_to_all(x, codec="native")
    line = comm.framing.line(torch.distributed.group.WORLD)
    if rank == 0:
        empty = torch.empty(0)
        for _ in range(frame.STALE_KEPT + 1):
            frame.all_to_all_single(comm.framing, None, 0, world, "all_reduce all-gather",
                                    empty, empty, [0] * world, [0] * world, aborted=True,
                                    wait=False, number=line.count, counter=None)
        _raises(lambda: comm.all_to_all(x, codec="native"), PeerTimeoutError)
    else:
        _raises(lambda: comm.all_to_all(x, codec="native"), ConfigMismatchError,
                f"rank 0: it left this frame (exchange #{line.count}, its all_reduce "
                "all-gather) for a rank that came late", "more than 8 in a row")
        time.sleep(3)  # (until rank 0's timeout)
    os._exit(0)  # (the group is out of step for good: leave without tearing it down)


def test_too_many_stale_frames_are_named_gloo_2():
    spawn(_too_many_stale_frames, 2, timeout=60)


def _failed_calls_free_their_frames(rank, world):
    """A failed call's frames (and their buffers, MiB per peer) go with the error, with the
    garbage collector off: nothing closes a cycle through them. (The frame kept the error
    it raised, whose traceback holds the frame: a loop of calls failing on a lost peer grew
    by one frame's buffers per call until the collector ran.)"""
    def frames_alive() -> int:
        return sum(isinstance(o, frame.Frame) for o in gc.get_objects())

    def fails(call, kind) -> None:  # (pytest.raises keeps the error in a cycle of its own)
        try:
            call()
        except kind:
            return
        raise AssertionError(f"no {kind.__name__}")
    comm = mf.Communicator(gate=False, timeout=2)
    x = make_input(rank, 4 * world, (64,), torch.float32, 140)
    for codec in (4, 8):  # (used by both: only the headers see the disagreement below)
        comm.all_to_all(x, codec=codec)
    gc.collect()
    gc.disable()
    try:
        assert frames_alive() == 0
        fails(lambda: comm.all_to_all(x, codec=8 if rank else 4), ConfigMismatchError)
        assert frames_alive() == 0, "a disagreement"
        if rank == 1:
            os._exit(0)  # (lost: rank 0's calls fail at once)
        time.sleep(0.5)
        for _ in range(3):
            fails(lambda: comm.all_to_all(x, codec=4), frame.PeerError)
        assert frames_alive() == 0, "a lost peer"
    finally:
        gc.enable()
    os._exit(0)  # (the group is lost: leave without tearing it down)


def test_failed_calls_free_their_frames_gloo_2():
    spawn(_failed_calls_free_their_frames, 2, timeout=60)


def _late_and_disagreeing(rank, world):
    """A rank late for a call whose arguments also disagree with the others':
    - a native all-reduce within one frame, the late rank's numel 8 smaller: it ended the
      call with an aborted all-gather, which the others (they had timed out) did not post,
      and from then on every call summed its call k with their call k + 1, with no error;
    - an all-to-all whose payloads fit one frame, the late rank's past one: the others'
      frames of the call were never read, its rest waited for a receive never posted, and
      gloo closed the connection for good."""
    comm = mf.Communicator(gate=False, timeout=2)
    last = world - 1
    small = [make_input(rank, 3000, (), torch.float32, 110 + i) for i in range(3)]
    xs = [make_input(rank, 300 * world, (64,), torch.float32, 115 + i) for i in range(3)]
    big = make_input(rank, 20000 * world, (64,), torch.float32, 118)  # 5 MB to each peer
    calls = {  # name: the call, the late rank's call, and what it sees there
        "native all_reduce within one frame": (
            lambda i: comm.all_reduce(small[i].clone(), codec="native"),
            lambda: comm.all_reduce(small[0][:-8].clone(), codec="native"),
            "it reduces 3000 values; this rank reduces 2992"),
        "all_to_all, the late rank's payloads past one frame": (
            lambda i: comm.all_to_all(xs[i], codec="native"),
            lambda: comm.all_to_all(big, codec="native"),
            "it sends 300 rows to this rank; this rank expects 20000 from it")}
    for name, (call, bad, seen) in calls.items():
        want = [call(i) for i in range(3)]
        if rank != last:
            _raises(lambda: call(0), PeerTimeoutError, f"nothing came from ranks [{last}]")
        else:
            time.sleep(3)  # past the others' timeout
            _raises(bad, ConfigMismatchError, seen)
        for i in (1, 2):
            assert torch.equal(call(i), want[i]), (name, i)
    comm.close()


def test_a_late_rank_that_also_disagrees_gloo_3():
    spawn(_late_and_disagreeing, 3, timeout=180)


def _slow_between_stages(rank, world):
    """Rank 3 is slow between the stages of a hierarchical call with payloads past one frame:
    rank 1, its peer in the second stage (on their own stage group), times out there, and
    rank 3 then completes that stage with rank 1's abandoned frame and waits for its rest.
    Rank 1 serves it, as a late frame of the call's group. Before, that frame was on the
    stage group's line: both waited out the timeout and gloo closed the connection."""
    delay = {"left": False}
    stage_a2a = hierarchical.Hierarchy.a2a

    def slow_a2a(self, stage, *args, **kwargs):  # (this process's own calls only)
        if stage == "inter" and delay["left"]:
            delay["left"] = 0
            time.sleep(3)  # past the timeout
        return stage_a2a(self, stage, *args, **kwargs)
    hierarchical.Hierarchy.a2a = slow_a2a
    comm = mf.Communicator(gate=False, topology=2, timeout=2, algorithm="hierarchical")
    # 1100 rows of 2 KiB to each rank: 4.4 MB per peer in each stage
    xs = [make_input(rank, 1100 * world, (512,), torch.float32, 80 + i) for i in range(3)]
    want = [comm.all_to_all(x, codec="native") for x in xs]
    delay["left"] = rank == 3
    if rank == 1:
        _raises(lambda: comm.all_to_all(xs[0], codec="native"), PeerTimeoutError,
                "nothing came from ranks [3]")
    else:
        assert torch.equal(comm.all_to_all(xs[0], codec="native"), want[0])
    if rank in (0, 2):
        time.sleep(3)  # (they know rank 3 is slow: their next call must not time out on it)
    for i in (1, 2):
        assert torch.equal(comm.all_to_all(xs[i], codec="native"), want[i]), i
    comm.close()


def test_a_rank_slow_between_hierarchical_stages_gloo_4():
    spawn(_slow_between_stages, 4, timeout=180)


def _missed_check(rank, world):
    """A rank that passed a first-use check its peer missed (the peer made it through
    another communicator of the group, or came late to it) exchanged at every later call
    while the peer checked again: both raised at every call, forever. Now the rank that
    exchanges sees the peer check what it checked before, forgets that check, and both
    check again at their next call."""
    a, b = mf.Communicator(gate=False, timeout=2), mf.Communicator(gate=False, timeout=2)
    x = make_input(rank, 4 * world, (64,), torch.float32, 50)
    want = mf.all_to_all(x, codec="native")
    # crosswise: a's check on rank 0 meets b's on rank 1, with equal fields: they pass
    assert torch.equal((a if rank == 0 else b).all_to_all(x, codec="native"), want)
    for comm, checked in ((b, 1), (a, 0)):  # checked on one rank only
        said = ("it makes the first-use check of a configuration this rank checked with it "
                "before" if rank == checked else "while this rank runs consistency check")
        _raises(lambda: comm.all_to_all(x, codec="native"), ConfigMismatchError, said)
        for _ in range(2):
            assert torch.equal(comm.all_to_all(x, codec="native"), want)
    # late to a check: rank 1 passes it with the frame rank 0 abandoned (PeerTimeoutError),
    # and its exchange meets the check rank 0 left posted for it
    y = make_input(rank, 4 * world, (32,), torch.float32, 51)
    want = mf.all_to_all(y, codec="native")
    if rank == 1:
        time.sleep(3)
    _raises(lambda: b.all_to_all(y, codec="native"),
            *((ConfigMismatchError, "it came to it late") if rank == 1
              else (PeerTimeoutError, "nothing came from ranks [1]")))
    for _ in range(2):
        assert torch.equal(b.all_to_all(y, codec="native"), want)
    a.close()
    b.close()


def test_a_check_one_rank_missed_is_made_again_gloo_2():
    spawn(_missed_check, 2, timeout=120)


def _enable_meeting(rank, world):
    """The bounded wait in front of enable_deepspeed's and enable_all_reduce's agreement
    (patching._Meeting), by the ranks' clocks: rank 1 skips a call. Rank 0 names it at each
    call it waits in vain; rank 1, coming to its first call after rank 0 gave up its second,
    learns it is a call behind, and to its second that it came too late; the third meets."""
    import torch.distributed as dist
    from moe_flashcomm.integrations.patching import _Meeting
    dist.barrier()  # one clock for both ranks (their imports took different times)
    start = time.monotonic()

    def at(t):
        time.sleep(max(0.0, start + t - time.monotonic()))

    if rank == 0:
        for _ in range(2):  # t 0-2 s, 2-4 s
            _raises(lambda: _Meeting("enable_x", 2), PeerTimeoutError,
                    "enable_x: ranks [1] did not call it within 2 s")
    else:
        at(5)
        _raises(lambda: _Meeting("enable_x", 2), PeerTimeoutError,
                "ranks [0] have made more calls of enable_deepspeed / enable_all_reduce (2) "
                "than this rank (1): this rank skipped one")
        at(6)  # rank 0 gave up its second call at 4 s, and makes its third at 8 s
        _raises(lambda: _Meeting("enable_x", 2), PeerTimeoutError,
                "every rank called it, but not within 2 s of each other")
    at(8)
    met = _Meeting("enable_x", 10)  # in step again
    dist.barrier()  # (agree's collective: every rank is past the meeting before it is closed)
    met.close()
    dist.barrier()  # (rank 0 holds the store: it must not exit while rank 1 uses it)


def test_enable_meeting_names_silent_and_skipping_ranks_gloo_2():
    spawn(_enable_meeting, 2, timeout=120)


def _algorithm_switch(rank, world):
    """Flat on rank 0, hierarchical on the others (both used before). Over gloo a
    hierarchical call's first step runs on the whole group, so the two meet there and every
    rank raises at once, naming the other's call (not after the timeout); the hierarchical
    ranks send their later steps only where rank 0 is not awaited."""
    comm = mf.Communicator(gate=False, topology=2, timeout=60)
    x = make_input(rank, 4 * world, (64,), torch.float32, 11)
    y = make_input(rank, 3000, (), torch.float32, 12)
    before = {a: (comm.all_to_all(x, algorithm=a), comm.all_reduce(y.clone(), algorithm=a))
              for a in ("flat", "hierarchical")}
    mine = "flat" if rank == 0 else "hierarchical"
    if rank == 0:
        _raises(lambda: comm.all_to_all(x, algorithm=mine), ConfigMismatchError,
                "rank 1: it runs hierarchical stage while this rank runs all_to_all",
                "rank 3: it runs hierarchical stage")
        _raises(lambda: comm.all_reduce(y.clone(), algorithm=mine), ConfigMismatchError,
                "rank 2: it runs hierarchical all-reduce stage while this rank runs "
                "all_reduce reduce-scatter")
    else:
        _raises(lambda: comm.all_to_all(x, algorithm=mine), ConfigMismatchError,
                "rank 0: it runs all_to_all while this rank runs hierarchical stage")
        _raises(lambda: comm.all_reduce(y.clone(), algorithm=mine), ConfigMismatchError,
                "rank 0: it runs all_reduce reduce-scatter while this rank runs "
                "hierarchical all-reduce stage")
    for a, (out, total) in before.items():  # and the group works afterwards
        assert torch.equal(comm.all_to_all(x, algorithm=a), out)
        assert torch.equal(comm.all_reduce(y.clone(), algorithm=a), total)
    # "auto" with split sizes gathers the group's sizes at a codec's first use (framed: it
    # was a plain all_reduce, which a rank rejecting its arguments left waiting forever)
    s = [4] * world
    comm.all_to_all(x, s, s, codec=4, algorithm="auto")
    if rank == 0:
        _raises(lambda: comm.all_to_all(x, s, [5] * world, codec=8, algorithm="auto"),
                ValueError, "input_split_sizes sums to 20")
    else:
        _raises(lambda: comm.all_to_all(x, s, s, codec=8, algorithm="auto"),
                ConfigMismatchError, "rank 0: it rejected its")
    assert torch.equal(comm.all_to_all(x, s, s, algorithm="flat"), before["flat"][0])
    comm.close()


def test_algorithm_switched_on_one_rank_gloo_4():
    spawn(_algorithm_switch, 4, timeout=120)


def _hierarchical(rank, world):
    comm = mf.Communicator(gate=False, topology=2, algorithm="hierarchical")
    x = make_input(rank, 4 * world, (256,), torch.float32, 6)
    int4, g32 = CodecConfig(bits=4), CodecConfig(bits=4, group_size=32, spikes=False)
    # (two LinkCodecs whose stages move the same bytes: the link classes' codecs swapped)
    swapped = mf.LinkCodecs(intra_node=8, inter_node=4), mf.LinkCodecs(intra_node=4, inter_node=8)
    want = {c: comm.all_to_all(x, codec=c) for c in (int4, g32, *swapped)}
    # rank 3 only: stage 1 runs on the whole group over gloo (headers to every rank), so
    # every rank sees it there
    for mine, others in ((g32, int4), swapped):
        msg = _raises(lambda: comm.all_to_all(x, codec=mine if rank == 3 else others),
                      ConfigMismatchError, "hierarchical stage",
                      "its codecs, size gate or row shape (x.shape[1:-1]) differ")
        assert ("rank 3: its codecs" in msg) == (rank != 3), msg
    # rows of another hidden size or dtype (each used by every rank before) are named
    narrow, half = x[:, :128].contiguous(), x.to(torch.bfloat16)
    for other in (narrow, half):
        comm.all_to_all(other, codec=int4)
    for other, hidden, dtype in ((narrow, 128, torch.float32), (half, 256, torch.bfloat16)):
        msg = _raises(lambda: comm.all_to_all(other if rank == 3 else x, codec=int4),
                      ConfigMismatchError, "hierarchical stage")
        theirs = f"{dtype} rows of hidden size {hidden}" if rank != 3 else \
            "torch.float32 rows of hidden size 256"
        assert f"it sends {theirs}" in msg, msg
    # split sizes passed on one rank only (both ways used by every rank before): its call
    # begins with an exchange of row counts, which meets the others' first stage
    s = [4] * world
    comm.all_to_all(x, s, s, codec=int4)
    msg = _raises(lambda: comm.all_to_all(x, *((s, s) if rank == 3 else ()), codec=int4),
                  ConfigMismatchError, "pass them on every rank or on none")
    assert ("this rank passed split sizes and it did not" in msg) == (rank == 3), msg
    # split sizes: rank 3 expects 5 rows from rank 0, which sends 4 (across the nodes, so
    # only a relay carries them): the source and the destination meet in stage 1, whose
    # headers carry the call's rows pair by pair; the relays raise in stage 2
    # (stage 2 runs on its own stage group: its errors name ranks of the group too, as
    # stage 1's do, not their place in the stage group)
    msg = _raises(lambda: comm.all_to_all(x, [5, 4, 4, 4] if rank == 3 else s, s, codec=int4),
                  ConfigMismatchError, f"(seen by group rank {rank} of 4):")
    assert {0: "rank 3: it expects 5 rows from this rank; this rank sends 4 to it",
            3: "rank 0: it sends 4 rows to this rank; this rank expects 5 from it",
            1: "rank 3: it found ranks disagreeing", 2: "rank 0: it found ranks disagreeing"
            }[rank] in msg and "global rank" not in msg, msg
    # a forward on rank 3 where the others run a backward (both used before; the same bytes:
    # even splits, grad_codec == codec): the stages' headers name the direction, so every
    # rank raises, as in the flat algorithm, and again at the next call, crossed the other way
    leaf = x.clone().requires_grad_()
    g = make_input(rank + 10, 4 * world, (256,), torch.float32, 6)
    comm.all_to_all(leaf, codec=int4, grad_codec=int4).backward(g)
    y = comm.all_to_all(leaf, codec=int4, grad_codec=int4)
    fwd, bwd = "hierarchical stage", "hierarchical backward stage"
    steps = {bwd: lambda: y.backward(g), fwd: lambda: comm.all_to_all(x, codec=int4)}
    for mine, theirs in ((bwd, fwd), (fwd, bwd)) if rank != 3 else ((fwd, bwd), (bwd, fwd)):
        _raises(steps[mine], ConfigMismatchError, f"it runs {theirs} while this rank runs {mine}")
    for c, expected in want.items():
        assert torch.equal(comm.all_to_all(x, codec=c), expected)
    assert torch.equal(comm.all_to_all(x, codec=int4, algorithm="flat"), want[int4])
    comm.close()


def test_hierarchical_codec_switch_gloo_4():
    spawn(_hierarchical, 4, timeout=300)


def _hierarchical_all_reduce(rank, world):
    x = make_input(rank, 1500, (), torch.float32, 7)
    mine = 1000 if rank == 3 else 1500
    # the process's first hierarchical call, gated on rank 3 only (its sum over gloo meets
    # the others' first stage): every rank raises
    fresh = mf.Communicator(gate=SizeGate({}, all_reduce={"cpu": {"*": 4000}}), topology=2)
    msg = _raises(lambda: fresh.all_reduce(x[:mine].clone(), algorithm="hierarchical"),
                  ConfigMismatchError)
    assert ("it reduces 1500 values; this rank reduces 1000" in msg if rank == 3
            else "rank 3: it reduces 1000 values; this rank reduces 1500" in msg), msg
    # an empty tensor on rank 3 (its sum takes the backend's path): named as the numel, not
    # only as another operation
    msg = _raises(lambda: fresh.all_reduce(x[:0 if rank == 3 else 1500].clone(),
                                           algorithm="hierarchical"), ConfigMismatchError)
    assert ("it reduces 1500 values; this rank reduces 0" in msg if rank == 3
            else "rank 3: it reduces 0 values; this rank reduces 1500" in msg), msg
    fresh.close()
    comm = mf.Communicator(gate=False, topology=2)
    for numel in (1000, 1500):  # (both pad to the same rows)
        comm.all_reduce(x[:numel].clone(), algorithm="hierarchical")
    # rank 3 only: every rank sees it in stage 1 (on the whole group over gloo)
    msg = _raises(lambda: comm.all_reduce(x[:mine].clone(), algorithm="hierarchical"),
                  ConfigMismatchError, "hierarchical all-reduce stage")
    assert ("reduces 1500 values; this rank reduces 1000" in msg if rank == 3 else
            "rank 3: it reduces 1000 values; this rank reduces 1500" in msg), msg
    got = comm.all_reduce(x.clone(), algorithm="hierarchical")
    inputs = [make_input(r, 1500, (), torch.float32, 7) for r in range(world)]
    assert torch.equal(got, reference_all_reduce(inputs, local_size=2))
    comm.close()


def test_hierarchical_all_reduce_numel_disagrees_gloo_4():
    spawn(_hierarchical_all_reduce, 4, timeout=300)


def _bad_arguments(rank, world):
    comm = mf.Communicator(gate=False)
    x = make_input(rank, 4 * world, (64,), torch.float32, 8)
    expected = comm.all_to_all(x)
    # rank 2's split sizes do not add up to its rows: it raises its ValueError, and the ranks
    # waiting for it in the exchange raise at once (not after the timeout)
    if rank == 2:
        _raises(lambda: comm.all_to_all(x, [4] * world, [5] * world), ValueError, "")
    else:
        _raises(lambda: comm.all_to_all(x), ConfigMismatchError,
                "rank 2: it rejected its all_to_all")
    assert torch.equal(comm.all_to_all(x), expected)
    # the same for an all-reduce, first at a configuration's first use, then a known one
    y = make_input(rank, 3000, (), torch.float32, 12)
    for codec in (8, 4):
        if codec == 4:
            want = comm.all_reduce(y.clone(), codec=4)  # (known to every rank from here)
        if rank == 2:
            _raises(lambda: comm.all_reduce(y.clone(), codec=codec, op="max"), ValueError,
                    "op must be one of ('sum',)")
        else:
            _raises(lambda: comm.all_reduce(y.clone(), codec=codec), ConfigMismatchError,
                    "rank 2: it rejected its all_reduce reduce-scatter")
    assert torch.equal(comm.all_reduce(y.clone(), codec=4), want)
    # and for a hierarchical all-to-all (its first step is on the whole group over gloo)
    hier = mf.Communicator(gate=False, topology=1, algorithm="hierarchical")
    got = hier.all_to_all(x)
    if rank == 2:
        _raises(lambda: hier.all_to_all(x, [4] * world, [5] * world), ValueError, "")
    else:
        _raises(lambda: hier.all_to_all(x), ConfigMismatchError, "rank 2: it rejected")
    assert torch.equal(hier.all_to_all(x), got)
    hier.close()
    comm.close()


def test_bad_arguments_on_one_rank_gloo_3():
    spawn(_bad_arguments, 3, timeout=240)
