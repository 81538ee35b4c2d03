"""Edge cases of the public all-to-all API over real gloo process groups (CPU).

Each test is a regression test for a bug found by probing ``moe_flashcomm.all_to_all`` /
``Communicator.all_to_all`` against ``torch.distributed.all_to_all_single`` done by hand
(and the reference codec per peer for integer codecs). Every spawn has a hard time limit.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings

import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.comm import ConfigMismatchError, PeerTimeoutError
from moe_flashcomm.comm.frame import FRAME_BYTES
from tests.a2a_cases import expected, make_input
from tests.distributed import free_port, spawn
from tests.test_agreement import _raises  # (within LIMIT_S, naming what it must)


def _huge_output_split_sizes(rank, world):
    """Output split sizes on one rank that no buffer can hold (garbage counts, e.g. from an
    uninitialised tensor): that rank raises an error naming them, its peer raises at once
    (it used to wait for the timeout, or pair with the bad rank's next call), and both stay
    in step: the next call is right on both (the bad rank used to count an exchange it
    never made, so every later call raised "skipped or repeated a call")."""
    comm = mf.Communicator(gate=False)
    S = [[3, 3], [3, 3]]
    x = make_input(rank, 6, (8,), torch.float32, 1)
    want = expected(rank, world, S, (8,), torch.float32, 1, lambda p: mf.CodecConfig(bits=4))
    assert torch.equal(comm.all_to_all(x, [3, 3], [3, 3], codec=4), want)
    # 2**62 rows: more bytes than an int64 counts (was OverflowError: "Python int too large
    # to convert to C long"); 10**16 rows: more than any address space (was the allocator's
    # error, and the exchange numbers out of step)
    for huge in (2 ** 62, 10 ** 16):
        if rank == 0:
            _raises(lambda: comm.all_to_all(x, [3, huge], [3, 3], codec=4), RuntimeError,
                    "cannot allocate", "output_split_sizes", f"{3 + huge} rows")
        else:
            _raises(lambda: comm.all_to_all(x, [3, 3], [3, 3], codec=4), ConfigMismatchError,
                    "rank 0: it rejected its all_to_all")
        assert torch.equal(comm.all_to_all(x, [3, 3], [3, 3], codec=4), want), huge
    comm.close()


def test_output_split_sizes_no_buffer_holds_raise_on_every_rank_gloo_2():
    spawn(_huge_output_split_sizes, 2, timeout=120, env={"MOE_FLASHCOMM_TIMEOUT_S": 30})


def _iterator_split_sizes(rank, world):
    """Split sizes given as iterators (a generator, ``iter(list)``; the check takes any
    iterable) route as the same lists do, also at a call's first use: the plan cache's key
    used to consume them, so the check saw none ("must have one entry per rank of the group
    (2), got 0: []") while the same call with a cached plan passed."""
    comm = mf.Communicator(gate=False)
    S = [[2, 3], [0, 4]]
    in_s, out_s = S[rank], [S[p][rank] for p in range(world)]
    for codec, dtype in (("native", torch.float32), (5, torch.bfloat16)):
        x = make_input(rank, sum(in_s), (16,), dtype, 2)
        want = expected(rank, world, S, (16,), dtype, 2, lambda p: mf.CodecConfig.coerce(codec))
        if codec == "native":  # exactly all_to_all_single's result
            ref = x.new_empty((sum(out_s), 16))
            dist.all_to_all_single(ref, x, out_s, in_s)
            assert torch.equal(want, ref)
        for _ in range(2):  # the first use, then with the call's plan cached
            got = comm.all_to_all(x, iter(out_s), (n for n in in_s), codec=codec)
            assert torch.equal(got, want), codec
    comm.close()


def test_iterator_split_sizes_route_as_lists_gloo_2():
    spawn(_iterator_split_sizes, 2, timeout=120)


def _bad_gate_on_one_rank(rank, world):
    """A gate dict (or topology) the default communicator cannot take, on one rank only:
    every rank raises at once and the next call is right on all. The bad rank raised while
    keying the default communicators, before any exchange: a peer that had its communicator
    cached went on with the exchange, paired with the bad rank's next call and returned."""
    x = make_input(rank, 4 * world, (8,), torch.float32, 2)
    want = torch.empty_like(x)  # "native" is all_to_all_single's result, exactly
    dist.all_to_all_single(want, x)
    assert torch.equal(mf.all_to_all(x, codec="native"), want)  # warm: the communicator cached
    for bad in ({"all_reduce": {"tpu": {"int4": 1}}}, {"thresholds": {"cpu": {"int4": -1}}}):
        if rank == 1:
            _raises(lambda: mf.all_to_all(x, codec="native", gate=bad), ValueError, "tpu"
                    if "all_reduce" in bad else "-1")
        else:
            _raises(lambda: mf.all_to_all(x, codec="native"), ConfigMismatchError, "rank 1")
        assert torch.equal(mf.all_to_all(x, codec="native"), want)
    # a valid topology new to one rank: its new communicator's first-use check meets the
    # peer's cached one; both raise, and count the exchange alike (the next call raised
    # "skipped or repeated a call": each communicator had counted on its own)
    _raises(lambda: mf.all_to_all(x, codec="native", topology=1 if rank == 1 else None),
            ConfigMismatchError, "consistency check")
    assert torch.equal(mf.all_to_all(x, codec="native"), want)


def test_bad_gate_or_new_topology_on_one_rank_raises_on_every_rank_gloo_2():
    spawn(_bad_gate_on_one_rank, 2, timeout=120)


def _hierarchical_huge_output_split_sizes(rank, world):
    """The hierarchical all-to-all (2 nodes x 2 ranks), output split sizes on one rank that
    no buffer can hold: every rank raises at once and the next call is right on all. The bad
    rank found the disagreement in stage 1, then sized the headers-only stage 2 it owes its
    peers by its own (bad) sizes: the allocation failed, stage 2 was never sent and its
    inter-node peer waited for the timeout, the ranks out of step from then on."""
    comm = mf.Communicator(gate=False, timeout=5)
    x = make_input(rank, 2 * world, (8,), torch.float32, 1)
    S = [2] * world
    want = comm.all_to_all(x, S, S, codec=4, algorithm="hierarchical")
    for huge in (2 ** 62, 10 ** 16):
        out_s = [2, huge] + [2] * (world - 2) if rank == 0 else S
        _raises(lambda: comm.all_to_all(x, out_s, S, codec=4, algorithm="hierarchical"),
                ConfigMismatchError, "hierarchical stage")
        assert torch.equal(comm.all_to_all(x, S, S, codec=4, algorithm="hierarchical"), want)
    comm.close()


def test_hierarchical_huge_output_split_sizes_raise_on_every_rank_gloo_4():
    spawn(_hierarchical_huge_output_split_sizes, 4, env={"LOCAL_WORLD_SIZE": 2}, timeout=120)


def _async_waited_in_another_order(rank, world):
    """Two asynchronous calls whose payloads exceed a frame (the rest of a long message
    moves when the call is waited for), waited for in opposite orders on the two ranks:
    both return their exchanges' rows (each rank's second rest waited for the other's first:
    both waited until the timeout and the group was lost). A call never waited for is
    completed by the next one waited for, as its peers need."""
    comm = mf.Communicator(gate=False, timeout=10)
    rows = 2 * (FRAME_BYTES // (1024 * 2)) + 8  # bf16 rows of 1024: over 4 MiB per peer
    xs = [make_input(rank, 2 * rows, (1024,), torch.bfloat16, 40 + i) for i in range(3)]
    want = [comm.all_to_all(x, codec="native") for x in xs]
    handles = [comm.all_to_all(x, codec="native", async_op=True) for x in xs[:2]]
    for i in ((0, 1) if rank == 0 else (1, 0)):
        assert torch.equal(handles[i].wait(), want[i]), i
    dropped = comm.all_to_all(xs[0], codec="native", async_op=True)  # never waited for
    assert torch.equal(comm.all_to_all(xs[2], codec="native"), want[2])
    assert torch.equal(dropped.wait(), want[0])
    # the same with the two calls on two communicators of the group (the order of their
    # frames is the group's: each communicator kept its own, and both ranks waited until
    # the timeout, and the group was lost)
    other = mf.Communicator(gate=False, timeout=10)
    handles = [c.all_to_all(x, codec="native", async_op=True) for c, x in zip((comm, other), xs)]
    for i in ((0, 1) if rank == 0 else (1, 0)):
        assert torch.equal(handles[i].wait(), want[i]), i
    assert torch.equal(other.all_to_all(xs[2], codec="native"), want[2])
    comm.close()
    other.close()


def test_async_calls_waited_in_another_order_gloo_2():
    spawn(_async_waited_in_another_order, 2, timeout=120)


def _dropped_handle_warns(rank, world):
    """A handle dropped without wait() drops its exchange's checks: a warning says so (a
    waited one says nothing), and the group goes on."""
    comm = mf.Communicator(gate=False, timeout=10)
    xs = [make_input(rank, 16, (64,), torch.float32, 50 + i) for i in range(2)]
    want = [comm.all_to_all(x, codec=4) for x in xs]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(comm.all_to_all(xs[0], codec=4, async_op=True).wait(), want[0])
        assert not seen, [str(w.message) for w in seen]
        comm.all_to_all(xs[0], codec=4, async_op=True)  # dropped at once
        assert [w.category for w in seen] == [RuntimeWarning], [str(w.message) for w in seen]
        assert "handle (async_op=True) was dropped without wait()" in str(seen[0].message)
        assert torch.equal(comm.all_to_all(xs[1], codec=4), want[1])
    comm.close()


def test_a_dropped_handle_warns_gloo_2():
    spawn(_dropped_handle_warns, 2, timeout=120)


def test_split_sizes_of_a_type_that_is_no_list_are_named():
    """A dict (or set, or string) of the right length passed as split sizes: its keys were
    taken as the sizes (a dict of {rank: rows}), or the error was about a size."""
    from moe_flashcomm.comm.plan import check_splits
    for bad in ({0: 3, 1: 5}, {3, 5}, "35"):
        try:
            check_splits("input_split_sizes", bad, 2)
        except TypeError as e:
            assert str(e).startswith("input_split_sizes must be a list of ints (one per rank of "
                                     f"the group) or None, got {type(bad).__name__}"), e
        else:
            raise AssertionError(f"{bad!r} taken as split sizes")
    assert check_splits("x", (3, 5), 2) == check_splits("x", torch.tensor([3, 5]), 2) == [3, 5]
    # nor do they key a plan: a dict's keys would find the plan of the sizes [0, 1]
    from moe_flashcomm.comm.autograd import split_key
    for bad in ({0: 3, 1: 5}, {0, 1}, "01"):
        try:
            split_key(bad)
        except TypeError:
            continue
        raise AssertionError(f"{bad!r} keyed a plan")
    # tensors the check refuses key no plan either: a complex one's key equals the ints'
    for dtype in (torch.complex64, torch.float32, torch.bool):
        bad = torch.tensor([1, 1], dtype=dtype)
        try:
            check_splits("input_split_sizes", bad, 2)
        except ValueError as e:
            assert "must be a 1-D integer tensor or a list of ints" in str(e), e
        else:
            raise AssertionError(f"a {dtype} tensor taken as split sizes")
        try:
            split_key(bad)
        except TypeError:
            continue
        raise AssertionError(f"a {dtype} tensor keyed a plan")


def _closed_on_one_rank(rank, world):
    """A call that fails on one rank for any reason before its exchange, not only a
    ValueError / TypeError: a communicator closed on that rank alone (close() is local), split
    sizes whose values cannot be read (a meta tensor: NotImplementedError). The peers raise
    at once, and their next call pairs with that rank's next call: the closed rank took part
    in no exchange, so its peers' call used to pair with its next call on another
    communicator of the group, mixing the rows or sums of two calls with no error anywhere."""
    main, side = (mf.Communicator(gate=False, codec="native") for _ in range(2))
    s = [2] * world
    xa, xb = torch.full((4, 8), 100.0 + rank), torch.full((4, 8), 200.0 + rank)
    want_a, want_b = (torch.tensor([100.0, 100, 101, 101]), torch.tensor([200.0, 200, 201, 201]))
    side.all_to_all(xa, s, s)
    main.all_to_all(xb, s, s)
    ya, yb = torch.full((4,), 1.0 + rank), torch.full((4,), 100.0 + 100 * rank)
    side.all_reduce(ya.clone(), codec="native")
    main.all_reduce(yb.clone(), codec="native")
    counts = torch.arange(2 * world) + 10 * rank
    side.exchange_counts(counts)
    main.exchange_counts(counts)
    if rank == 0:
        side.close()
    calls = [("all_to_all", lambda c: c.all_to_all(xa, s, s)),
             ("all_reduce reduce-scatter", lambda c: c.all_reduce(ya.clone(), codec="native")),
             ("skip_padding counts", lambda c: c.exchange_counts(counts))]
    for op, call in calls:
        if rank == 0:
            _raises(lambda: call(side), mf.comm.CommunicatorClosedError, "was closed")
        else:
            _raises(lambda: call(side), ConfigMismatchError, f"rank 0: it rejected its {op}",
                    "its communicator was closed")
        assert torch.equal(main.all_to_all(xb, s, s)[:, 0], want_b), op
        assert torch.equal(main.all_reduce(yb.clone(), codec="native"), torch.full((4,), 300.0))
    bad = torch.empty(world, dtype=torch.int64, device="meta")  # sizes never materialised
    if rank == 0:
        _raises(lambda: main.all_to_all(xa, bad, s), NotImplementedError)
    else:
        _raises(lambda: main.all_to_all(xa, s, s), ConfigMismatchError,
                "rank 0: it rejected its all_to_all")
    assert torch.equal(main.all_to_all(xa, s, s)[:, 0], want_a)
    main.close()
    side.close()


def test_a_call_that_fails_on_one_rank_for_any_reason_raises_on_every_rank_gloo_2():
    spawn(_closed_on_one_rank, 2, timeout=120, env={"MOE_FLASHCOMM_TIMEOUT_S": 30})


def _destroyed_group(rank, world, port):
    """Communicators of a group that was destroyed. A subgroup made and destroyed again and
    again (elastic regrouping, a phase's expert group) is freed with its sockets once its user
    drops it: the library's per-group exchange count held every one of them for good. And
    every use of a destroyed group names that, on every rank, whatever this rank cached:
    - a communicator's new call (it said "'NoneType' object has no attribute
      'alltoall_base'"), and a call with a cached plan, a backward, and a handle waited for
      (they ran on the old group's sockets, also after a new init_process_group, and
      payloads past one frame raised a bare KeyError; with a late peer, a KeyError on one
      rank and a timeout on the other);
    - a thin call or a new Communicator on a destroyed subgroup (torch's "not registered",
      or our error where this rank had a cached communicator)."""
    import gc
    from moe_flashcomm.comm.communicator import PROCESS
    x = make_input(rank, 4, (8,), torch.float32, 3)
    want = torch.cat([make_input(p, 4, (8,), torch.float32, 3)[2 * rank:2 * rank + 2]
                      for p in range(world)])
    comm = mf.Communicator(gate=False, codec="native")
    assert torch.equal(comm.all_to_all(x), want)
    y = torch.ones(100)
    comm.all_reduce(y)
    for _ in range(3):
        g = dist.new_group([0, 1])
        with mf.Communicator(g, gate=False, codec="native") as sub:
            assert torch.equal(sub.all_to_all(x), want)
        assert g in PROCESS.group_lines
        dist.destroy_process_group(g)
        del g, sub
        gc.collect()
    assert list(PROCESS.group_lines.keys()) == [dist.group.WORLD]
    closed, gone = mf.comm.CommunicatorClosedError, "was destroyed"
    g = dist.new_group([0, 1])
    mf.all_to_all(x, group=g, codec="native")  # (a default communicator of g, cached)
    dist.destroy_process_group(g)
    for call in (lambda: mf.all_to_all(x, group=g, codec="native"),
                 lambda: mf.all_to_all(x, group=g, codec="native", gate=False),
                 lambda: mf.Communicator(g)):
        _raises(call, closed, gone)
    big = make_input(rank, 2 * (FRAME_BYTES // (64 * 4) + 8), (64,), torch.float32, 4)
    grad_out = comm.all_to_all(big.clone().requires_grad_(True))
    handle = comm.all_to_all(big, async_op=True)  # (past one frame: a second round)
    dist.destroy_process_group()
    gone = "the process group of this moe_flashcomm.Communicator was destroyed"
    _raises(lambda: comm.all_to_all(x[:2]), closed, gone)
    _raises(handle.wait, closed, gone, "before this all_to_all's handle was waited for")
    _raises(lambda: grad_out.sum().backward(), closed, gone, "before the backward")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    for call in (lambda: comm.all_to_all(x), lambda: comm.all_reduce(y)):  # (planned calls)
        _raises(call, closed, gone)
    assert torch.equal(mf.Communicator(gate=False, codec="native").all_to_all(x), want)


def test_communicators_of_destroyed_groups_gloo_2():
    spawn(_destroyed_group, 2, free_port(), timeout=120)


def _late_frame_of_a_destroyed_group(rank, world, port, mark):
    """Rank 0 times out in a call with payloads past one frame, destroys the group and
    leaves while rank 1 stays away: its process ends at once. A version that dropped the
    late frames of destroyed groups (so that their thread would end) freed the group with
    its exchange pending, and the process then stayed in interpreter teardown until the
    peer came back or gloo's own timeout (30 minutes by default); helper 53 found it. The
    frame stays kept, holding its group, and the thread's work ends with the process."""
    comm = mf.Communicator(gate=False, codec="native", timeout=2)
    x = make_input(rank, 2 * (FRAME_BYTES // (512 * 4) + 100), (512,), torch.float32, 5)
    comm.all_to_all(x)
    if rank == 0:
        _raises(lambda: comm.all_to_all(x), PeerTimeoutError, "nothing came from ranks [1]")
        dist.destroy_process_group()
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
        # (a group of its own, for the harness to destroy)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
        return
    deadline = time.monotonic() + 60
    while not os.path.exists(mark) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    pid, gone_by = None, time.monotonic() + 8
    while time.monotonic() < gone_by:
        with open(mark) as f:
            pid = pid or int(f.read() or 0)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):  # (ended, not reaped)
                    break
        except (FileNotFoundError, ValueError):
            break
        time.sleep(0.05)
    assert time.monotonic() < gone_by, "rank 0's process did not end"
    os._exit(0)  # (the group is left to its timeouts)


def test_a_rank_that_destroys_its_group_with_a_late_frame_exits_gloo_2(tmp_path):
    spawn(_late_frame_of_a_destroyed_group, 2, free_port(), str(tmp_path / "mark"),
          timeout=120)
