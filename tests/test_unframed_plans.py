"""The exchange plans NCCL runs (comm/exchange.py without a Framing: segments merged across
neighbouring peers of one wire, pipelined chunks, the direct decode, the plain all_to_all_single
of raw rows), driven on CPU over gloo, which moves the same byte splits. Between GPUs this
path needs two of them; here every CI run checks its bits against the reference codec."""
from __future__ import annotations

import dataclasses

import torch

import moe_flashcomm as mf
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
                    plan_key = len(route.plans)
                    got = exchange(x, tuple(S[rank]), out_rows, route, chunks=chunks,
                                   uniform=kind == "even").wait()
                    want = expected(rank, world, S, (hidden,), dtype, seed, link)
                    assert got.dtype == dtype and got.shape == want.shape, (codec, kind, hidden)
                    assert torch.equal(got, want), (codec, dtype, kind, hidden, chunks)
                    plan, = list(route.plans.values())[plan_key:plan_key + 1] or [None]
                    assert plan is None or plan.framed is None  # (the unframed path ran)
    comm.close()


def test_unframed_plans_gloo_3():
    spawn(_plans, 3, timeout=300)
