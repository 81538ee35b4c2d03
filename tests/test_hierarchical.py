"""Hierarchical all-to-all over real gloo process groups (CPU) and NCCL (2 GPUs).

The hierarchical algorithm quantizes once at the source and only forwards bytes, so its
output must be bit-identical to the flat algorithm's for the same codecs, forward and
backward. Topologies are simulated on one host: LOCAL_WORLD_SIZE or an explicit Topology.
Many cases run inside one spawn (CI has 2 cores).
"""
from __future__ import annotations

import datetime
import os
import re

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.comm import hierarchical as hmod
from moe_flashcomm.comm.all_reduce import reference_all_reduce
from moe_flashcomm.comm.hierarchical import (HierarchyError, LinkModel, block_order,
                                             create_stage_groups, hierarchical_groups,
                                             predict, prefer_hierarchical, traffic)
from tests.a2a_cases import expected, make_input, split_matrix
from tests.distributed import free_port, spawn

BF16, INT4, INT2 = mf.CodecConfig(bits="bf16"), mf.CodecConfig(bits=4), mf.CodecConfig(bits=2)
CODECS = [BF16, mf.CodecConfig(bits="fp8"), INT4, INT2,
          mf.LinkCodecs(intra_node="bf16", inter_node=4),  # bf16 inside a node, int4 across
          mf.LinkCodecs(intra_node=8, inter_node=mf.CodecConfig(bits=2, group_size=64))]


class Counter:
    """Counts the hierarchical exchanges this process starts (to see what "auto" chose)."""

    def __init__(self) -> None:
        self.calls, self._real = 0, hmod.exchange

    def __enter__(self):
        def counted(*args, **kw):
            self.calls += 1
            return self._real(*args, **kw)
        hmod.exchange = counted
        return self

    def __exit__(self, *exc):
        hmod.exchange = self._real


def both(x, out_s, in_s, group=None, **kw):
    """(flat, hierarchical) outputs of the same call; the second is checked to have run
    the hierarchical exchange."""
    flat = mf.all_to_all(x, out_s, in_s, group=group, algorithm="flat", **kw)
    with Counter() as c:
        hier = mf.all_to_all(x, out_s, in_s, group=group, algorithm="hierarchical", **kw)
    assert c.calls == 1
    return flat, hier


def check_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.equal(a, b), f"{what}: max diff {(a.float() - b.float()).abs().max()}"


# ---- the CPU battery, run for every simulated topology ---------------------------------------
def battery(rank, world, local, topology=None, group=None, granks=None, device="cpu",
            light=False):
    """Hierarchical == flat, bit for bit, on group ``group`` (group rank ``rank`` of
    ``world``; ``local`` ranks per node; ``granks`` the group's global ranks)."""
    granks = granks or list(range(world))
    me = granks[rank]
    kw = dict(topology=topology, gate=False)
    seed = 0
    kinds = ("uneven", "zeros") if light else ("even", "uneven", "zeros", "empty")
    for kind in kinds:
        for i, codec in enumerate(CODECS[::2] if light else CODECS):
            dtype = (torch.bfloat16, torch.float32, torch.float16)[(i + seed) % 3]
            seed += 1
            S = split_matrix(world, kind, seed)
            x = make_input(me, sum(S[rank]), (64,), dtype, seed).to(device)
            out_s = [S[p][rank] for p in range(world)]
            flat, hier = both(x, out_s, S[rank], group=group, codec=codec, **kw)
            check_equal(flat, hier, f"{kind} {codec} {dtype}")

    # against the reference codec, not only against flat: per-link codecs, uneven splits
    S = split_matrix(world, "uneven", 70)
    out_s = [S[p][rank] for p in range(world)]
    intra, inter = mf.CodecConfig(bits=8), mf.CodecConfig(bits=3, group_size=32)
    x = make_input(me, sum(S[rank]), (2, 48), torch.float32, 70).to(device)
    y = mf.all_to_all(x, out_s, S[rank], group=group, algorithm="hierarchical", codec=mf.LinkCodecs(intra, inter), **kw)
    want = expected(rank, world, S, (2, 48), torch.float32, 70,
                    lambda p: intra if p // local == rank // local else inter, granks)
    check_equal(y.cpu(), want, "vs reference")

    # no split sizes: the intermediate's counts are derived (no count exchange); [N, C, H]
    for codec in (INT4, mf.LinkCodecs(intra_node="bf16", inter_node=2)):
        x = make_input(me, 3 * world, (2, 64), torch.bfloat16, 71).to(device)
        flat, hier = both(x, None, None, group=group, codec=codec, **kw)
        check_equal(flat, hier, f"even, no split sizes, {codec}")
        # and the same splits passed explicitly (count exchange) give the same bytes
        even = [3] * world
        check_equal(mf.all_to_all(x, even, even, group=group, codec=codec, algorithm="hierarchical", **kw),
                    hier, "explicit even splits")
    if light:
        return

    # size gate per pair: small pairs go bf16, others int4: wires of different widths pass
    # the same intermediate (gathered in gcd-sized units)
    H = 64
    S = [[(1 + (3 * p + 5 * q) % 7) if p != q else 2 for q in range(world)] for p in range(world)]
    out_s = [S[p][rank] for p in range(world)]
    gate = {"cpu": {"int4": 4 * H * 2, "int2": 6 * H * 2}}
    for dtype in (torch.bfloat16, torch.float32):
        for codec in (INT4, mf.LinkCodecs(intra_node=4, inter_node=2)):
            x = make_input(me, sum(S[rank]), (H,), dtype, 72).to(device)
            flat, hier = both(x, out_s, S[rank], group=group, codec=codec, topology=topology, gate=gate)
            check_equal(flat, hier, f"gated {codec} {dtype}")

    # async
    S = split_matrix(world, "uneven", 73)
    out_s = [S[p][rank] for p in range(world)]
    x = make_input(me, sum(S[rank]), (64,), torch.float32, 73).to(device)
    sync = mf.all_to_all(x, out_s, S[rank], group=group, codec=INT2, algorithm="hierarchical", **kw)
    handle = mf.all_to_all(x, out_s, S[rank], group=group, codec=INT2, algorithm="hierarchical",
                           async_op=True, **kw)
    check_equal(handle.wait(), sync, "async")
    check_equal(sync, mf.all_to_all(x, out_s, S[rank], group=group, codec=INT2, **kw), "async vs flat")

    backward(rank, world, me, group, topology, device)
    auto(rank, world, me, local, group, topology, device)


def backward(rank, world, me, group, topology, device):
    """The backward (the reverse hierarchical exchange of the gradient, grad codec per
    link) is bit-identical to the flat algorithm's, with and without split sizes."""
    links = mf.LinkCodecs(intra_node="bf16", inter_node=4)
    grad_links = mf.LinkCodecs(intra_node="bf16", inter_node=mf.CodecConfig(bits=6, group_size=64))
    for splits in ("uneven", "zeros", None):
        S = split_matrix(world, splits, 80) if splits else [[2] * world] * world
        out_s = [S[p][rank] for p in range(world)]
        grads = {}
        for algorithm in ("flat", "hierarchical"):
            x = make_input(me, sum(S[rank]), (2, 64), torch.float32, 81).to(device).requires_grad_()
            a = dict(output_split_sizes=out_s, input_split_sizes=S[rank]) if splits else {}
            with Counter() as c:
                y = mf.all_to_all(x, group=group, codec=links, grad_codec=grad_links,
                                  topology=topology, gate=False, algorithm=algorithm, **a)
                gy = make_input(me + 100, y.shape[0], (2, 64), torch.float32, 82).to(device)
                (y * gy).sum().backward()
            assert c.calls == (2 if algorithm == "hierarchical" else 0), c.calls
            grads[algorithm] = (y.detach(), x.grad)
        check_equal(grads["flat"][0], grads["hierarchical"][0], f"forward {splits}")
        check_equal(grads["flat"][1], grads["hierarchical"][1], f"backward {splits}")
        # with bf16 on every link the gradient is exact (constants too)
        x = make_input(me, sum(S[rank]), (64,), torch.bfloat16, 83).to(device).requires_grad_()
        a = dict(output_split_sizes=out_s, input_split_sizes=S[rank]) if splits else {}
        y = mf.all_to_all(x, group=group, codec="bf16", grad_codec="bf16", topology=topology,
                          algorithm="hierarchical", **a)
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, torch.ones_like(x))


def auto(rank, world, me, local, group, topology, device):
    """"auto" chooses hierarchical for small messages on >= 2 nodes of >= 2 ranks (the
    model's rule), flat otherwise, the same on every rank; results equal either way."""
    nodes = world // local
    S = split_matrix(world, "uneven", 90)
    out_s = [S[p][rank] for p in range(world)]
    x = make_input(me, sum(S[rank]), (64,), torch.float32, 90).to(device)
    ref = mf.all_to_all(x, out_s, S[rank], group=group, codec=INT4, topology=topology, gate=False)
    for a in (dict(output_split_sizes=out_s, input_split_sizes=S[rank]), {}):
        xx = x if a else make_input(me, 2 * world, (64,), torch.float32, 91).to(device)
        with Counter() as c:
            y = mf.all_to_all(xx, group=group, codec=INT4, topology=topology, gate=False,
                              algorithm="auto", **a)
        assert c.calls == (1 if nodes >= 2 and local >= 2 else 0), (c.calls, nodes, local)
        if a:
            check_equal(y, ref, "auto")
        else:
            check_equal(y, mf.all_to_all(xx, group=group, codec=INT4, topology=topology, gate=False), "auto even")


def check_groups(rank, world, local, topology, kinds, group=None):
    """The two stages: this node's ranks, and the ranks of this local rank, run as
    ``kinds`` ("skipped", "group", "own group", "masked"); cached."""
    h = hierarchical_groups(group, topology)
    assert h is hierarchical_groups(group, topology)
    granks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    n, l = divmod(rank, local)
    assert (h.nodes, h.local, h.node, h.local_rank) == (world // local, local, n, l)
    for stage, want, kind in (("intra", granks[n * local:(n + 1) * local], kinds[0]),
                              ("inter", granks[l::local], kinds[1])):
        pg, peers, _ = h.stages[stage]
        assert [granks[p] for p in peers] == want and h.kind(stage) == kind, (stage, h)
        if kind == "own group":
            assert dist.get_process_group_ranks(pg) == want


# ---- spawns ------------------------------------------------------------------------------------
def _world4(rank, world, port):
    """2 nodes x 2 ranks from LOCAL_WORLD_SIZE=2; then explicit degenerate topologies; last,
    the default group made again (``reinit``)."""
    os.environ["LOCAL_RANK"] = str(rank % 2)
    check_groups(rank, world, 2, None, ("own group", "own group"))
    battery(rank, world, 2)
    # 4 x 1 (every rank its own node: only the inter-node stage, on the group itself) and
    # 1 x 4 (one node: only the intra-node stage): no new process group
    for local, kinds in ((1, ("skipped", "group")), (4, ("group", "skipped"))):
        topo = mf.Topology(local)
        check_groups(rank, world, local, topo, kinds)
        battery(rank, world, local, topology=topo, light=True)
    error_checks(rank, world)
    reinit(rank, world, port)


def reinit(rank, world, port):
    """After destroy_process_group() and init_process_group() with every rank in another's
    place, the hierarchical algorithms make the new job's stage groups: those of the old
    job are dead, and where a process was a non-member it holds a placeholder, not a group
    (it raised AttributeError / KeyError, or ran on destroyed groups)."""
    dist.destroy_process_group()
    new = (rank + 1) % world
    os.environ["LOCAL_RANK"] = str(new % 2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=new,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    check_groups(new, world, 2, 2, ("own group", "own group"))
    x = make_input(new, 3 * world, (64,), torch.float32, 96)
    flat, hier = both(x, None, None, codec=INT4, topology=2, gate=False)
    check_equal(flat, hier, "after re-init")
    y = make_input(new, 5000, (), torch.float32, 97)
    inputs = [make_input(p, 5000, (), torch.float32, 97) for p in range(world)]
    mf.all_reduce(y, codec=4, gate=False, algorithm="hierarchical", topology=2)
    assert torch.equal(y, reference_all_reduce(inputs, 4, local_size=2))


def _world8(rank, world):
    """2 x 4 (LOCAL_WORLD_SIZE=4) and 4 x 2 (explicit Topology) on 8 processes, and
    subgroups: two 2 x 2 groups side by side (masked stages, then their own stage groups
    from create_stage_groups), a 4 x 1 group and a ragged one."""
    os.environ["LOCAL_RANK"] = str(rank % 4)
    check_groups(rank, world, 4, None, ("own group", "own group"))
    battery(rank, world, 4)
    two = mf.Topology(local_size=2)
    check_groups(rank, world, 2, two, ("own group", "own group"))
    battery(rank, world, 2, topology=two)

    halves = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    evens = dist.new_group([0, 2, 4, 6])
    ragged = dist.new_group([0, 1, 2, 4])  # nodes {0, 1}, {2}, {4}
    half, hranks = halves[rank // 4], [4 * (rank // 4) + i for i in range(4)]
    # no stage groups of their own yet: the intra-node pairs exist (from the 4 x 2 job
    # above), the inter-node ones ({0, 2}, ...) do not: masked on the half
    check_groups(rank % 4, 4, 2, two, ("own group", "masked"), group=half)
    battery(rank % 4, 4, 2, topology=two, group=half, granks=hranks, light=True)
    create_stage_groups([[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 4]], two)  # every process
    check_groups(rank % 4, 4, 2, two, ("own group", "own group"), group=half)
    battery(rank % 4, 4, 2, topology=two, group=half, granks=hranks, light=True)
    if rank % 2 == 0:
        check_groups(rank // 2, 4, 1, two, ("skipped", "group"), group=evens)
        battery(rank // 2, 4, 1, topology=two, group=evens, granks=[0, 2, 4, 6], light=True)
    if rank in (0, 1, 2, 4):
        x = torch.randn(8, 32)
        with pytest.raises(HierarchyError, match="same number of the group's ranks"):
            mf.all_to_all(x, group=ragged, topology=two, algorithm="hierarchical")
        with Counter() as c:  # auto: flat on a ragged group
            y = mf.all_to_all(x, group=ragged, topology=two, algorithm="auto", codec="bf16")
        assert c.calls == 0 and y.shape == x.shape
    dist.barrier()


def error_checks(rank, world):
    # stage groups of ranks that cannot be: refused on every process before any is made
    for groups, error, said in (([0, 1, 2, 3], TypeError, "each a list of distinct global"),
                                ([[0, 1, 2, 9]], ValueError, "in 0..3 (the job's world size"),
                                ([[0, 0, 1, 1]], ValueError, "must hold distinct global ranks"),
                                ([[0, 1], [2, True]], TypeError, "got the group [2, True]")):
        with pytest.raises(error, match=re.escape(said)):
            create_stage_groups(groups, 2)
    x = torch.randn(4 * world, 32)
    with pytest.raises(ValueError, match="algorithm must be one of .*hierarchical"):
        mf.all_to_all(x, algorithm="tree")
    # split sizes given on some ranks and not on others: the intermediate hop would derive
    # counts on some ranks only -> detected on every rank, no hang (the first time a
    # configuration is used: hidden size 40 is new here)
    x = torch.randn(4 * world, 40)
    a = dict(output_split_sizes=[4] * world, input_split_sizes=[4] * world) if rank == 0 else {}
    with pytest.raises(mf.comm.ConfigMismatchError, match="split_sizes_given"):
        mf.all_to_all(x, codec=4, algorithm="hierarchical", gate=False, **a)


def test_hierarchical_gloo_2x2():
    spawn(_world4, 4, free_port(), env={"LOCAL_WORLD_SIZE": 2})


def test_hierarchical_gloo_2x4_4x2_subgroups():
    spawn(_world8, 8, env={"LOCAL_WORLD_SIZE": 4})


def test_stage_sizes_agree_with_and_without_stamps():
    """Every rank's plans of the two stages, made apart (as on CUDA: no headers), agree on
    every message's size (NCCL's send and receive counts must match): what a source sends
    to each node peer is what that peer expects in stage 1, and what a forwarder sends each
    node is what the destination expects in stage 2. With stamps (CUDA's default) each pair
    of records grows by 16 bytes, raw pairs (bf16 passthrough of bf16 rows) do not."""
    from moe_flashcomm import kernels
    from moe_flashcomm.comm.exchange import Route
    nodes, local, H, dtype = 2, 3, 256, torch.bfloat16
    W = nodes * local
    lay = hmod.Layout(tuple(range(W)), nodes, local, True)
    S = [[(3 * p + 5 * q) % 4 + (p == q) for q in range(W)] for p in range(W)]
    for intra in (mf.CodecConfig(bits=8), mf.CodecConfig(bits="bf16")):
        codecs = [tuple(intra if p // local == r // local else mf.CodecConfig(bits=4)
                        for p in range(W)) for r in range(W)]
        sent = {}
        for pages in (None, {}):
            hs = [hmod.Hierarchy(None, lay, r, "gloo") for r in range(W)]
            routes = [Route(None, r, W, codecs[r], (0,) * W, pages=pages) for r in range(W)]
            src = [hmod._source_plan(hs[r], routes[r], tuple(S[r]),
                                     tuple(S[p][r] for p in range(W)), H, dtype,
                                     torch.device("cpu")) for r in range(W)]
            for f in range(W):
                n, lr = divmod(f, local)
                counts = tuple(tuple(S[n * local + l][m * local + lr] for m in range(nodes))
                               for l in range(local))
                hop = hmod._hop_plan(hs[f], routes[f], counts, H, dtype, torch.device("cpu"))
                for l in range(local):  # stage 1: node rank l -> f
                    assert src[n * local + l].send1[lr] == hop.recv1[l], (intra, pages, f, l)
                for m in range(nodes):  # stage 2: f -> (m, lr)
                    assert hop.send2[m] == src[m * local + lr].recv2[n], (intra, pages, f, m)
            sent[pages is not None] = [sum(p.send1) for p in src]
        records = [sum(1 for q in range(W) if q != r and S[r][q] and
                       (q // local != r // local or not intra.is_passthrough)) for r in range(W)]
        assert [b - a for a, b in zip(sent[False], sent[True])] == \
            [kernels.STAMP_BYTES * k for k in records], intra


# ---- no processes: the gather permutation and the model ------------------------------------------
def test_block_order():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 9, (1,), generator=g))
        unit = int(torch.randint(1, 5, (1,), generator=g)) * 16
        sizes = [unit * int(v) * int(z) for v, z in zip(torch.randint(1, 5, (n,), generator=g),
                                                          torch.rand(n, generator=g) < 0.7)]
        order = torch.randperm(n, generator=g).tolist()
        buf = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=g)
        u, index = block_order(sizes, order)
        got = buf if index is None else buf.view(-1, u).index_select(0, index).view(-1)
        starts = [sum(sizes[:b]) for b in range(n)]
        want = torch.cat([buf[starts[b]:starts[b] + sizes[b]] for b in order] + [buf[:0]])
        assert torch.equal(got, want), (sizes, order)
        if index is not None:
            assert u % unit == 0 and index.numel() == sum(sizes) // u
    assert block_order([5, 0, 7], [0, 1, 2])[1] is None
    assert block_order([5, 0, 7], [1, 0, 2])[1] is None  # empty blocks do not count


def test_traffic_and_model():
    # 2 nodes x 4 ranks, 100 bytes per intra pair, 10 per inter pair
    f = traffic("flat", 2, 4, 100, 10)
    h = traffic("hierarchical", 2, 4, 100, 10, count_exchange=True)
    assert (f.intra_msgs, f.intra_bytes, f.inter_msgs, f.inter_bytes) == (3, 300, 4, 40)
    assert (h.intra_msgs, h.intra_bytes, h.inter_msgs, h.inter_bytes) == (3, 3 * 110, 1, 40)
    assert h.gather_bytes == 2 * (300 + 40) and h.count_msgs == 3
    m = LinkModel(intra_alpha=1.0, intra_beta=100.0, inter_alpha=10.0, inter_beta=1.0,
                  mem_beta=1e9, codec_beta=1e9)
    assert predict("flat", f, m)["total"] == pytest.approx(max(3 + 3, 4 * 10 + 40))
    p = predict("hierarchical", h, m)
    assert p["total"] == pytest.approx((3 + 3) * 1 + 3.3 + 1 * 10 + 40 + 2 * 680 / 1e9)
    # the auto rule: small per-pair messages on a real hierarchy only
    assert prefer_hierarchical(16, 8, 1 << 10, 1 << 10)
    assert not prefer_hierarchical(2, 8, 64 << 20, 64 << 20)
    assert not prefer_hierarchical(16, 1, 1, 1) and not prefer_hierarchical(1, 8, 1, 1)
    # more nodes save more inter-node latencies: the crossover grows with the node count
    sizes = [1 << k for k in range(10, 28)]
    cross = [max([s for s in sizes if prefer_hierarchical(n, 8, s, s)], default=0) for n in (2, 4, 16)]
    assert cross[0] < cross[1] < cross[2], cross


# ---- GPU: 2 GPUs as 2 nodes x 1 GPU (the degenerate hierarchy) ----------------------------------
def _nccl_2x1(rank, world):
    os.environ["LOCAL_RANK"] = "0"  # one GPU per "node"
    h = hierarchical_groups(None, None)  # LOCAL_WORLD_SIZE=1: no group created
    assert (h.nodes, h.local, h.kind("intra"), h.kind("inter")) == (2, 1, "skipped", "group")
    g = torch.Generator().manual_seed(5)
    for kind in ("even", "uneven", "zeros"):
        S = split_matrix(world, kind, 3)
        out_s = [S[p][rank] for p in range(world)]
        for codec in (BF16, INT4, INT2, mf.CodecConfig(bits="fp8")):
            for dtype in (torch.bfloat16, torch.float32):
                x = make_input(rank, sum(S[rank]), (7168,), dtype, 4).cuda()
                flat, hier = both(x, out_s, S[rank], codec=codec, gate=False)
                check_equal(flat, hier, f"nccl {kind} {codec} {dtype}")
    x = torch.randn(4096, 7168, generator=g).bfloat16().cuda()
    flat, hier = both(x, None, None, codec=INT4)
    check_equal(flat, hier, "nccl large even")
    with Counter() as c:  # auto: flat on 2 x 1
        check_equal(mf.all_to_all(x, codec=INT4, algorithm="auto"), flat, "nccl auto")
    assert c.calls == 0
    # 1 x 2: only the intra-node stage, with the count exchange (int64 on NCCL)
    S = split_matrix(world, "uneven", 6)
    out_s = [S[p][rank] for p in range(world)]
    x = make_input(rank, sum(S[rank]), (7168,), torch.bfloat16, 6).cuda()
    links = mf.LinkCodecs(intra_node=INT4, inter_node=INT2)
    flat, hier = both(x, out_s, S[rank], codec=links, gate=False, topology=mf.Topology(2))
    check_equal(flat, hier, "nccl 1x2")
    backward(rank, world, rank, None, None, "cuda")
    torch.cuda.synchronize()


@pytest.mark.multigpu
def test_hierarchical_nccl_2x1():
    spawn(_nccl_2x1, 2, backend="nccl", env={"LOCAL_WORLD_SIZE": 1})
