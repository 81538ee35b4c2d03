"""skip_padding: DeepSpeed's MOELayer sends only each expert's filled capacity slots, on real
DeepSpeed layers over real gloo groups (2 and 4 ranks).

* DeepSpeed 0.19.8's gates (top1 with and without random token selection, top2, top-k;
  drop_tokens on and off; random and skewed logits) fill every expert's slots from 0 upward:
  the dense dispatch mask and the sparse routes agree, and moe_flashcomm's count of slots to
  send equals the number of kept routes (no zero row is sent).
* With the bf16 codec (passthrough on bf16 / fp16 models), outputs and every gradient are
  bit-identical to stock DeepSpeed: k = 1, 2, 3, drop_tokens on and off, a random and a
  skewed gate, bf16 and fp16 (and fp32 with "native"); the counters show exactly the slots
  the routes imply, per direction, against the stock exchange's. So are a layer called twice
  in one step, eval under no_grad, and capacity 0 (no route kept).
* Ranks whose gates sized different capacities (drop_tokens with more tokens on one rank)
  all raise at once, naming the capacities; the next forward with equal ones is exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

pytest.importorskip("deepspeed")

import moe_flashcomm as mf  # noqa: E402
from moe_flashcomm.comm import ConfigMismatchError  # noqa: E402
from moe_flashcomm.integrations.padding import (CAPACITY_SHIFT, RouteCounts,  # noqa: E402
                                                filled_slots)
from tests.distributed import spawn  # noqa: E402
from tests.test_deepspeed import (H, PASS, assert_identical, device, init_deepspeed,  # noqa: E402
                                  make_moe, mlp, run, stock_runs, tokens)

DIRECTIONS = ("dispatch", "combine", "dispatch_grad", "combine_grad")
NATIVE = {d: "native" for d in DIRECTIONS}  # exact for fp32 too ("bf16" rounds fp32 tokens)


def skew(moe: nn.Module, x: torch.Tensor, strength: float = 3.0) -> torch.Tensor:
    """Make the gate prefer low-numbered experts (popularity falling like 1 / (e + 1)) for
    tokens that share a direction u: wg[e] += strength / (e + 1) * u, x += 2 u."""
    gate = moe.deepspeed_moe.gate.wg
    u = torch.zeros(H)
    u[0] = 1.0
    with torch.no_grad():
        for e in range(gate.weight.shape[0]):
            gate.weight[e] += (strength / (e + 1) * u).to(gate.weight)
    return x + (2 * u).to(x)


def kept_routes(moe: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """[E] kept routes per expert of this rank's tokens, from the layer's gate with the RNG
    as ``run`` leaves it for the forward (the gate draws first)."""
    layer = moe.deepspeed_moe
    torch.manual_seed(seed)
    with torch.no_grad():
        _, _, experts, indices, _, _, _ = layer.gate(x.reshape(-1, H), None, True, layer.use_tutel)
    idx = indices.reshape(-1).long()
    return torch.bincount(idx[idx >= 0], minlength=experts)


def expected_slots(moe: nn.Module, x: torch.Tensor) -> dict:
    """Slots each direction sends to other ranks with skip_padding, and the stock exchange's."""
    layer = moe.deepspeed_moe
    mine = kept_routes(moe, x)
    world, rank = dist.get_world_size(layer.ep_group), dist.get_rank(layer.ep_group)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=layer.ep_group)
    local = layer.num_local_experts
    send = sum(int(mine[p * local:(p + 1) * local].sum()) for p in range(world) if p != rank)
    back = sum(int(table[s][rank * local:(rank + 1) * local].sum()) for s in range(world) if s != rank)
    return {"dispatch": send, "combine": back, "dispatch_grad": back, "combine_grad": send}


# ---- the gates fill slots from 0 upward ------------------------------------------------------------
def check_gates_fill_prefixes(tag: str) -> None:
    """Every DeepSpeed gate's dense dispatch mask fills slots 0 .. n_e - 1 of each expert e,
    where n_e is the number of its kept sparse routes, and filled_slots gives n_e."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating
    experts, tokens_ = 8, 64
    for skewed in (False, True):
        g = torch.Generator().manual_seed(5 + skewed)
        logits = torch.randn(tokens_, experts, generator=g)
        if skewed:  # Zipf-like popularity
            logits += 3.0 / torch.arange(1, experts + 1)
        for drop in (True, False):
            gates = [("top1", lambda sparse, rts: top1gating(logits.clone(), 1.0, 1, None, None, drop, rts,
                                                            None, sparse)),
                     ("top2", lambda sparse, rts: top2gating(logits.clone(), 1.0, 1, drop, None, True, sparse)),
                     ("top3", lambda sparse, rts: topkgating(logits.clone(), 3, 1.0, 1, drop, None,
                                                             sparse_routes=sparse))]
            for policy in ("probs", "position") if drop else ():
                gates.append((f"top3 {policy}", lambda sparse, rts, p=policy: topkgating(
                    logits.clone(), 3, 1.0, 1, drop, None, drop_policy=p, sparse_routes=sparse)))
            for name, gate in gates:
                for rts in ((True, False) if name == "top1" else (True,)):
                    torch.manual_seed(11)
                    _, capacity, _, indices, locations, _, _ = gate(True, rts)
                    torch.manual_seed(11)
                    _, _, mask, _ = gate(False, rts)
                    what = f"{tag} {name} drop={drop} rts={rts} skewed={skewed}"
                    idx = indices.reshape(-1).long()
                    kept = torch.bincount(idx[idx >= 0], minlength=experts)
                    assert torch.equal(filled_slots(indices, locations, experts), kept), what
                    used = mask.any(0)  # [E, C]: slots some token occupies
                    prefix = torch.arange(int(capacity)) < kept[:, None]
                    assert torch.equal(used, prefix), what


# ---- bit-identical to stock, counters ------------------------------------------------------------
def check_identical(tag: str, cases) -> None:
    ep, rank = dist.get_world_size(), dist.get_rank()
    for k, drop, dtype, skewed in cases:
        what = f"{tag} k={k} drop={drop} {dtype} skewed={skewed}"
        moe = make_moe(2 * ep, ep, k, drop, dtype=dtype, seed=60 + k)
        x = tokens((2, 24, H), seed=300 + rank, dtype=dtype)
        if skewed:
            x = skew(moe, x)
        ref, noise = stock_runs(moe, x)
        want = expected_slots(moe, x)
        codec = NATIVE if dtype == torch.float32 else PASS
        stats = mf.enable_deepspeed(moe, codec)["deepspeed_moe"]
        assert_identical(ref, run(moe, x), what, noise)
        stock = (ep - 1) * moe.deepspeed_moe.num_local_experts * _capacity(moe, x)
        for d in DIRECTIONS:
            assert stats.calls[d] == 1, (what, d, stats.calls)
            assert stats.slots_sent[d] == want[d], (what, d, stats.slots_sent, want)
            assert stats.slots_stock[d] == stock, (what, d, stats.slots_stock, stock)
            assert stats.bytes_sent[d]["intra_node"] == want[d] * H * dtype.itemsize, (what, d)
        if skewed:
            assert stats.slot_share() < 0.9, (what, stats.slot_share())
        # off: the padded exchange, identical too
        mf.enable_deepspeed(moe, {**codec, "skip_padding": False})
        stats.reset()
        assert_identical(ref, run(moe, x), f"{what} skip_padding off", noise)
        assert stats.slots_sent == stats.slots_stock and stats.slots_sent["dispatch"] == stock
        mf.disable_deepspeed(moe)


def _capacity(moe: nn.Module, x: torch.Tensor) -> int:
    """C of the stock exchange: its [E, C, M] tensor's second dimension, as DeepSpeed's gate
    sets it for this input (same RNG as ``run``)."""
    layer = moe.deepspeed_moe
    torch.manual_seed(7)
    with torch.no_grad():
        return int(layer.gate(x.reshape(-1, H), None, True, layer.use_tutel)[1])


def check_rules_and_quantized(tag: str) -> None:
    """A per-layer rule turns skip_padding off for one layer; int8 with skip_padding equals
    int8 without it (the same rows quantized: groups are per row), forward and backward."""
    ep, rank = dist.get_world_size(), dist.get_rank()
    moe = make_moe(2 * ep, ep, 2, False, dtype=torch.float32, seed=70)
    x = skew(moe, tokens((2, 24, H), seed=400 + rank, dtype=torch.float32))
    int8 = {"dispatch": 8, "combine": 8, "gate": False}
    stats = mf.enable_deepspeed(moe, {**int8, "layers": [{"index": 0, "skip_padding": False}]})
    padded, noise = run(moe, x), run(moe, x)  # (CUDA: DeepSpeed's backward has atomics)
    assert stats["deepspeed_moe"].slot_share() == 1.0
    mf.enable_deepspeed(moe, int8)
    stats["deepspeed_moe"].reset()
    assert_identical(padded, run(moe, x), f"{tag} int8 with and without skip_padding", noise)
    share = stats["deepspeed_moe"].slot_share()
    assert share < 0.8, share
    assert stats["deepspeed_moe"].quantized_exchanges == 4  # int8 forward, default int8 gradients
    assert stats["deepspeed_moe"].calls["dispatch_grad"] == 1
    mf.disable_deepspeed(moe)


def check_no_grad_and_twice(tag: str) -> None:
    """A layer called twice in one step (one backward through both forwards), and eval under
    no_grad: identical to stock, every exchange counted once per call."""
    moe = make_moe(4, dist.get_world_size(), 2, True, seed=80)
    x = skew(moe, tokens((2, 12, H), seed=500 + dist.get_rank()))

    def twice():
        torch.manual_seed(7)
        moe.zero_grad(set_to_none=True)
        xa = x.detach().clone().requires_grad_()
        y = moe(xa)[0]
        z = moe(y * 0.5 + x)[0]
        ((z.float() ** 2).sum() + y.float().sum()).backward()
        return (z.detach(), xa.grad,
                {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None})

    def evaluate():
        moe.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            out = moe(x)[0]
        moe.train()
        return out, out, {"output": out}  # (assert_identical's form)

    # (two stock runs: on CUDA DeepSpeed's gating has atomics, see assert_identical)
    ref, noise, ref_eval, eval_noise = twice(), twice(), evaluate(), evaluate()
    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
    assert_identical(ref, twice(), f"{tag} twice per step", noise)
    assert stats.calls == dict.fromkeys(DIRECTIONS, 2), stats.calls
    stats.reset()
    assert_identical(ref_eval, evaluate(), f"{tag} eval under no_grad", eval_noise)
    assert stats.calls == {"dispatch": 1, "combine": 1, "dispatch_grad": 0, "combine_grad": 0}
    mf.disable_deepspeed(moe)


def check_capacity_zero(tag: str) -> None:
    """capacity_factor 0 with min_capacity 0: the gate keeps no route (C = 0), stock exchanges
    empty [E, 0, M] tensors; skip_padding sends no row, with the same outputs and gradients."""
    from deepspeed.moe.layer import MoE
    torch.manual_seed(0)
    moe = MoE(H, mlp(H), num_experts=4, ep_size=dist.get_world_size(), k=2, capacity_factor=0.0,
              min_capacity=0, drop_tokens=True)
    moe.set_deepspeed_parallelism()
    moe = moe.to(device=device(), dtype=torch.bfloat16)
    x = tokens((1, 8, H), seed=550 + dist.get_rank())
    ref, noise = stock_runs(moe, x)
    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
    assert_identical(ref, run(moe, x), f"{tag} capacity 0", noise)
    assert stats.calls == dict.fromkeys(DIRECTIONS, 1) and stats.slot_share() == 1.0, stats
    mf.disable_deepspeed(moe)


def check_capacities_differ(tag: str) -> None:
    """drop_tokens sizes each rank's capacity from its own token count: with 8 tokens on one
    rank and 24 on the other, the gates size different capacities. Every rank raises at once,
    naming them (only the rank that received more slots than its capacity raised, and the
    other waited in the exchange for MOE_FLASHCOMM_TIMEOUT_S); then equal counts run exactly."""
    import time
    moe = make_moe(4, dist.get_world_size(), 1, True, seed=9)
    even = tokens((1, 16, H), seed=560 + dist.get_rank())
    ref, noise = stock_runs(moe, even)
    mf.enable_deepspeed(moe, PASS)
    start = time.monotonic()
    with pytest.raises(ValueError, match="sized different capacities, \\[2, 6\\] by group rank"):
        run(moe, tokens((1, 8 if dist.get_rank() == 0 else 24, H), seed=570))
    assert time.monotonic() - start < 10, tag
    assert_identical(ref, run(moe, even), f"{tag} after capacities that differed", noise)
    mf.disable_deepspeed(moe)
    # without drop_tokens the capacity is the group's largest expert load, capped at the
    # rank's own token count: 2 tokens on one rank and 40 on the other differ too
    moe = make_moe(4, dist.get_world_size(), 1, False, seed=9)
    ref, noise = stock_runs(moe, even)
    mf.enable_deepspeed(moe, PASS)
    with pytest.raises(ValueError, match=r"sized different capacities, \[2, \d+\] by group rank"
                                         r"(.|\n)*without, as the group's largest expert load, "
                                         r"capped at the rank's token count"):
        run(moe, tokens((1, 2 if dist.get_rank() == 0 else 40, H), seed=575))
    assert_identical(ref, run(moe, even), f"{tag} after capacities that differed", noise)
    mf.disable_deepspeed(moe)


class OwnFailure(RuntimeError):
    """An error of one rank's own in a layer's forward (out of memory in the experts, ...)."""


def check_own_failure_between_calls(tag: str) -> None:
    """One rank fails on its own between the forward's library calls (before the count
    exchange, between the dispatch and the combine, packing the slots): it answers the call
    its peers wait in, so every rank raises in that forward within seconds (the peers
    naming that rank's rejected call) and the next forwards pair up, exact (before, the
    peers paired it with the failing rank's next forward: one call apart from then on).
    Without drop_tokens the gate agrees on a capacity by DeepSpeed's own all_reduce on the
    group: a failure before the first library call is not answered there (the frame would
    meet that all_reduce and wedge the group), the later ones are."""
    import time
    from moe_flashcomm.integrations import padding
    rank, last = dist.get_rank(), dist.get_world_size() - 1
    x = tokens((1, 16, H), seed=590 + rank)
    for skip, drop in ((True, True), (False, True), (True, False)):
        moe = make_moe(4, dist.get_world_size(), 1, drop, seed=10)
        ref, noise = stock_runs(moe, x)
        mf.enable_deepspeed(moe, {**PASS, "skip_padding": skip})
        layer = moe.deepspeed_moe
        places = ["gate"] * drop + ["experts"] + (["packing"] if skip else [])
        for place in places:
            undo = None
            if rank == last:
                def fail(*_):
                    raise OwnFailure(f"{place} failed on this rank")
                if place == "packing":
                    undo, padding.SlotPlan.pack = padding.SlotPlan.pack, fail
                else:
                    hook = getattr(layer, place).register_forward_pre_hook(fail)
            start = time.monotonic()
            try:
                want = OwnFailure if rank == last else ConfigMismatchError
                with pytest.raises(want) as raised:
                    run(moe, x)
            finally:
                if rank == last:
                    if undo is not None:
                        padding.SlotPlan.pack = undo
                    else:
                        hook.remove()
            assert time.monotonic() - start < 10, (tag, place)
            if rank != last:
                owed = "skip_padding counts" if skip and place == "gate" else "all_to_all"
                assert f"it rejected its {owed}" in str(raised.value), (tag, place, raised.value)
            assert_identical(ref, run(moe, x), f"{tag} after a failure in the {place}", noise)
        mf.disable_deepspeed(moe)


def _world(rank: int, world: int, cases) -> None:
    init_deepspeed()
    tag = f"rank {rank}/{world}"
    if world == 2:
        check_gates_fill_prefixes(tag)
        check_rules_and_quantized(tag)
        check_no_grad_and_twice(tag)
        check_capacity_zero(tag)
        check_capacities_differ(tag)
    else:
        check_own_failure_between_calls(tag)
    check_identical(tag, cases)


ALL = [(k, drop, dtype, skewed) for k in (1, 2) for drop in (True, False)
       for dtype in (torch.bfloat16, torch.float16) for skewed in (False, True)]


def test_skip_padding_gloo_2_ranks():
    spawn(_world, 2, ALL + [(3, True, torch.bfloat16, True), (3, False, torch.float16, False),
                            (2, True, torch.float32, True)])


def test_skip_padding_gloo_4_ranks():
    spawn(_world, 4, [(1, True, torch.bfloat16, True), (2, False, torch.float16, True),
                      (2, True, torch.bfloat16, False), (1, False, torch.float16, False)])


@pytest.mark.multigpu
def test_skip_padding_nccl_2_gpus():
    spawn(_world, 2, ALL, backend="nccl")


def carrying(theirs: torch.Tensor, capacities: list) -> torch.Tensor:
    """``theirs`` as exchanged: each count with its sender's capacity in the high bits (of 2
    ranks, 2 local experts each)."""
    return theirs + (torch.tensor(capacities, device=theirs.device).repeat_interleave(2)
                     << CAPACITY_SHIFT)


def check_slot_plan(device: str) -> None:
    """One rank's view of a 2-rank exchange, without the transport: pack sends exactly the
    filled rows in expert order with their split sizes, unpack restores zeros around them, and
    the gradients of both are the adjoint copies (bit for bit, signed zeros kept)."""
    experts, capacity, hidden = 4, 5, 3
    mine = torch.tensor([2, 0, 5, 1], device=device)  # this rank's tokens per expert
    theirs = torch.tensor([1, 3, 0, 4], device=device)  # from rank 0 and rank 1 to my 2 experts
    plan = RouteCounts(mine, carrying(theirs, [5, 5])).plan(  # both ranks' gates sized 5
        torch.Size([experts, capacity, hidden]), world=2)
    assert plan.send_splits == [2, 6] and plan.recv_splits == [4, 4]
    assert plan.stock_slots == 2 * capacity
    x = torch.randn(experts, capacity, hidden, device=device, dtype=torch.bfloat16)
    x[1] = 0  # (an expert without tokens)
    x.requires_grad_()
    packed, send, recv = plan.pack(x, "dispatch")
    rows = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (3, 0)]
    assert (send, recv) == (plan.send_splits, plan.recv_splits)
    assert torch.equal(packed, torch.stack([x[e, c] for e, c in rows]))
    g = torch.randn_like(packed)
    g[0] = -0.0
    packed.backward(g)
    want = torch.zeros_like(x)
    for i, (e, c) in enumerate(rows):
        want[e, c] = g[i]
    assert torch.equal(x.grad, want) and torch.signbit(x.grad[0, 0]).all()
    # the combine goes back: what arrived by the dispatch (theirs) is sent, mine is restored
    y = torch.randn(sum(plan.send_splits), hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    restored = plan.unpack(y, "combine")
    assert restored.shape == (experts, capacity, hidden)
    assert torch.equal(restored[2, :5], y[2:7]) and torch.equal(restored[0, 2:], torch.zeros_like(restored[0, 2:]))
    restored.backward(torch.ones_like(restored))
    assert torch.equal(y.grad, torch.ones_like(y))
    with pytest.raises(ValueError, match="do not fit the exchanged tensor"):
        RouteCounts(mine, carrying(theirs, [4, 4])).plan(torch.Size([experts, 4, hidden]), world=2)
    # capacity 0 (no route kept): nothing is sent, the empty [E, 0, M] is restored
    empty = RouteCounts(torch.zeros_like(mine), torch.zeros_like(theirs)).plan(
        torch.Size([experts, 0, hidden]), world=2)
    packed, send, recv = empty.pack(torch.empty(experts, 0, hidden, device=device), "dispatch")
    assert packed.shape == (0, hidden) and send == recv == [0, 0]
    assert empty.unpack(packed, "combine").shape == (experts, 0, hidden)
    # the gates sized different capacities (drop_tokens, more tokens on rank 1): every rank
    # sees both and raises alike, whether or not the counts would fit
    for c in (3, 5):
        with pytest.raises(ValueError, match=r"sized different capacities, \[3, 5\] by group rank"):
            RouteCounts(mine.clamp(max=3), carrying(theirs.clamp(max=3), [3, 5])).plan(
                torch.Size([experts, c, hidden]), world=2)


def test_slot_plan_cpu():
    check_slot_plan("cpu")


@pytest.mark.cuda
def test_slot_plan_cuda():
    check_slot_plan("cuda")  # the counts' pinned, asynchronous copy to the host


def test_config_field():
    assert mf.FlashCommConfig().skip_padding is True
    cfg = mf.FlashCommConfig.from_dict({"skip_padding": False,
                                        "layers": [{"match": "a.*", "skip_padding": True}]})
    assert not cfg.skip_padding and cfg.for_layer("a.b", 0).skip_padding
    assert "skip_padding=off" in cfg.describe()
    assert mf.FlashCommConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(mf.config.ConfigError, match=r"layers\[0\]\.skip_padding must be true or false, got 'yes'"):
        mf.FlashCommConfig.from_dict({"layers": [{"index": 0, "skip_padding": "yes"}]})
