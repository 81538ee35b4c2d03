"""The exchange plans NCCL runs (comm/exchange.py without a Framing: segments merged across
neighbouring peers of one wire, pipelined chunks, the direct decode, the plain all_to_all_single
of raw rows), the flat all-reduce NCCL runs (comm/all_reduce.py ``_flat``: pipelined ranges,
the two-rank all-gather), the hierarchical all-to-all and all-reduce on unframed stage
groups, and the autograd calls that stand in for a plain all_to_all_single (``_Fast``),
driven on CPU over gloo, which moves the same bytes. Between GPUs these paths need
two of them; here every CI run checks their bits against the reference."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm.comm import all_reduce as A
from moe_flashcomm.comm.exchange import exchange
from moe_flashcomm.comm.topology import LinkCodecs
from tests.a2a_cases import expected, make_input, split_matrix
from tests.distributed import spawn


def _plain(comm: mf.Communicator, codec) -> tuple:
    """(the route NCCL would take for ``codec``, the codec of each pair as a function of the
    peer) on ``comm``'s gloo group: the framed route without its Framing."""
    codecs = LinkCodecs.coerce(codec, "codec")
    route = dataclasses.replace(comm.route(codecs, "cpu"), framing=None, plans={})
    return route, lambda p: route.codecs[p]


def _plans(rank, world):
    comm = mf.Communicator(gate=False, topology=2)  # ranks {0, 1} and {2} on two "nodes"
    seed = 0
    for codec, dtype in ((4, torch.float32), (3, torch.bfloat16), ("fp8", torch.float16),
                         ("bf16", torch.float32),   # rounded to bf16: records, not raw rows
                         ("bf16", torch.bfloat16),  # raw rows: one all_to_all_single
                         ("native", torch.float32),
                         ({"intra_node": "bf16", "inter_node": 4}, torch.float32),
                         ({"intra_node": "native", "inter_node": 2}, torch.bfloat16)):
        route, link = _plain(comm, codec)
        for kind in ("even", "uneven", "zeros", "empty"):
            for hidden in (64, 100):  # (100: rows not whole 16-byte vectors)
                for chunks in (1, 2, 3):
                    seed += 1
                    S = split_matrix(world, kind, seed)
                    x = make_input(rank, sum(S[rank]), (hidden,), dtype, seed)
                    out_rows = tuple(S[p][rank] for p in range(world))
                    got = exchange(x, tuple(S[rank]), out_rows, route, chunks=chunks,
                                   uniform=kind == "even").wait()
                    want = expected(rank, world, S, (hidden,), dtype, seed, link)
                    assert got.dtype == dtype and got.shape == want.shape, (codec, kind, hidden)
                    assert torch.equal(got, want), (codec, dtype, kind, hidden, chunks)
        # (every call took the unframed path: each plan the route made is one)
        assert route.plans and all(p.framed is None for p in route.plans.values()), codec
    comm.close()


def test_unframed_plans_gloo_3():
    spawn(_plans, 3, timeout=300)


def _all_reduce(rank, world):
    comm = mf.Communicator(gate=False)
    for codec in (4, 8, "fp8", 2):
        for dtype in (torch.float32, torch.bfloat16):
            for n in (1000, 3 * 1024 + 7, 9000):  # (padded to whole rows of every rank)
                for chunks in (1, 2, 3):
                    inputs = [make_input(p, n, (), dtype, n + chunks) for p in range(world)]
                    buf = A._padded(inputs[rank].clone(), world)
                    plan = A._make_plan(comm, inputs[rank], LinkCodecs.coerce(codec, "codec"),
                                        "flat", chunks)
                    A._flat(buf, plan, comm.group)
                    want = A.reference_all_reduce(inputs, codec)
                    assert torch.equal(buf[:n], want), (codec, dtype, n, chunks)
    # "hierarchical" on one node runs the flat algorithm, a pair's all-gather included
    plan = A._make_plan(comm, torch.ones(4096), LinkCodecs.coerce(4, "codec"), "hierarchical",
                        None)
    assert not plan.hierarchical
    assert plan.pair_gather == (world == 2 and os.environ.get("MOE_FLASHCOMM_AR_PAIR_GATHER") != "0")
    comm.close()


def test_unframed_all_reduce_gloo_3():
    spawn(_all_reduce, 3, timeout=300)


def test_unframed_all_reduce_pair_gather_gloo_2():
    """Two ranks: the reduce-scatter's exchange as an all-gather (the default), and as an
    all_to_all_single."""
    spawn(_all_reduce, 2, timeout=300)
    spawn(_all_reduce, 2, timeout=300, env=dict(MOE_FLASHCOMM_AR_PAIR_GATHER="0"))


def _hierarchical(rank, world):
    comm = mf.Communicator(gate=False, topology=2)  # 2 "nodes" of 2 ranks
    comm.framing = None  # before any route or stage is made: the stages NCCL would run
    link = {"intra_node": "bf16", "inter_node": 4}
    codecs = LinkCodecs.coerce(link, "codec")
    for kind in ("even", "uneven", "zeros"):
        for dtype in (torch.float32, torch.bfloat16):
            S = split_matrix(world, kind, 90)
            x = make_input(rank, sum(S[rank]), (64,), dtype, 91)
            got = comm.all_to_all(x, [S[p][rank] for p in range(world)], S[rank], codec=link,
                                  algorithm="hierarchical")
            pair = lambda p: codecs.intra_node if p // 2 == rank // 2 else codecs.inter_node  # noqa: E731
            assert torch.equal(got, expected(rank, world, S, (64,), dtype, 91, pair)), (kind, dtype)
    inputs = [make_input(p, 5000, (), torch.float32, 92) for p in range(world)]
    got = comm.all_reduce(inputs[rank].clone(), codec={"intra_node": 8, "inter_node": 4},
                          algorithm="hierarchical")
    want = A.reference_all_reduce(inputs, {"intra_node": 8, "inter_node": 4}, local_size=2)
    assert torch.equal(got, want)
    assert comm.hierarchy_state.hierarchy.framing is None  # (the unframed stages ran)
    comm.close()


def test_unframed_hierarchical_gloo_4():
    spawn(_hierarchical, 4, timeout=300)


def _autograd(rank, world):
    """The calls that stand in for a plain all_to_all_single (raw rows: ``_Fast``, issued on
    the process group directly) and the quantized ones, through autograd, sync and async."""
    comm = mf.Communicator(gate=False)
    comm.framing = None  # before any route is made
    S = split_matrix(world, "uneven", 95)
    out_rows = [S[p][rank] for p in range(world)]
    for codec, dtype in (("bf16", torch.bfloat16), ("native", torch.float32), (4, torch.float32)):
        link = lambda p: LinkCodecs.coerce(codec, "codec").intra_node  # noqa: E731
        x = make_input(rank, sum(S[rank]), (4, 32), dtype, 96).requires_grad_()
        for async_op in (False, True):
            y = comm.all_to_all(x, out_rows, S[rank], codec=codec, grad_codec=codec,
                                async_op=async_op)
            y = y.wait() if async_op else y
            assert torch.equal(y, expected(rank, world, S, (4, 32), dtype, 96, link)), codec
            gy = make_input(rank + 7, sum(out_rows), (4, 32), dtype, 97)
            (gx,) = torch.autograd.grad(y, x, gy)
            want = torch.cat([_grad_rows(rank, p, world, S, dtype, link) for p in range(world)])
            assert torch.equal(gx, want), (codec, async_op)
            # the backward differentiated again (create_graph): the forward exchange
            y = comm.all_to_all(x, out_rows, S[rank], codec=codec, grad_codec=codec)
            gy = gy.requires_grad_()
            (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
            v = make_input(rank + 9, sum(S[rank]), (4, 32), dtype, 98)
            (ggy,) = torch.autograd.grad(gx, gy, v)
            assert torch.equal(gx, want) and torch.equal(
                ggy, comm.all_to_all(v, out_rows, S[rank], codec=codec)), (codec, async_op)
    fast = [c for c in comm._plans.values() if c.fast_fwd is not None and c.grad]
    assert len(fast) == 2  # raw rows ("bf16" of bf16 tokens, "native"): the direct calls ran
    # rejected arguments raise their own error (no rejected frame to send, as over NCCL)
    with pytest.raises(ValueError, match="bits"):
        comm.all_to_all(x, out_rows, S[rank], codec=9)
    with pytest.raises(ValueError, match="bits"):
        comm.all_reduce(torch.ones(8), codec=1)
    counts = torch.arange(2 * world, dtype=torch.int64) + 10 * rank
    assert comm.exchange_counts(counts).tolist() == [
        10 * p + 2 * rank + i for p in range(world) for i in range(2)]
    comm.close()


def _grad_rows(rank, p, world, S, dtype, link):
    """The rows of this rank's input gradient that came back from group rank ``p``: what
    ``p`` received from this rank, its gradient rows through the pair's codec."""
    from tests.a2a_cases import roundtrip
    gp = make_input(p + 7, sum(S[q][p] for q in range(world)), (4, 32), dtype, 97)
    off = sum(S[q][p] for q in range(rank))
    rows = gp[off:off + S[rank][p]]
    return rows if p == rank else roundtrip(rows, link(p))


def test_unframed_autograd_gloo_3():
    spawn(_autograd, 3, timeout=300)


def test_stamped_segments_layout():
    """CUDA's layout (exchange.StampedCall): each pair's records follow a stamp of 16 bytes,
    so byte splits grow by it, records stay 16-byte aligned and neighbouring peers' records
    are not merged into one segment; raw pairs and a rank's own rows carry none."""
    from moe_flashcomm.codec import record_bytes
    from moe_flashcomm.comm.exchange import RAW, _segments
    from moe_flashcomm.comm.plan import offsets
    H, dtype, int4 = 256, torch.bfloat16, mf.CodecConfig(bits=4)
    rb, S = record_bytes(H, int4), 16
    counts, wires = [2, 3, 4, 0, 1], [int4, None, int4, int4, RAW]
    segs, splits = _segments(offsets(counts), counts, wires, 0, 1, H, dtype, stamped=True)
    assert splits == [S + 2 * rb, 0, S + 4 * rb, 0, 2 * H]
    assert [(s.peer, s.row, s.rows, s.byte, s.nbytes) for s in segs] == [
        (0, 0, 2, S, 2 * rb), (2, 5, 4, 2 * S + 2 * rb, 4 * rb), (4, 9, 1, 2 * S + 6 * rb, 2 * H)]
    # unstamped (gloo's frames carry headers instead): neighbours on one wire merge
    counts, wires = [2, 4], [int4, int4]
    segs, splits = _segments(offsets(counts), counts, wires, 0, 1, H, dtype)
    assert splits == [2 * rb, 4 * rb] and [(s.rows, s.byte) for s in segs] == [(6, 0)]
    segs, splits = _segments(offsets(counts), counts, wires, 0, 1, H, dtype, stamped=True)
    assert splits == [S + 2 * rb, S + 4 * rb] and [(s.rows, s.byte) for s in segs] == \
        [(2, S), (4, 2 * S + 2 * rb)]
    # pipelined chunks: every chunk's piece of a pair has its own stamp
    segs, splits = _segments(offsets([5]), [5], [int4], 1, 2, H, dtype, stamped=True)
    assert splits == [S + 3 * rb] and (segs[0].row, segs[0].rows) == (2, 3)


def test_stamped_call_tasks(monkeypatch):
    """The launches exchange.StampedCall prepares (their kernels run in
    tests/test_stamped_gpu.py; here the launch is recorded instead of compiled): per side one
    launch of p2p_exchange's LOCAL variant for every 16 peers of a codec, each task's records
    at its segment's byte, behind the slot of its stamp, with the pair's stamp in the args."""
    from moe_flashcomm import kernels as K
    from moe_flashcomm.comm import exchange as X, p2p
    made = []
    monkeypatch.setattr(K, "exchange_launch", lambda dev, name, enc, dec, table, args, blocks:
                        made.append((name, table[0].copy(), args[0].copy(), blocks)) or name)

    class Page:
        address = 0x1234000

    H, dtype, int4, world, rank = 512, torch.bfloat16, mf.CodecConfig(bits=4), 20, 3
    route = X.Route(None, rank, world, (int4,) * world, (0,) * world, pages={})
    rows = tuple(1 + p % 3 for p in range(world))
    plan = X.make_plan(route, rows, rows, H, dtype, 1)
    call = X.StampedCall(route, plan.sides(), H, dtype, 0, Page())
    (send, recv), = call.chunks
    assert len(send[0]) == len(recv[0]) == 2 and not send[1] and not recv[1]  # 16 + 3 peers
    assert all(name.endswith(", true>") for name, *_ in made)
    send_segs, _, recv_segs, _ = plan.chunks[0]
    for side, segs, launches in (("send", send_segs, made[:2]), ("recv", recv_segs, made[2:])):
        tasks = [t for _, table, _, _ in launches for t in table["task"][:int(table["tasks"])]]
        assert [(int(t["peer"]), int(t["remote"]), int(t["offset"])) for t in tasks] == \
            [(s.peer, s.byte, s.row * H * 2) for s in segs]
        assert all(s.byte % 16 == 0 and s.byte >= K.STAMP_BYTES for s in segs)
        stamps = [int(w) for _, _, args, _ in launches for w in args[f"{side}_stamp"] if w]
        assert stamps == [p2p.stamp(int4, s.rows, H, dtype) for s in segs]
        assert all(int(args["error_page"]) == Page.address for _, _, args, _ in launches)
    assert {int(t["sends"]) for _, t, _, _ in made} == {16, 3, 0}
