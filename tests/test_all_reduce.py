"""moe_flashcomm.all_reduce over real gloo (CPU) and NCCL (2 GPUs) process groups.

Every rank regenerates every rank's input from a seed, so it can check its result three
ways: bit for bit against ``reference_all_reduce`` (the algorithm run in one process with
the reference codec), bit for bit against every other rank's result, and against the exact
sum (``torch.distributed.all_reduce`` in float64) within the bound derived in
``error_bound``. Many cases run inside one spawn (CI has 2 cores).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.comm import ConfigMismatchError
from moe_flashcomm.comm.all_reduce import ROW, reduce_chunk, reference_all_reduce, rows_per_rank
from moe_flashcomm.comm.hierarchical import HierarchyError
from tests.distributed import spawn

INT = [mf.CodecConfig(bits=b, spikes=s) for b, s in itertools.product(range(2, 9), (True, False))]
CODECS = INT + [mf.CodecConfig(bits="fp8"), mf.CodecConfig(bits="bf16"),
                mf.CodecConfig(bits=4, group_size=32), mf.CodecConfig(bits=3, group_size=256,
                                                                      spikes=False)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = ((1,), (7,), (1000,), (4097,), (3, 5, 7), (2 * ROW + 5, 3))


# ---- inputs and the bound ----------------------------------------------------------------------
def make_input(src: int, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rank ``src``'s input of case ``seed``: normal values, a few large spikes, a bias."""
    g = torch.Generator().manual_seed(seed * 1013 + src)
    x = torch.randn(shape, generator=g) + 0.5 * src
    x += (torch.rand(shape, generator=g) < 0.01) * 20 * torch.randn(shape, generator=g)
    return x.to(dtype)


def _half_ulp(dtype: torch.dtype) -> float:
    """Relative error of rounding to ``dtype`` (round to nearest)."""
    return {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


def codec_error(groups: torch.Tensor, cfg: mf.CodecConfig, dtype: torch.dtype) -> torch.Tensor:
    """Per group of ``groups`` [..., G] (float64, values as the codec sees them, padding
    zeros included): the largest |decode(encode(v)) - v| the codec allows, before the
    final cast to ``dtype``. Derived from docs/wire-format.md:

    int b: minimum = round_down(rest_min) (off by <= one wire ulp, 2^-7 relative for bf16
    metadata), scale = round_up((rest_max - minimum) / (2^b - 1)) (another 2^-7), every
    value inside [minimum, minimum + qmax scale], so round to nearest errs by <= scale / 2;
    the rest range is inside the group's range; spikes travel in the wire float (exact for
    16-bit input, 2^-8 relative for fp32); decode's two fp32 roundings add ~2^-23.
    fp8 e4m3: 3 mantissa bits, <= 2^-4 relative, 2^-10 scale absolute for subnormals.
    bf16 passthrough: exact for 16-bit input, a bf16 rounding (2^-8) for fp32."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    amax = torch.maximum(lo.abs(), hi.abs())
    wire = 2.0 ** -7  # bf16 metadata; fp16 metadata is finer
    if cfg.is_passthrough:
        return amax * (2.0 ** -8 if dtype == torch.float32 else 0.0)
    if cfg.is_fp8:
        return amax * (2.0 ** -4 + 2.0 ** -10 / 448 * (1 + wire)) + 2.0 ** -24
    scale = ((hi - lo) + wire * amax) / cfg.qmax * (1 + wire) + 2.0 ** -24
    spike = amax * (2.0 ** -8 if dtype == torch.float32 else 0.0)
    return torch.maximum(scale / 2, spike) + amax * 2.0 ** -22


def error_bound(inputs: list, cfg: mf.CodecConfig) -> torch.Tensor:
    """Elementwise bound on |all_reduce(x) - sum(x)| for the flat algorithm (shape of x).

    The owner o of an element sums its own value exactly and W - 1 peer values, each off by
    the codec error of its group (plus a rounding to x's dtype); the fp32 sum adds roundings
    (loosely W 2^-23 sum |x|, plus the cast to x's dtype); the re-quantization of the sum
    adds the codec error of the sum's group, whose range and magnitude are those of the
    exact sum widened by the error so far; the result is cast to x's dtype."""
    W, dtype, n = len(inputs), inputs[0].dtype, inputs[0].numel()
    c, G = rows_per_rank(n, W), (cfg.group_size if not cfg.is_passthrough else 1)
    u = _half_ulp(dtype)

    def grouped(t):  # [W (owner), c rows, ROW / G groups, G], padded as all_reduce does
        flat = torch.zeros(W * c * ROW, dtype=torch.float64)
        flat[:n] = t.reshape(-1).double()
        return flat.view(W, c, ROW // G, G)

    xs = [grouped(x) for x in inputs]
    owner = torch.arange(W).view(W, 1, 1, 1)
    peers = torch.zeros_like(xs[0])
    for p, x in enumerate(xs):
        e = codec_error(x, cfg, dtype).unsqueeze(-1)
        amax = x.abs().amax(-1, keepdim=True)
        peers += torch.where(owner == p, 0.0, e + u * (amax + e))
    total = sum(x.abs() for x in xs)
    exact = sum(xs)
    before = peers + W * 2.0 ** -23 * total.amax(-1, keepdim=True)
    before = before + u * (exact.abs().amax(-1, keepdim=True) + before)
    widened = torch.stack([exact - before, exact + before], -1).flatten(-2)  # [..., 2G]
    requant = codec_error(widened, cfg, dtype).unsqueeze(-1)
    amax = widened.abs().amax(-1, keepdim=True)
    bound = before + requant + u * (amax + requant)
    return bound.reshape(-1)[:n].view(inputs[0].shape) * (1 + 2.0 ** -20) + 1e-30


# ---- checks ------------------------------------------------------------------------------------
def gather_all(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def check_case(rank, world, shape, dtype, cfg, seed, device, bound=True, **kw) -> torch.Tensor:
    """One all_reduce: equal to the specification bit for bit, identical on every rank,
    and (``bound``, flat) within the derived bound of the exact sum."""
    x = make_input(rank, shape, dtype, seed).to(device)
    y = x.clone()
    out = mf.all_reduce(y, codec=cfg, **kw)
    assert out is y and y.shape == x.shape and y.dtype == dtype
    inputs = [make_input(p, shape, dtype, seed) for p in range(world)]
    local = kw.get("topology") if kw.get("algorithm") == "hierarchical" else None
    if isinstance(local, mf.Topology):
        local = local.local_size
    want = reference_all_reduce(inputs, cfg, local_size=local)
    what = f"{cfg} {dtype} {shape} {kw}"
    assert torch.equal(y.cpu(), want), f"{what}: max diff {(y.cpu().float() - want.float()).abs().max()}"
    raw = y.reshape(-1).view(torch.uint8)
    assert all(torch.equal(b, raw) for b in gather_all(raw)), what
    if bound:
        exact = x.double()
        dist.all_reduce(exact)  # torch's own all_reduce
        err = (y.double() - exact).abs().cpu()
        b = error_bound(inputs, mf.CodecConfig.coerce(cfg))
        assert bool((err <= b).all()), f"{what}: error {(err - b).max().item()} over the bound"
    return y


def battery(rank: int, world: int, device: str, codecs=CODECS, dtypes=DTYPES, sizes=SIZES) -> None:
    seed = 0
    for shape, cfg, dtype in itertools.product(sizes, codecs, dtypes):
        seed += 1
        check_case(rank, world, shape, dtype, cfg, seed, device, gate=False)


def extra_checks(rank: int, world: int, device: str) -> None:
    # pipelining: any number of ranges gives the same bits
    shape = (5 * ROW * world + 3,)
    one = check_case(rank, world, shape, torch.bfloat16, mf.CodecConfig(bits=4), 90, device,
                     gate=False, chunks=1)
    for chunks in (2, 3, 7):
        y = make_input(rank, shape, torch.bfloat16, 90).to(device)
        assert torch.equal(mf.all_reduce(y, codec=4, gate=False, chunks=chunks), one), chunks
    # in place on a non-contiguous view; op given as torch's ReduceOp
    base = make_input(rank, (64, 48), torch.float32, 91).to(device)
    want = mf.all_reduce(base.t().contiguous(), codec=8, gate=False)
    view = base.t()
    assert mf.all_reduce(view, codec=8, op=dist.ReduceOp.SUM, gate=False) is view
    assert torch.equal(view, want) and torch.equal(base.t(), want)
    # size gate: below the threshold (bf16 bytes of the tensor) it is torch's all_reduce
    path = "cpu" if device == "cpu" else "nvlink"
    x = make_input(rank, (999,), torch.float32, 92).to(device)
    exact = x.clone()
    dist.all_reduce(exact)
    gate = {"all_reduce": {path: {"int4": 2000}}}
    assert torch.equal(mf.all_reduce(x.clone(), codec=4, gate=gate), exact)
    assert not torch.equal(mf.all_reduce(x.clone(), codec=4, gate={"all_reduce": {path: {"int4": 1998}}}), exact)
    assert torch.equal(mf.all_reduce(x.clone(), codec=4, gate={"all_reduce": {path: {"*": 1 << 30}}}), exact)
    # hierarchical with one node or one rank per node is the flat algorithm
    for topo in (1, world, mf.Topology(world)):
        check_case(rank, world, (3000,), torch.float32, mf.CodecConfig(bits=3), 93, device,
                   bound=False, gate=False, algorithm="hierarchical", topology=topo)
        y = make_input(rank, (3000,), torch.float32, 93).to(device)
        flat = mf.all_reduce(y, codec=3, gate=False)
        z = make_input(rank, (3000,), torch.float32, 93).to(device)
        assert torch.equal(mf.all_reduce(z, codec=3, gate=False, algorithm="hierarchical",
                                         topology=topo), flat), topo
    # per-link codecs: one rank per node sends every byte across nodes (flat, inter_node);
    # one node sends none across, so inter_node has no link (flat, intra_node), as in the spec
    links = mf.LinkCodecs(intra_node="bf16", inter_node=2)
    for topo, codec in ((1, 2), (world, "bf16")):
        got = check_case(rank, world, (3000,), torch.float32, links, 93, device, bound=False,
                         gate=False, algorithm="hierarchical", topology=topo)
        y = make_input(rank, (3000,), torch.float32, 93).to(device)
        assert torch.equal(got, mf.all_reduce(y, codec=codec, gate=False)), topo
    # zero-size tensors pass through
    e = torch.empty(0, 4, device=device)
    assert mf.all_reduce(e, codec=4, gate=False).shape == (0, 4)
    # a leaf that requires grad is reduced in place outside autograd, as by
    # torch.distributed.all_reduce (autograd refused the in-place writes)
    for codec in (4, "native"):
        y = make_input(rank, (3000,), torch.float32, 94).to(device)
        want = mf.all_reduce(y.clone(), codec=codec, gate=False)
        leaf = y.clone().requires_grad_()
        assert mf.all_reduce(leaf, codec=codec, gate=False) is leaf
        assert torch.equal(leaf.detach(), want) and leaf.grad is None and leaf.is_leaf, codec


def error_checks(rank: int, world: int, device: str) -> None:
    x = torch.randn(100, device=device)
    bad = [
        (dict(x=torch.ones(8, dtype=torch.int32, device=device)), TypeError,
         "x must be float32, bfloat16 or float16, got torch.int32"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(op="max"), ValueError, r"op must be one of \('sum',\) .*got 'max'"),
        (dict(op=dist.ReduceOp.MAX), ValueError, "op must be one of .*MAX"),
        (dict(op=0), ValueError, "op must be one of .*got 0"),  # (equal to ReduceOp.SUM)
        (dict(op=False), ValueError, "op must be one of .*got False"),
        # torch's argument order: an op where the group goes
        (dict(group=dist.ReduceOp.SUM), TypeError, r"group must be a torch.distributed.ProcessGroup "
                                                   r"or None, got RedOpType .*\(x, group, codec, op\)"),
        (dict(algorithm="ring"), ValueError, r"algorithm must be one of \('flat', 'hierarchical'\)"),
        (dict(chunks=0), ValueError, "chunks must be an int >= 1"),
        (dict(codec=9), ValueError, "codec: CodecConfig.bits"),
        (dict(codec={"bits": 4, "rounding": "stochastic"}), ValueError, "integer codecs need rounding='nearest'"),
        (dict(codec={"intra_node": "bf16", "inter_node": 4}), ValueError,
         "per-link codecs .* need algorithm='hierarchical'"),
        (dict(gate={"all_reduce": {"tpu": {"int4": 1}}}), ValueError, "unknown path 'tpu'"),
    ]
    for kwargs, exc, msg in bad:
        args = dict(x=x, gate=False)
        args.update(kwargs)
        with pytest.raises(exc, match=msg):
            mf.all_reduce(**args)
    # 0 equals (and hashes as) ReduceOp.SUM: refused after a sum's plan is cached too
    mf.all_reduce(x.clone(), gate=False, op=dist.ReduceOp.SUM)
    with pytest.raises(ValueError, match="op must be one of .*got 0"):
        mf.all_reduce(x.clone(), gate=False, op=0)
    # a configuration that differs on one rank raises on every rank (no hang, no garbage).
    # Detection runs when a configuration is new to every rank: the ones used here (int5/g64
    # and int3/g64) are never completed, so never cached.
    fresh = mf.CodecConfig(bits=5, group_size=64, spikes=False)
    other = mf.CodecConfig(bits=3, group_size=64, spikes=False)
    for name, kwargs in (("codec", dict(codec=other)), ("dtype", dict(x=x.half())),
                         ("chunks", dict(chunks=2)), ("algorithm", dict(algorithm="hierarchical"))):
        args = dict(x=x.clone(), codec=fresh, gate=False)
        if rank == world - 1:
            args.update(kwargs)
        with pytest.raises(ConfigMismatchError, match=rf"\n  {name}: this rank has"):
            mf.all_reduce(**args)
    # and the group still works afterwards (constant groups travel exactly)
    y = torch.full((world * ROW,), float(rank), device=device)
    assert torch.equal(mf.all_reduce(y, codec=fresh, gate=False),
                       torch.full_like(y, float(world * (world - 1) // 2)))


# ---- CPU: gloo process groups of 2, 4 and 8 -----------------------------------------------------
def _world2(rank, world):
    battery(rank, world, "cpu")
    extra_checks(rank, world, "cpu")
    error_checks(rank, world, "cpu")
    # a gated size is torch's all-reduce, issued on the group directly (comm/direct.py), in
    # place, on the default group and on a subgroup
    x = make_input(rank, (3, 1000), torch.bfloat16, 97)
    want = x.clone()
    dist.all_reduce(want)
    gate = {"all_reduce": {"cpu": {"*": 1 << 40}}}
    y = x.clone()
    assert mf.all_reduce(y, codec=4, gate=gate) is y and torch.equal(y, want)
    sub = dist.new_group([0, 1])
    y = x.clone()
    assert torch.equal(mf.all_reduce(y, group=sub, codec=4, gate=gate), want)


def _world4(rank, world):
    """4 ranks as 2 groups of 2 (LOCAL_WORLD_SIZE=2): flat, and hierarchical == its spec."""
    battery(rank, world, "cpu", codecs=CODECS[::3], dtypes=(torch.bfloat16,),
            sizes=((7,), (4097,), (3, 5, 7)))
    for cfg, shape, dtype in ((mf.CodecConfig(bits=4), (4097,), torch.float32),
                              (mf.LinkCodecs(intra_node="bf16", inter_node=4), (9000,), torch.bfloat16),
                              (mf.LinkCodecs(intra_node=8, inter_node=mf.CodecConfig(bits=2, group_size=64)),
                               (2, 3000), torch.float16),
                              ({"intra_node": "fp8", "inter_node": 3}, (1,), torch.float32)):
        for topo in (None, 2):  # None: LOCAL_WORLD_SIZE
            got = check_case(rank, world, shape, dtype, cfg, 40, "cpu", bound=False, gate=False,
                             algorithm="hierarchical", topology=topo if topo else 2)
            x = make_input(rank, shape, dtype, 40)
            assert torch.equal(mf.all_reduce(x, codec=cfg, gate=False, algorithm="hierarchical",
                                             topology=topo), got)
    # the hierarchy sums the same values: within the flat bound of the outer codec doubled
    x = make_input(rank, (5000,), torch.float32, 41)
    inputs = [make_input(p, (5000,), torch.float32, 41) for p in range(world)]
    exact = sum(t.double() for t in inputs)
    got = mf.all_reduce(x, codec=6, gate=False, algorithm="hierarchical")
    assert bool(((got.double() - exact).abs() <= 2 * error_bound(inputs, mf.CodecConfig(bits=6))).all())
    with pytest.raises(HierarchyError, match="same number"):
        mf.all_reduce(torch.ones(10), codec=4, gate=False, algorithm="hierarchical", topology=3)


def _world8(rank, world):
    battery(rank, world, "cpu", codecs=[mf.CodecConfig(bits=b) for b in (2, 4, 8, "fp8", "bf16")],
            dtypes=(torch.float32, torch.bfloat16), sizes=((7,), (4097,)))
    for topo, cfg in ((2, mf.CodecConfig(bits=5)), (4, mf.LinkCodecs(intra_node=8, inter_node=4))):
        check_case(rank, world, (3, 4000), torch.bfloat16, cfg, 80 + topo, "cpu", bound=False,
                   gate=False, algorithm="hierarchical", topology=topo)
    # subgroups of 4 (2 nodes x 2 each): the inter-node stage masked on the subgroup (the
    # intra-node ones exist from the default group's hierarchy above), then on their own
    # stage groups (create_stage_groups, on every process)
    from moe_flashcomm.comm.hierarchical import create_stage_groups, hierarchical_groups
    ranks = [[0, 1, 2, 3], [4, 5, 6, 7]]
    groups = [dist.new_group(r) for r in ranks]
    group, grank = groups[rank // 4], rank % 4
    cfg = mf.LinkCodecs(intra_node=6, inter_node=mf.CodecConfig(bits=3, group_size=32))
    inputs = [make_input(p, (5000,), torch.float32, 85) for p in range(4)]
    want = reference_all_reduce(inputs, cfg, local_size=2)
    for kind in ("masked", "own group"):
        if kind == "own group":
            create_stage_groups(ranks, topology=2)
        y = make_input(grank, (5000,), torch.float32, 85)
        mf.all_reduce(y, group=group, codec=cfg, gate=False, algorithm="hierarchical", topology=2)
        assert torch.equal(y, want), kind
        h = hierarchical_groups(group, 2)
        assert h.kind("inter") == kind and h.kind("intra") == "own group", h


def test_all_reduce_gloo_2():
    spawn(_world2, 2)


def test_all_reduce_gloo_4_hierarchical():
    spawn(_world4, 4, env={"LOCAL_WORLD_SIZE": 2})


def _hierarchical_switch(rank, world):
    """Over gloo the hierarchical all-reduce's stages name their records' dtype and codec
    in their headers: a rank that switches to a dtype or codec every rank has used before
    (first-use checks pass), with records of the same size, makes every rank raise in that
    call, and the group works afterwards. (The stages' headers named raw bytes: the ranks
    decoded each other's records as garbage, ending with different tensors, or one rank
    failed in the decode while the others waited for it until the timeout.)"""
    a = mf.CodecConfig(bits=3, group_size=64, spikes=True)
    b = mf.CodecConfig(bits=4, group_size=128, spikes=False)
    assert mf.record_bytes(ROW, a) == mf.record_bytes(ROW, b)
    comm = mf.Communicator(gate=False, topology=2, timeout=30)
    x = make_input(rank, (3000,), torch.float32, 50)
    links = mf.LinkCodecs(intra_node=8, inter_node=a), mf.LinkCodecs(intra_node=8, inter_node=b)
    for codec in (a, b) + links:
        for dtype in (torch.bfloat16, torch.float16):
            comm.all_reduce(x.to(dtype), codec, algorithm="hierarchical")
    cases = (("codec", (a if rank == 3 else b), torch.bfloat16, "the codecs differ"),
             ("inter_node codec", links[rank == 3], torch.bfloat16, "the codecs differ"),
             ("dtype", b, torch.float16 if rank == 3 else torch.bfloat16,
              "torch.float16 values as records"))
    for what, codec, dtype, says in cases:
        with pytest.raises(ConfigMismatchError) as err:
            comm.all_reduce(x.to(dtype), codec, algorithm="hierarchical")
        msg = str(err.value)
        # the ranks that meet rank 3 name what differs; the others, that it was found
        assert says in msg or "found ranks disagreeing" in msg, (what, msg)
    y = x.to(torch.bfloat16)
    comm.all_reduce(y, b, algorithm="hierarchical")
    inputs = [make_input(p, (3000,), torch.float32, 50).to(torch.bfloat16) for p in range(world)]
    assert torch.equal(y, reference_all_reduce(inputs, b, local_size=2))
    comm.close()


def test_all_reduce_gloo_4_hierarchical_switch():
    spawn(_hierarchical_switch, 4, timeout=300)


def test_all_reduce_gloo_8():
    spawn(_world8, 8)


def test_reference_is_exact_for_passthrough_of_integers():
    """Sanity of the specification: small integers survive bf16 passthrough, so the
    reference sum is exact; and hierarchical == flat with one group."""
    xs = [torch.arange(5000, dtype=torch.float32) % 7 + p for p in range(4)]
    want = sum(xs)
    assert torch.equal(reference_all_reduce(xs, "bf16"), want)
    assert torch.equal(reference_all_reduce(xs, "bf16", local_size=2), want)
    assert torch.equal(reference_all_reduce(xs, 4, local_size=4), reference_all_reduce(xs, 4))
    links = mf.LinkCodecs(intra_node=8, inter_node=2)  # one group: no inter-group link
    assert torch.equal(reference_all_reduce(xs, links, local_size=4), reference_all_reduce(xs, 8))
    # what all_reduce refuses, the specification refuses too
    for codec, local, error in ((links, None, "per-link codecs .* need local_size"),
                                (mf.CodecConfig(bits=4, rounding="stochastic"), None,
                                 "codec: .* rounding='nearest'"),
                                (mf.LinkCodecs(intra_node=mf.CodecConfig(bits=4, rounding="stochastic"),
                                               inter_node=4), 2, "codec.intra_node: .* rounding"),
                                (mf.LinkCodecs(intra_node="native", inter_node=4), 2,
                                 "codec.intra_node: a 'native' all-reduce")):
        with pytest.raises(ValueError, match=error):
            reference_all_reduce(xs, codec, local_size=local)


# ---- the fused kernel against the torch reduction -------------------------------------------------
FUSED_CODECS = [mf.CodecConfig(bits=b, group_size=g, spikes=s)
                for b, g, s in itertools.product(range(2, 9), (32, 128, 256), (True, False))]
FUSED_CODECS += [mf.CodecConfig(bits="fp8", group_size=g) for g in (32, 128)]
FUSED_CODECS += [mf.CodecConfig(bits="bf16")]  # the passthrough: reduce_cast


def peer_records(P: int, rank: int, m: int, cfg, dtype, seed: int):
    """(peers uint8 [P - 1, m, rb], own [m, ROW]) for a reduction at ``rank`` of ``P``:
    hostile rows (outliers, constants, zeros, ties, huge and tiny ranges) among normal ones."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for p in range(P):
        x = torch.randn(m, ROW, generator=g) * 10.0 ** torch.randint(-3, 4, (m, 1), generator=g)
        x[0, :: 97] = 1e4
        if m > 1:
            x[1] = 3.0
        if m > 2:
            x[2] = torch.randint(-2, 3, (ROW,), generator=g).float()
        if m > 3:  # huge ranges (the kernels' slow division path where the dtype allows)
            x[3] = (torch.rand(ROW, generator=g) - 0.5) * torch.finfo(dtype).max / (4 * P)
        vals.append(x.to(dtype))
    peers = [mf.encode(vals[p], cfg) for p in range(P) if p != rank]
    stacked = torch.stack(peers) if peers else torch.empty(0, m, mf.record_bytes(ROW, cfg),
                                                           dtype=torch.uint8)
    return stacked, vals[rank]


@pytest.fixture(scope="module")
def compiled():
    """Every fused kernel (and the codec kernels) compiled once, NVRTC in parallel."""
    from moe_flashcomm.comm.all_reduce import precompile
    precompile(FUSED_CODECS + CODECS)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", FUSED_CODECS, ids=str)
def test_fused_reduce_matches_torch_reduction(cfg, compiled):
    """csrc/allreduce.cu == reduce_chunk's torch definition == the CPU reference, byte for
    byte (records) and bit for bit (the reduce-only variant of the hierarchy)."""
    for (P, rank), dtype in itertools.product(((1, 0), (2, 0), (2, 1), (3, 1), (8, 5)), DTYPES):
        peers, own = peer_records(P, rank, 37, cfg, dtype, seed=P * 10 + rank)
        what = f"{cfg} {dtype} P={P} rank={rank}"
        for requant in (True, False):
            want = reduce_chunk(peers, own, rank, cfg, requant=requant)  # CPU reference
            unfused = reduce_chunk(peers.cuda(), own.cuda(), rank, cfg, requant=requant, fused=False)
            fused = reduce_chunk(peers.cuda(), own.cuda(), rank, cfg, requant=requant)
            assert torch.equal(unfused.cpu(), want), what + " unfused"
            if not torch.equal(fused.cpu(), want):
                diff = (fused.cpu() != want).nonzero()[:5].tolist()
                raise AssertionError(f"{what} requant={requant}: fused differs at {diff}")


# ---- GPU: NCCL, 2 GPUs -------------------------------------------------------------------------------
def _nccl2(rank, world):
    battery(rank, world, "cuda")
    extra_checks(rank, world, "cuda")
    error_checks(rank, world, "cuda")
    # large tensors: the automatic pipeline (several ranges) gives the chunks=1 bits, and
    # a gated size goes through NCCL unchanged
    x = make_input(rank, (1 << 25,), torch.bfloat16, 95).cuda()
    for cfg in (mf.CodecConfig(bits=4), mf.CodecConfig(bits=2), mf.CodecConfig(bits="fp8")):
        one = mf.all_reduce(x.clone(), codec=cfg, gate=False, chunks=1)
        assert torch.equal(mf.all_reduce(x.clone(), codec=cfg, gate=False), one), cfg
        assert all(torch.equal(o, one) for o in gather_all(one))
    nccl = x.clone()
    dist.all_reduce(nccl)
    path = "nvlink" if not os.environ.get("NCCL_P2P_DISABLE") else "host"
    assert torch.equal(mf.all_reduce(x.clone(), codec=4, gate={"all_reduce": {path: {"*": 1 << 40}}}), nccl)
    # the hierarchical all-reduce on NCCL (2 GPUs as 2 groups of 1 and 1 group of 2)
    for topo in (1, 2):
        check_case(rank, world, (3, 5000), torch.bfloat16, mf.CodecConfig(bits=4), 96, "cuda",
                   bound=False, gate=False, algorithm="hierarchical", topology=topo)
    torch.cuda.synchronize()


def _masked_stages_cuda(rank, world):
    """CUDA tensors over gloo, 8 processes sharing one GPU: the hierarchical all-reduce on
    subgroups of 4 (2 nodes x 2) whose stages have no process groups of their own, so both
    run masked on the subgroup, with stamped records (the all-gathers once passed the
    stamp, an int, where the stage's keywords belong: TypeError on every rank)."""
    from moe_flashcomm.comm.hierarchical import hierarchical_groups
    torch.cuda.set_device(0)
    groups = [dist.new_group(r) for r in ([0, 1, 2, 3], [4, 5, 6, 7])]
    group, grank = groups[rank // 4], rank % 4
    inputs = [make_input(p, (5000,), torch.float32, 98) for p in range(4)]
    links = mf.LinkCodecs(intra_node=8, inter_node=mf.CodecConfig(bits=3, group_size=32))
    for codec in (6, links):
        y = inputs[grank].cuda()
        mf.all_reduce(y, group=group, codec=codec, gate=False, algorithm="hierarchical",
                      topology=2)
        assert torch.equal(y.cpu(), reference_all_reduce(inputs, codec, local_size=2)), codec
    h = hierarchical_groups(group, 2)
    assert h.kind("intra") == h.kind("inter") == "masked", h
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_all_reduce_masked_stages_cuda_gloo_8():
    spawn(_masked_stages_cuda, 8, timeout=300)


@pytest.mark.multigpu
def test_all_reduce_nccl_2(compiled):
    spawn(_nccl2, 2, backend="nccl")


def _graphs_nccl2(rank, world):
    """The quantized all-reduce captured once in a CUDA graph and replayed: every replay
    gives the bits an eager call gives on the same data (nothing of one call's host state
    reaches the kernels). Flat in one and in two pipeline ranges, and hierarchical; a numel
    that needs padding."""
    n = (1 << 20) + 300
    cfg = mf.CodecConfig(bits=4)
    for kwargs in (dict(chunks=1), dict(chunks=2), dict(algorithm="hierarchical", topology=1)):
        static = make_input(rank, (n,), torch.bfloat16, 120).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: plans, NCCL, stage groups
            for _ in range(2):
                mf.all_reduce(static.clone(), codec=cfg, gate=False, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mf.all_reduce(static, codec=cfg, gate=False, **kwargs)  # in place
        for seed in range(130, 136):
            x = make_input(rank, (n,), torch.bfloat16, seed).cuda()
            static.copy_(x)
            graph.replay()
            eager = mf.all_reduce(x.clone(), codec=cfg, gate=False, **kwargs)
            torch.cuda.synchronize()
            assert torch.equal(static, eager), (kwargs, seed)
        del graph
        torch.cuda.synchronize()


@pytest.mark.multigpu
def test_all_reduce_graph_capture_nccl_2(compiled):
    spawn(_graphs_nccl2, 2, backend="nccl")
