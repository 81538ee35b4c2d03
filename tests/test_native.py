"""The "native" codec over real gloo process groups: tokens travel in their own dtype, so
all_to_all (forward and backward, per link, chunked, async, hierarchical) is bit-identical
to torch.distributed.all_to_all_single for fp32, bf16 and fp16, NaN payloads included; the
size gate never replaces it; a native all_reduce is torch.distributed.all_reduce itself.
Meta tensors are refused on every rank before any collective."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.codec import reference
from tests.distributed import spawn

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NATIVE = mf.CodecConfig(bits="native")
ALWAYS_GATED = {"cpu": {"*": 1 << 40}}  # a gate under which every quantized pair goes bf16


def make_input(rank: int, rows: int, tail: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values fp32 cannot keep in bf16, plus NaNs of both signs and odd payloads, Inf, -0."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = (torch.randn(rows, *tail, generator=g) * 1.001).to(dtype)
    flat = x.view(-1)
    if flat.numel() >= 8:
        ints = flat.view(torch.int32 if dtype == torch.float32 else torch.int16)
        ints[0] = -1                                   # a negative NaN, full payload
        ints[1] = 0x7F800001 if dtype == torch.float32 else 0x7C01 if dtype == torch.float16 else 0x7F81
        flat[2], flat[3], flat[4] = float("inf"), float("-inf"), -0.0
    return x


def splits(world: int, kind: str, seed: int) -> list[list[int]]:
    """S[src][dst]: rows src sends to dst."""
    g = torch.Generator().manual_seed(seed)
    if kind == "even":
        return [[3] * world for _ in range(world)]
    if kind == "uneven":
        return torch.randint(0, 6, (world, world), generator=g).tolist()
    s = torch.randint(0, 4, (world, world), generator=g) * (torch.rand(world, world, generator=g) < 0.5)
    s[0] = 0  # rank 0 sends nothing
    return s.tolist()


def torch_a2a(x: torch.Tensor, out_splits, in_splits) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN payloads included), not value equality."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _exact_a2a(rank, world, codec, **kw):
    """Forward and backward of ``codec`` (every link native) against all_to_all_single."""
    seed = 0
    for kind in ("even", "uneven", "zeros"):
        for dtype in DTYPES:
            for tail in ((48,), (3, 20)):
                seed += 1
                S = splits(world, kind, seed)
                out_splits = [S[p][rank] for p in range(world)]
                x = make_input(rank, sum(S[rank]), tail, dtype, seed)
                want = torch_a2a(x, out_splits, S[rank])
                for gate in (True, False, ALWAYS_GATED):
                    got = mf.all_to_all(x, out_splits, S[rank], codec=codec, gate=gate, **kw)
                    assert same_bits(got, want), (kind, dtype, tail, gate)
                got = mf.all_to_all(x, out_splits, S[rank], codec=codec, async_op=True, **kw).wait()
                assert same_bits(got, want)
                # backward with the native grad codec: exactly the reverse all_to_all_single
                xg = x.detach().clone().requires_grad_()
                y = mf.all_to_all(xg, out_splits, S[rank], codec=codec, grad_codec=codec, **kw)
                assert same_bits(y, want)
                gy = make_input(rank + 50, y.shape[0], tail, dtype, seed)
                y.backward(gy)
                assert same_bits(xg.grad, torch_a2a(gy, S[rank], out_splits)), (kind, dtype)
    # even splits without split sizes, and [N, 0, H]
    x = make_input(rank, 2 * world, (33,), torch.float32, 99)
    assert same_bits(mf.all_to_all(x, codec=codec, **kw), torch_a2a(x, [2] * world, [2] * world))
    x0 = torch.zeros(2 * world, 0, 8)
    assert mf.all_to_all(x0, codec=codec, **kw).shape == (2 * world, 0, 8)


def _world2(rank, world):
    _exact_a2a(rank, world, "native")
    _exact_a2a(rank, world, {"bits": "native"}, chunks=3)
    _exact_a2a(rank, world, mf.LinkCodecs("native", "native"))
    # "bf16" rounds fp32 tokens to bf16: what "native" exists for
    x = torch.randn(4 * world, 64, generator=torch.Generator().manual_seed(rank)) * 1.001
    exact = torch_a2a(x, [4] * world, [4] * world)
    lossy = mf.all_to_all(x, codec="bf16", gate=False)
    assert not torch.equal(lossy, exact) and torch.equal(lossy.bfloat16(), exact.bfloat16())
    assert same_bits(mf.all_to_all(x, codec="native"), exact)
    # a quantized forward with a native backward: the gradient is exact
    S = splits(world, "uneven", 8)
    out_splits = [S[p][rank] for p in range(world)]
    xg = make_input(rank, sum(S[rank]), (64,), torch.float32, 8).requires_grad_()
    y = mf.all_to_all(xg, out_splits, S[rank], codec=4, grad_codec="native", gate=False)
    gy = make_input(rank + 50, y.shape[0], (64,), torch.float32, 9)
    y.backward(gy)
    assert same_bits(xg.grad, torch_a2a(gy, S[rank], out_splits))
    _all_reduce(rank, world)
    _meta(rank, world)


def _all_reduce(rank, world):
    """A native all_reduce is torch.distributed.all_reduce, at every size, gate or not."""
    for dtype in DTYPES:
        for n in (1, 1000, 5000):
            x = (torch.randn(n, generator=torch.Generator().manual_seed(rank + n)) * 1.001).to(dtype)
            want = x.clone()
            dist.all_reduce(want)
            for gate in (True, False):
                assert torch.equal(mf.all_reduce(x.clone(), codec="native", gate=gate), want)
    with pytest.raises(ValueError, match="a 'native' all-reduce is torch.distributed.all_reduce"):
        mf.all_reduce(torch.ones(4096), codec={"intra_node": "native", "inter_node": 4},
                      algorithm="hierarchical", gate=False)


def _meta(rank, world):
    """A meta or sparse x: every rank raises before any collective, nobody is left waiting."""
    x = torch.empty(4 * world, 32, device="meta")
    for codec in ("native", 4):
        with pytest.raises(ValueError, match="x is a meta tensor"):
            mf.all_to_all(x, codec=codec)
        with pytest.raises(ValueError, match="x is a meta tensor"):
            mf.all_reduce(x, codec=codec)
    # a real call afterwards still pairs up
    y = torch.full((4 * world, 32), float(rank))
    assert torch.equal(mf.all_to_all(y, codec="native"), torch_a2a(y, [4] * world, [4] * world))
    # a sparse x is refused the same way, also where a dense x of its shape made a plan
    sparse = y.to_sparse()
    for codec in ("native", 4):
        for call in (mf.all_to_all, mf.all_reduce):
            call(y.clone(), codec=codec, gate=False)
            with pytest.raises(ValueError, match="x has layout torch.sparse_coo"):
                call(sparse, codec=codec, gate=False)
    assert torch.equal(mf.all_to_all(y, codec="native"), torch_a2a(y, [4] * world, [4] * world))


def _world4_links(rank, world):
    """2 nodes of 2 ranks: native inside the node, int4 across (forward and gradient),
    flat and hierarchical; native everywhere is bit-identical with either algorithm."""
    os.environ["LOCAL_RANK"] = str(rank % 2)
    int4 = mf.CodecConfig(bits=4)
    links = mf.LinkCodecs(intra_node="native", inter_node=int4)
    for seed, kind in enumerate(("even", "uneven", "zeros")):
        S = splits(world, kind, 60 + seed)
        out_splits = [S[p][rank] for p in range(world)]
        for dtype in DTYPES:
            x = make_input(rank, sum(S[rank]), (64,), dtype, 60 + seed)
            x.view(-1)[:8] = 1.0  # no NaN in the quantized comparison
            for algorithm in ("flat", "hierarchical"):
                got = mf.all_to_all(x, out_splits, S[rank], codec=links, gate=False,
                                    algorithm=algorithm)
                want = []
                for p in range(world):
                    xp = make_input(p, sum(S[p]), (64,), dtype, 60 + seed)
                    xp.view(-1)[:8] = 1.0
                    rows = xp[sum(S[p][:rank]):sum(S[p][:rank + 1])]
                    if p // 2 != rank // 2:  # across nodes: through the int4 reference codec
                        rows = reference.decode(reference.encode(rows, int4), int4, 64, dtype)
                    want.append(rows)
                assert same_bits(got, torch.cat(want)), (kind, dtype, algorithm)
            xn = make_input(rank, sum(S[rank]), (64,), dtype, 70 + seed)
            exact = torch_a2a(xn, out_splits, S[rank])
            for algorithm in ("flat", "hierarchical", "auto"):
                xg = xn.detach().clone().requires_grad_()
                y = mf.all_to_all(xg, out_splits, S[rank], codec="native", grad_codec="native",
                                  algorithm=algorithm)
                assert same_bits(y, exact), (kind, dtype, algorithm)
                gy = make_input(rank + 50, y.shape[0], (64,), dtype, 70 + seed)
                y.backward(gy)
                assert same_bits(xg.grad, torch_a2a(gy, S[rank], out_splits)), algorithm
    # gradient: native inside the node, int8 across; constants survive both exactly
    S = splits(world, "uneven", 80)
    out_splits = [S[p][rank] for p in range(world)]
    x = make_input(rank, sum(S[rank]), (64,), torch.float32, 80).requires_grad_()
    y = mf.all_to_all(x, out_splits, S[rank], codec="native",
                      grad_codec={"intra_node": "native", "inter_node": 8})
    y.backward(torch.full_like(y, 0.375))  # a bf16 number: int8 keeps constant groups exactly
    assert torch.equal(x.grad, torch.full_like(x, 0.375))


def test_native_all_to_all_gloo_2():
    spawn(_world2, 2)


def test_native_per_link_and_hierarchical_gloo_4():
    spawn(_world4_links, 4, env={"LOCAL_WORLD_SIZE": 2})


def test_the_all_reduce_specification_refuses_native():
    """reference_all_reduce models the quantized algorithms; a native all-reduce is the
    backend's own sum, which it cannot predict."""
    from moe_flashcomm.comm.all_reduce import reference_all_reduce
    with pytest.raises(ValueError, match="'native' all-reduce is torch.distributed.all_reduce"):
        reference_all_reduce([torch.ones(8), torch.ones(8)], "native")


def _deepspeed_fp32(rank, world):
    """An fp32 model of DeepSpeed MoE layers (k = 1 and 2, drop_tokens on and off): every
    codec "native" gives outputs, gradients and a few SGD steps' losses bit-identical to
    stock DeepSpeed; "bf16" does not (it rounds the fp32 tokens)."""

    from tests.test_deepspeed import H, Stack, init_deepspeed, make_moe, run, stock_runs, tokens
    init_deepspeed()
    native = {k: "native" for k in ("dispatch", "combine", "dispatch_grad", "combine_grad")}

    model = Stack([make_moe(2 * world, world, 1, True, dtype=torch.float32, seed=1),
                   make_moe(2 * world, world, 2, False, dtype=torch.float32, seed=2)])
    x = tokens((4, 8, H), seed=rank, dtype=torch.float32)
    ref, _ = stock_runs(model, x)

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a[:2], b[:2])) and \
            a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])

    stats = mf.enable_deepspeed(model, native)
    assert same(ref, run(model, x)), "native differs from stock"
    assert all(s.quantized[d] == 0 for s in stats.values() for d in native)
    mf.disable_deepspeed(model)
    mf.enable_deepspeed(model, {k: "bf16" for k in native})
    assert not same(ref, run(model, x)), "bf16 passthrough rounds fp32 tokens"
    mf.disable_deepspeed(model)

    def losses(steps=3):
        torch.manual_seed(11)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for step in range(steps):
            y, aux = model(tokens((4, 8, H), seed=100 * step + rank, dtype=torch.float32))
            loss = y.square().mean() + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        model.load_state_dict(init)
        return torch.stack(out)

    stock = losses()
    mf.enable_deepspeed(model, native)
    assert torch.equal(losses(), stock), "training with native differs from stock"
    mf.disable_deepspeed(model)


def test_deepspeed_fp32_model_with_native_codecs_is_stock_gloo_2():
    pytest.importorskip("deepspeed")
    spawn(_deepspeed_fp32, 2)
