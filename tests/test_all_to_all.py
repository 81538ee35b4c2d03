"""moe_flashcomm.all_to_all over real gloo (CPU) and NCCL (2 GPUs) process groups.

Every rank regenerates every rank's input from a seed, so it knows exactly what it must
receive: from rank p, the rows p routes to it as ``all_to_all_single`` does, passed
through decode(encode(.)) of the pair's codec (the reference codec, the specification),
or exact for the rows it keeps. Many cases run inside one spawn (CI has 2 cores).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.comm import ConfigMismatchError
from moe_flashcomm.comm.topology import intra_node_path
from tests.a2a_cases import expected, make_input, roundtrip, split_matrix
from tests.distributed import spawn

CODECS = [mf.CodecConfig(bits="bf16"), mf.CodecConfig(bits="fp8"), mf.CodecConfig(bits=8),
          mf.CodecConfig(bits=7), mf.CodecConfig(bits=6), mf.CodecConfig(bits=5),
          mf.CodecConfig(bits=4), mf.CodecConfig(bits=3), mf.CodecConfig(bits=2),
          mf.CodecConfig(bits=4, spikes=False, group_size=32),
          mf.CodecConfig(bits=3, group_size=256)]


# ---- helpers shared by every world size -------------------------------------------------------
def run_case(rank, world, S, tail, dtype, seed, codec, link, device, **kw):
    x = make_input(rank, sum(S[rank]), tail, dtype, seed).to(device)
    out_splits = [S[p][rank] for p in range(world)]
    out = mf.all_to_all(x, out_splits, S[rank], codec=codec, **kw)
    want = expected(rank, world, S, tail, dtype, seed, link)
    assert out.dtype == dtype and out.device == x.device, (out.dtype, out.device)
    assert out.shape == want.shape, (out.shape, want.shape)
    # bit equality (NaN-free inputs): the reference codec is the specification
    assert torch.equal(out.cpu(), want), f"{codec} {dtype} {S} max diff " \
        f"{(out.cpu().float() - want.float()).abs().max()}"
    return x, out


def torch_a2a(x: torch.Tensor, out_splits, in_splits, group=None) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def battery(rank: int, world: int, device: str, codecs=CODECS, kinds=("even", "uneven", "zeros", "empty"),
            extra: bool = True) -> None:
    """The per-world-size checks; ``device`` is "cpu" (gloo) or "cuda" (NCCL)."""
    seed = 0
    gate = False  # the size gate is checked on its own below
    for kind in kinds:
        for codec in codecs:
            for dtype in (torch.bfloat16, torch.float32) if extra else (torch.bfloat16,):
                seed += 1
                S = split_matrix(world, kind, seed)
                run_case(rank, world, S, (96,), dtype, seed, codec, lambda p: codec, device, gate=gate)

    S = split_matrix(world, "uneven", 99)
    out_splits = [S[p][rank] for p in range(world)]
    # passthrough of 16-bit input is bit-identical to all_to_all_single, any shape
    for dtype in (torch.bfloat16, torch.float16):
        x = make_input(rank, sum(S[rank]), (2, 40), dtype, 5).to(device)
        assert torch.equal(mf.all_to_all(x, out_splits, S[rank], codec="bf16"),
                           torch_a2a(x, out_splits, S[rank]))
    if not extra:
        return
    # [N, C, H] rows (DeepSpeed's [experts, capacity, model]), fp16, odd hidden sizes
    for tail, dtype, codec in (((3, 64), torch.float16, mf.CodecConfig(bits=4)),
                               ((130,), torch.float32, mf.CodecConfig(bits=3, group_size=64)),
                               ((7,), torch.bfloat16, mf.CodecConfig(bits=2, group_size=32))):
        seed += 1
        run_case(rank, world, S, tail, dtype, seed, codec, lambda p: codec, device, gate=gate)

    # async: wait() gives the same result; the decode happens there
    x = make_input(rank, sum(S[rank]), (64,), torch.float32, 7).to(device)
    sync = mf.all_to_all(x, out_splits, S[rank], codec=4, gate=gate)
    handle = mf.all_to_all(x, out_splits, S[rank], codec=4, gate=gate, async_op=True)
    assert torch.equal(handle.wait(), sync) and handle.wait() is handle.wait()

    # chunked pipeline: byte-identical to one chunk
    for chunks in (2, 3, 8):
        assert torch.equal(mf.all_to_all(x, out_splits, S[rank], codec=4, gate=gate,
                                         chunks=chunks), sync), chunks

    backward_checks(rank, world, S, device)
    gate_checks(rank, world, device)
    plain_checks(rank, world, S, device)


def backward_checks(rank, world, S, device):
    out_splits = [S[p][rank] for p in range(world)]
    # passthrough: exactly torch's gradient (the reverse all_to_all_single)
    x = make_input(rank, sum(S[rank]), (64,), torch.bfloat16, 11).to(device).requires_grad_()
    y = mf.all_to_all(x, out_splits, S[rank], codec="bf16", grad_codec="bf16")
    gy = make_input(rank + 100, y.shape[0], (64,), torch.bfloat16, 11).to(device)
    y.backward(gy)
    assert torch.equal(x.grad, torch_a2a(gy, S[rank], out_splits))

    # quantized forward and backward: the backward is the reverse route of the gradient
    # through decode(encode(.)) with the grad codec (int8 by default), own rows exact
    for grad_codec in (None, mf.CodecConfig(bits=6, group_size=64), mf.CodecConfig(bits=8, rounding="stochastic")):
        x = make_input(rank, sum(S[rank]), (2, 64), torch.float32, 12).to(device).requires_grad_()
        y = mf.all_to_all(x, out_splits, S[rank], codec=2, grad_codec=grad_codec, gate=False)
        gy = make_input(rank + 100, y.shape[0], (2, 64), torch.float32, 12).to(device)
        (y * gy).sum().backward()
        exact = torch_a2a(gy, S[rank], out_splits)
        cfg = mf.CodecConfig.coerce(grad_codec if grad_codec is not None else 8)
        if cfg.rounding == "nearest":
            # what each peer p sent back to this rank: the rows p got from it, quantized
            want = torch_a2a(torch.cat([gy[sum(out_splits[:p]):sum(out_splits[:p + 1])] if p == rank
                                        else roundtrip(gy[sum(out_splits[:p]):sum(out_splits[:p + 1])], cfg)
                                        for p in range(world)]), S[rank], out_splits)
            assert torch.equal(x.grad, want)
        # within the codec's bound: half a quantization step (a step for stochastic rounding)
        step = (exact.abs().amax() * 2 / cfg.qmax).item() if exact.numel() else 0.0
        assert (x.grad - exact).abs().max().item() <= step + 1e-6 if exact.numel() else True

    # async + autograd
    x = make_input(rank, sum(S[rank]), (64,), torch.float32, 13).to(device).requires_grad_()
    y = mf.all_to_all(x, out_splits, S[rank], codec="bf16", grad_codec="bf16", async_op=True).wait()
    gy = make_input(rank + 100, y.shape[0], (64,), torch.float32, 13).to(device)
    y.backward(gy)
    assert torch.equal(x.grad, torch_a2a(gy.bfloat16(), S[rank], out_splits)
                       .float().index_copy_(0, *own_rows(rank, S, out_splits, gy, x.device)))


def plain_checks(rank, world, S, device):
    """Calls that are one all_to_all_single of the tensor (16-bit input, bf16 on every pair:
    the passthrough codec or every pair size-gated): repeated (the cached call), of any
    shape, non-contiguous, with autograd and async_op, all exactly all_to_all_single."""
    out_splits = [S[p][rank] for p in range(world)]
    gated = dict(codec=4, grad_codec=4, gate={intra_node_path(device): {"*": 1 << 40}})
    for kw in (dict(codec="bf16", grad_codec="bf16"), gated):
        x = make_input(rank, sum(S[rank]), (40, 2), torch.bfloat16, 31).to(device).transpose(1, 2)
        assert not x.is_contiguous()
        want = torch_a2a(x, out_splits, S[rank])
        for _ in range(2):
            assert torch.equal(mf.all_to_all(x, out_splits, S[rank], **kw), want)
            handle = mf.all_to_all(x, out_splits, S[rank], async_op=True, **kw)
            assert torch.equal(handle.wait(), want) and handle.is_completed()
            for async_op in (False, True):
                xg = x.detach().clone().requires_grad_()
                y = mf.all_to_all(xg, out_splits, S[rank], async_op=async_op, **kw)
                y = y.wait() if async_op else y
                assert torch.equal(y, want) and y.grad_fn is not None
                gy = make_input(rank + 100, y.shape[0], (2, 40), torch.bfloat16, 31).to(device)
                y.backward(gy)
                assert torch.equal(xg.grad, torch_a2a(gy, S[rank], out_splits))
    # no values per row of dim 0 ([N, 0, H]): still all_to_all_single's result
    x0 = torch.zeros(sum(S[rank]), 0, 8, dtype=torch.bfloat16, device=device)
    for kw in (dict(codec="bf16"), gated):
        assert mf.all_to_all(x0, out_splits, S[rank], **kw).shape == (sum(out_splits), 0, 8)
    # even splits ([N, H], no split sizes): all_to_all_single's own even split
    x = make_input(rank, 3 * world, (16,), torch.float16, 32).to(device)
    for kw in (dict(codec="bf16"), gated):
        want = torch_a2a(x, [3] * world, [3] * world)
        assert torch.equal(mf.all_to_all(x, **kw), want)
        assert torch.equal(mf.all_to_all(x, async_op=True, **kw).wait(), want)


def own_rows(rank, S, out_splits, gy, device):
    """(indices, values) of the gradient rows this rank kept for itself (exact)."""
    a, n = sum(S[rank][:rank]), S[rank][rank]
    b = sum(out_splits[:rank])
    return torch.arange(a, a + n, device=device), gy[b:b + n]


def gate_checks(rank, world, device):
    """A pair whose bf16 size is under its threshold travels as bf16, the others quantized."""
    H = 64
    path = intra_node_path(device)  # NCCL's environment: nvlink, or host with NCCL_P2P_DISABLE
    gate = {path: {"int4": 5 * H * 2}}  # pairs of fewer than 5 rows go bf16
    S = [[(2 + 2 * ((p + q) % 2)) if p != q else 1 for q in range(world)] for p in range(world)]
    S[0][-1] = 9
    codec = mf.CodecConfig(bits=4)
    run_case(rank, world, S, (H,), torch.float32, 21, codec,
             lambda p: codec if S[p][rank] >= 5 else mf.CodecConfig(bits="bf16"), device, gate=gate)
    # with bf16 input a fully gated exchange is all_to_all_single itself
    big = {path: {"*": 1 << 30}}
    x = make_input(rank, sum(S[rank]), (H,), torch.bfloat16, 22).to(device)
    out_splits = [S[p][rank] for p in range(world)]
    assert torch.equal(mf.all_to_all(x, out_splits, S[rank], codec=codec, gate=big),
                       torch_a2a(x, out_splits, S[rank]))


def mixed_gate_checks(rank, world, device):
    """World >= 3, 16-bit tokens: ranks whose pairs are all size-gated send their tensor as
    it is (one all_to_all_single of bf16 rows) while ranks 1 and 2 exchange records between
    them in the same call; both ends of every pair must agree on the element type."""
    H = 64
    gate = {intra_node_path(device): {"int4": 5 * H * 2}}  # pairs of fewer than 5 rows go bf16
    S = [[1 if p == q else 2 + (p + q) % 2 for q in range(world)] for p in range(world)]
    S[1][2], S[2][1] = 9, 7
    codec = mf.CodecConfig(bits=4)
    for dtype in (torch.bfloat16, torch.float16):
        run_case(rank, world, S, (H,), dtype, 23, codec,
                 lambda p: codec if S[p][rank] >= 5 else mf.CodecConfig(bits="bf16"), device,
                 gate=gate)


def error_checks(rank, world, device):
    x = torch.randn(4 * world, 32, device=device)
    ok = [4] * world
    bad = [
        (dict(input_split_sizes=[4] * (world + 1)), ValueError, "input_split_sizes must have one entry per rank"),
        (dict(output_split_sizes=[-1] + [4] * (world - 1)), ValueError, r"output_split_sizes\[0\] must be >= 0"),
        (dict(input_split_sizes=[5] * world), ValueError, "input_split_sizes sums to"),
        (dict(input_split_sizes=[1.5] * world), TypeError, r"input_split_sizes\[0\] must be an int"),
        (dict(input_split_sizes=[0] * (world - 1) + [4 * world], output_split_sizes=ok), ValueError,
         "rows rank .* sends to itself" if world > 1 else "sums"),
        (dict(codec=9), ValueError, "codec: CodecConfig.bits"),
        (dict(grad_codec={"bits": 4, "colour": 1}), ValueError, "grad_codec: unknown codec field"),
        (dict(codec={"intra_node": 4, "inner_node": 2}), ValueError, "unknown link field"),
        (dict(chunks=0), ValueError, "chunks must be"),
        (dict(algorithm="ring"), ValueError, "algorithm must be"),
        (dict(gate={"tpu": {"int4": 1}}), ValueError, "unknown path 'tpu'"),
    ]
    for kwargs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            mf.all_to_all(x, **kwargs)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        mf.all_to_all(torch.randn(4 * world + 1, 32, device=device))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        mf.all_to_all(torch.ones(4 * world, 32, dtype=torch.int32, device=device))

    # a configuration that differs on one rank raises on every rank (no hang, no garbage).
    # Detection runs when a configuration is new to every rank: the one rank 0 uses here
    # (hidden 40) is never completed, so never cached.
    x40 = torch.randn(4 * world, 40, device=device)
    for name, kwargs in (("codec", dict(codec=3)), ("row_shape", dict(x=torch.randn(4 * world, 48, device=device))),
                         ("dtype", dict(x=x40.half())), ("grad_codec", dict(grad_codec=4)),
                         ("chunks", dict(chunks=2)), ("topology", dict(topology=mf.Topology(1)))):
        args = dict(x=x40, codec=4)
        if rank == world - 1:
            args.update(kwargs)
        # (the field's own line: every such message ends naming all the fields)
        line = ("ran a different moe_flashcomm operation" if name == "topology"  # (another
                else rf"\n  {name}: this rank has")                               # communicator)
        with pytest.raises(ConfigMismatchError, match=line):
            mf.all_to_all(**args)
    # and the group still works afterwards
    assert torch.equal(mf.all_to_all(x, codec="bf16", gate=False), torch_a2a(x.bfloat16(), ok, ok).float()
                       .index_copy_(0, torch.arange(4 * rank, 4 * rank + 4, device=device), x[4 * rank:4 * rank + 4]))


# ---- CPU: gloo process groups of 2, 4 and 8 ---------------------------------------------------
def _world2(rank, world):
    battery(rank, world, "cpu")
    error_checks(rank, world, "cpu")


def _world4_topology(rank, world):
    """4 ranks, 2 per node (LOCAL_WORLD_SIZE=2): codec per link."""
    os.environ["LOCAL_RANK"] = str(rank % 2)
    intra, inter = mf.CodecConfig(bits=8), mf.CodecConfig(bits=2, group_size=64)
    links = mf.LinkCodecs(intra_node=intra, inter_node=inter)

    def link(p):
        return intra if p // 2 == rank // 2 else inter
    for seed, kind in enumerate(("even", "uneven", "zeros")):
        S = split_matrix(world, kind, 40 + seed)
        for topo in (None, mf.Topology(local_size=2)):
            run_case(rank, world, S, (128,), torch.bfloat16, 40 + seed, links, link, "cpu", topology=topo)
    # the same data as dicts, and bf16 inside the node with int4 across
    run_case(rank, world, S, (128,), torch.float16, 50, {"intra_node": "bf16", "inter_node": 4},
             lambda p: mf.CodecConfig(bits="bf16") if p // 2 == rank // 2 else mf.CodecConfig(),
             "cpu")
    # explicit topology overrides the environment: one node per rank -> all links inter
    run_case(rank, world, S, (128,), torch.float32, 51, links, lambda p: inter, "cpu",
             topology=mf.Topology(1))
    # backward: the gradient codec per link too
    out_splits = [S[p][rank] for p in range(world)]
    x = make_input(rank, sum(S[rank]), (128,), torch.float32, 52).requires_grad_()
    y = mf.all_to_all(x, out_splits, S[rank], codec=links, grad_codec={"intra_node": "bf16", "inter_node": 8})
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones_like(x))  # constants survive every codec exactly
    battery(rank, world, "cpu", codecs=CODECS[::3], kinds=("uneven", "zeros"), extra=False)


def _world8(rank, world):
    battery(rank, world, "cpu", codecs=[mf.CodecConfig(bits=b) for b in ("bf16", "fp8", 6, 4, 2)],
            extra=False)
    mixed_gate_checks(rank, world, "cpu")
    S = split_matrix(world, "uneven", 80)
    out_splits = [S[p][rank] for p in range(world)]
    x = make_input(rank, sum(S[rank]), (64,), torch.float32, 81)
    sync = mf.all_to_all(x, out_splits, S[rank], codec=3)
    assert torch.equal(mf.all_to_all(x, out_splits, S[rank], codec=3, chunks=4), sync)
    assert torch.equal(mf.all_to_all(x, out_splits, S[rank], codec=3, async_op=True).wait(), sync)


def test_all_to_all_gloo_2():
    spawn(_world2, 2)


def test_all_to_all_gloo_4_per_link_codecs():
    spawn(_world4_topology, 4, env={"LOCAL_WORLD_SIZE": 2})


def test_all_to_all_gloo_8():
    spawn(_world8, 8)


def _double_backward(rank, world):
    """A backward differentiated again (create_graph): the gradient of x's gradient with
    respect to the output's gradient is the forward exchange, on every rank, whether it keeps
    rows of its own or not (rank 0 keeps 2, ranks 1 and 2 none), sync and async."""
    comm = mf.Communicator(gate=False)
    S = [[2, 0, 3], [1, 0, 4], [0, 2, 0]]
    out_splits = [S[p][rank] for p in range(world)]
    for codec, grad_codec, dtype in (("native", "native", torch.float32),
                                     ("bf16", "bf16", torch.bfloat16), (4, 8, torch.float32)):
        for async_op in (False, True):
            x = make_input(rank, sum(S[rank]), (2, 32), dtype, 61).requires_grad_()
            y = comm.all_to_all(x, out_splits, S[rank], codec=codec, grad_codec=grad_codec,
                                async_op=async_op)
            y = y.wait() if async_op else y
            gy = make_input(rank + 10, y.shape[0], (2, 32), dtype, 62).requires_grad_()
            v = make_input(rank + 20, x.shape[0], (2, 32), dtype, 63)
            (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
            assert torch.equal(gx, comm.all_to_all(gy.detach(), S[rank], out_splits,
                                                   codec=grad_codec))
            assert gx.grad_fn is not None, (codec, async_op)
            (ggy,) = torch.autograd.grad(gx, gy, v)
            assert torch.equal(ggy, comm.all_to_all(v, out_splits, S[rank], codec=codec)), \
                (codec, async_op)
            if codec == "native":  # exact: all_to_all_single's routing both ways
                assert torch.equal(gx, torch_a2a(gy.detach(), S[rank], out_splits))
                assert torch.equal(ggy, torch_a2a(v, out_splits, S[rank]))
    comm.close()


def test_double_backward_gloo_3():
    spawn(_double_backward, 3, timeout=300)


def _exchange_counts(rank, world):
    """Communicator.exchange_counts: an equal part of the counts to each rank, as
    all_to_all_single; counts that do not split evenly are refused, not cut short (the last
    count came back uninitialised), and on one rank only its peers raise at once."""
    comm = mf.Communicator(gate=False)
    mine = torch.arange(2 * world) + 100 * rank
    assert torch.equal(comm.exchange_counts(mine), torch_a2a(mine.view(-1, 1), [2] * world,
                                                             [2] * world).view(-1))
    with pytest.raises(ValueError, match="5 counts do not split evenly among the group's 2"):
        comm.exchange_counts(torch.arange(5))
    if rank == 0:
        with pytest.raises(ValueError, match="do not split evenly"):
            comm.exchange_counts(torch.arange(2 * world + 1))
    else:
        with pytest.raises(ConfigMismatchError, match="rank 0: it rejected its skip_padding counts"):
            comm.exchange_counts(mine)
    assert torch.equal(comm.exchange_counts(mine), torch_a2a(mine.view(-1, 1), [2] * world,
                                                             [2] * world).view(-1))
    # a transposed view once came back as uninitialised memory, with no error
    view = mine.view(2, world).t()
    assert torch.equal(comm.exchange_counts(view), comm.exchange_counts(view.contiguous()))
    assert torch.equal(comm.exchange_counts(view).view(-1),
                       torch_a2a(view.reshape(-1, 1), [2] * world, [2] * world).view(-1))
    comm.close()


def test_exchange_counts_gloo_2():
    spawn(_exchange_counts, 2, timeout=120)


# ---- GPU: NCCL, 2 GPUs -----------------------------------------------------------------------
def _nccl2(rank, world):
    battery(rank, world, "cuda")
    error_checks(rank, world, "cuda")
    # rank 0's split sizes are equal (given as lists), rank 1's are not: every rank must
    # issue the same form of all_to_all_single (NCCL's even form is a different collective)
    S = [[4, 4], [4, 8]]
    codec = mf.CodecConfig(bits=4)
    run_case(rank, world, S, (256,), torch.bfloat16, 91, codec, lambda p: mf.CodecConfig(bits="bf16"),
             "cuda", gate={intra_node_path("cuda"): {"*": 1 << 30}})
    run_case(rank, world, S, (256,), torch.bfloat16, 92, codec, lambda p: codec, "cuda", gate=False)
    # the chunked pipeline on streams: identical bytes to one chunk, at a size where the
    # automatic choice chunks too
    T, H = 1 << 13, 7168
    x = make_input(rank, T, (H,), torch.bfloat16, 90).cuda()
    for codec in (mf.CodecConfig(bits=4), mf.CodecConfig(bits=2), mf.CodecConfig(bits="fp8")):
        one = mf.all_to_all(x, codec=codec, gate=False, chunks=1)
        for chunks in (None, 2, 5):
            assert torch.equal(mf.all_to_all(x, codec=codec, gate=False, chunks=chunks), one), (codec, chunks)
        handle = mf.all_to_all(x, codec=codec, gate=False, chunks=4, async_op=True)
        assert torch.equal(handle.wait(), one)
    torch.cuda.synchronize()


@pytest.mark.multigpu
def test_all_to_all_nccl_2():
    """On NVLink (the default environment): the peer-to-peer transport carries the calls."""
    spawn(_nccl2, 2, backend="nccl")


@pytest.mark.multigpu
def test_all_to_all_nccl_2_without_p2p():
    """The same checks with NCCL carrying every byte (the host-memory link emulation)."""
    spawn(_nccl2, 2, backend="nccl", env={"NCCL_P2P_DISABLE": 1})


