"""Edges of the public DeepSpeed API (enable_deepspeed / disable_deepspeed / exchange_stats)
on real DeepSpeed MoE layers over real gloo groups: each check here failed before its fix.

CPU only (gloo, 2 ranks), one spawn: the machine running CI has 2 cores.
"""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist

import pytest

pytest.importorskip("deepspeed")

import moe_flashcomm as mf  # noqa: E402
from tests.distributed import spawn  # noqa: E402
from tests.test_deepspeed import (H, PASS, assert_identical, init_deepspeed,  # noqa: E402
                                  make_moe, run, shared_groups, tokens)


def _state(moe):
    (state,) = [vars(m)["_moe_flashcomm"] for m in moe.modules() if "_moe_flashcomm" in vars(m)]
    return state


def check_enable_again_between_forward_and_backward(tag: str) -> None:
    """``enable_deepspeed`` called again ("updates the configs, the counters continue") while
    the graph of an earlier forward is alive: that forward's backward still runs, through the
    codecs it was made with, and the layer keeps its communicator (a new one for every call
    closed the old one, so the backward raised CommunicatorClosedError, "make a new one for
    the group", which no DeepSpeed user made)."""
    ep = dist.get_world_size()
    moe = make_moe(2 * ep, ep, 2, True, seed=3)
    x = tokens((2, 8, H), seed=10 + dist.get_rank())
    ref = run(moe, x)
    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
    comm = _state(moe).comm
    for again in (PASS, {**PASS, "dispatch": 8}):  # (CPU links are never size-gated)
        torch.manual_seed(7)
        moe.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_()
        y, aux, _ = moe(xg)
        mf.enable_deepspeed(moe, again)  # between the forward and its backward
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        ((y.float() * w).sum() + aux).backward()  # raised CommunicatorClosedError
        assert torch.equal(y, ref[0]) and torch.equal(xg.grad, ref[1]), tag
        for n, p in moe.named_parameters():
            assert torch.equal(p.grad, ref[2][n]), (tag, n)
    # the same gate: the same communicator (every call made and checked a new one)
    assert _state(moe).comm is comm and not comm.closed, tag
    assert stats.calls == {d: 2 for d in stats.calls}, (tag, stats.calls)
    run(moe, x)  # the new config applies from the next forward
    assert stats.quantized["dispatch"] == 1 and stats.quantized["combine"] == 0, (tag, stats.quantized)
    mf.enable_deepspeed(moe, {**PASS, "gate": False})  # another gate: a new communicator
    assert _state(moe).comm is not comm and comm.closed, tag
    # disabled between a forward and its backward: the error says what closed it
    y, aux, _ = moe(x.detach().clone().requires_grad_())
    mf.disable_deepspeed(moe)
    with pytest.raises(mf.comm.CommunicatorClosedError, match="disable_deepspeed closes"):
        (y.float().sum() + aux).backward()


def check_disabling_a_copy_keeps_the_default_communicator(tag: str) -> None:
    """A copy of an enabled layer runs on its group's default communicator, which the whole
    process shares (``mf.all_to_all`` on that group, other copies): disabling the copy leaves
    it open (it was closed under every other user)."""
    ep = dist.get_world_size()
    moe = make_moe(2 * ep, ep, 2, True, seed=4)
    x = tokens((2, 8, H), seed=20 + dist.get_rank())
    mf.enable_deepspeed(moe, PASS)
    twin = copy.deepcopy(moe, shared_groups(moe))  # (before a forward: its l_aux does not copy)
    want = run(moe, x)
    assert_identical(want, run(twin, x), tag)
    shared = _state(twin).comm
    assert shared is not None and shared is not _state(moe).comm, tag
    mf.disable_deepspeed(twin)
    assert not shared.closed, tag
    mf.disable_deepspeed(moe)


def check_agreement_compares_what_is_used(tag: str) -> None:
    """Ranks need not agree on fields a layer never uses: the codecs of a layer every rank
    disables, or ``all_reduce`` where no tensor-parallel layer exists (agreed per
    tensor-parallel group by the all-reduce hooks). Both raised ConfigMismatchError."""
    ep = dist.get_world_size()
    moe = make_moe(2 * ep, ep, 2, True, seed=5)
    x = tokens((2, 8, H), seed=30 + dist.get_rank())
    ref = run(moe, x)
    mine = 4 if dist.get_rank() == 0 else 8
    assert mf.enable_deepspeed(moe, {"dispatch": mine, "layers": [{"match": "*",
                                                                   "enabled": False}]}) == {}
    assert_identical(ref, run(moe, x), tag)
    stats = mf.enable_deepspeed(moe, {**PASS, "all_reduce": mine})
    assert list(stats) == ["deepspeed_moe"], tag
    assert_identical(ref, run(moe, x), tag)
    mf.disable_deepspeed(moe)


def check_a_rank_that_never_calls_is_named(tag: str) -> None:
    """A rank that does not call ``enable_deepspeed`` when the others do is named by them
    after MOE_FLASHCOMM_TIMEOUT_S, and when it calls later it learns that at once, instead of
    waiting alone; the next call on every rank then agrees. Before, the others waited in the
    agreement's collective until the process group's timeout, and no rank was named."""
    ep = dist.get_world_size()
    moe = make_moe(2 * ep, ep, 2, True, seed=6)
    x = tokens((2, 8, H), seed=40 + dist.get_rank())
    ref = run(moe, x)
    os.environ["MOE_FLASHCOMM_TIMEOUT_S"] = "3"
    try:
        start = time.monotonic()
        if dist.get_rank() == 1:
            time.sleep(5)  # the others give up meanwhile: this rank finds that out at once
            with pytest.raises(mf.comm.PeerTimeoutError, match="not within 3 s of each other"):
                mf.enable_deepspeed(moe, PASS)
            assert time.monotonic() - start < 5 + 2, tag
        else:
            with pytest.raises(mf.comm.PeerTimeoutError,
                               match=r"ranks \[1\] did not call it within 3 s"):
                mf.enable_deepspeed(moe, PASS)
            assert 3 <= time.monotonic() - start < 10, tag
        assert_identical(ref, run(moe, x), tag)  # nothing was enabled
    finally:
        del os.environ["MOE_FLASHCOMM_TIMEOUT_S"]
    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]  # in step again
    assert_identical(ref, run(moe, x), tag)
    assert stats.calls == {d: 1 for d in stats.calls}, (tag, stats.calls)
    mf.disable_deepspeed(moe)


def _world2(rank: int, world: int) -> None:
    init_deepspeed()
    tag = f"rank {rank}/{world}"
    check_enable_again_between_forward_and_backward(tag)
    check_disabling_a_copy_keeps_the_default_communicator(tag)
    check_agreement_compares_what_is_used(tag)
    check_a_rank_that_never_calls_is_named(tag)


def test_api_edges_gloo_2_ranks():
    spawn(_world2, 2, timeout=600)
