"""Stamped exchanges on GPUs: the all-to-all of CUDA tensors that NCCL (here gloo, with two to
four processes sharing one GPU and the peer-to-peer transport off) carries. Every pair's
records travel behind a stamp that the receiving decode kernel checks (exchange.StampedCall,
p2p_exchange's LOCAL variant in csrc/p2p.cu). Checked: bit-identical to the codec (even and
uneven splits, several codecs and dtypes, pipelined chunks, forward and backward, raw pairs
and records that are not 16-byte aligned mixed in, the passthrough's casts of fp32 rows), and
ranks that disagree where the first-use check cannot see it (codecs of the same record size,
stochastic against nearest rounding, a dtype of the same size): both ranks of the pair raise
at their next call, or at ``check()``, and the group works afterwards. The all-reduce's
reduce-scatters carry the same stamps, checked by its fused reductions; the hierarchical one
passes what its stages saw on to every rank."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm.codec import record_bytes
from moe_flashcomm.comm import ConfigMismatchError, hierarchical
from moe_flashcomm.comm.all_reduce import ROW, reference_all_reduce, rows_per_rank
from tests.distributed import spawn
from tests.test_all_reduce import make_input as reduce_input
from tests.test_all_to_all import make_input
from tests.test_p2p_gpu import CODECS, want

pytestmark = pytest.mark.cuda
ENV = {"MOE_FLASHCOMM_P2P": "0", "MOE_FLASHCOMM_STAMPS": "1"}  # NCCL's path, stamped


def _stamped_calls(comm) -> list:
    """The StampedCalls a communicator has made, both directions."""
    return [call for fwd, bwd in comm._setups.values() for route in (fwd, bwd)
            for plan in route.plans.values() for call in plan.stamped_calls.values()]


def _kwargs(S, rank, world):
    return dict(input_split_sizes=S[rank], output_split_sizes=[S[p][rank] for p in range(world)])


def exactness(rank, world, comm):
    even = [[4] * world for _ in range(world)]
    uneven = [[(3 * p + 5 * q) % 7 + (p == 0) for q in range(world)] for p in range(world)]
    for i, cfg in enumerate(CODECS):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for S in (even, uneven):
                for chunks in (1, 2):
                    x = make_input(rank, sum(S[rank]), (1024,), dtype, 40 + i).cuda()
                    got = comm.all_to_all(x, codec=cfg, chunks=chunks, **_kwargs(S, rank, world))
                    assert torch.equal(got, want(rank, world, S, 40 + i, dtype, cfg, 1024)), \
                        (cfg, dtype, S, chunks)
    calls = _stamped_calls(comm)  # encodes and decodes through p2p_exchange launches
    assert calls and all(send[0] and recv[0] for c in calls for send, recv in c.chunks)
    # the passthrough's casts of fp32 rows to bf16 (encode_cast / decode_cast as
    # p2p_exchange's tasks, behind stamps), the size gate's passthrough pairs alike (every
    # pair under the default threshold here), and 16-bit rows as they are
    passthrough = mf.CodecConfig(bits="bf16")
    with mf.Communicator() as gated:
        for (i, dtype), S in itertools.product(
                enumerate((torch.bfloat16, torch.float32, torch.float16)), (even, uneven)):
            x = make_input(rank, sum(S[rank]), (1024,), dtype, 45 + i).cuda()
            expected = want(rank, world, S, 45 + i, dtype, passthrough, 1024)
            assert torch.equal(comm.all_to_all(x, codec="bf16", **_kwargs(S, rank, world)),
                               expected), (dtype, S)
            assert torch.equal(gated.all_to_all(x, codec=4, **_kwargs(S, rank, world)),
                               expected), (dtype, S)
        calls = _stamped_calls(gated)
        assert calls and all(send[0] and recv[0] for c in calls for send, recv in c.chunks)


def backward(rank, world, comm):
    """The gradient's exchange (int8, the default grad codec) is stamped too."""
    x = make_input(rank, 4 * world, (512,), torch.bfloat16, 50).cuda().requires_grad_()
    g = make_input(rank, 4 * world, (512,), torch.bfloat16, 51).cuda()
    comm.all_to_all(x, codec=mf.CodecConfig(bits=4)).backward(g)
    S = [[4] * world for _ in range(world)]
    assert torch.equal(x.grad, _back(rank, world, S, 51, mf.CodecConfig(bits=8), 512))


def _back(rank, world, S, seed, cfg, hidden):
    """What the backward gives ``rank``: its rows' gradients as every receiver sent them back."""
    parts = []
    for q in range(world):
        g = make_input(q, sum(S[q]), (hidden,), torch.bfloat16, seed).cuda()
        off = sum(S[p][q] for p in range(rank))
        rows = g[off:off + S[rank][q]]
        parts.append(rows if q == rank else
                     mf.decode(mf.encode(rows, cfg), cfg, hidden, rows.dtype))
    return torch.cat(parts)


def mixed(rank, world):
    """Four ranks on two "nodes": raw rows to the node's other rank (bf16 passthrough), int4
    across nodes, then int8 inside and int4 across (two codecs in one call), at hidden 100
    (rows of 200 bytes: records behind raw rows are not 16-byte aligned); the flat algorithm
    and the hierarchical one (each pair's stamp travels from its source through the
    forwarding rank to the destination's decode)."""
    S = [[(p + 2 * q) % 4 + 1 for q in range(world)] for p in range(world)]
    for intra in ("bf16", mf.CodecConfig(bits=8)):
        codec = mf.LinkCodecs(intra_node=intra, inter_node=mf.CodecConfig(bits=4))
        with mf.Communicator(gate=False, topology=2, codec=codec) as comm:
            for hidden, algorithm in itertools.product((100, 1024), ("flat", "hierarchical")):
                x = make_input(rank, sum(S[rank]), (hidden,), torch.bfloat16, 60).cuda()
                got = comm.all_to_all(x, algorithm=algorithm, **_kwargs(S, rank, world))
                parts = []
                for p in range(world):
                    src = make_input(p, sum(S[p]), (hidden,), torch.bfloat16, 60).cuda()
                    off = sum(S[p][:rank])
                    rows = src[off:off + S[p][rank]]
                    cfg = codec.for_peer(p // 2 == rank // 2)
                    parts.append(rows if p == rank or cfg.is_passthrough else
                                 mf.decode(mf.encode(rows, cfg), cfg, hidden, rows.dtype))
                assert torch.equal(got, torch.cat(parts)), (intra, hidden, algorithm)
            assert [p for p in hierarchical.hierarchy(comm)._plans.values()
                    if getattr(p, "stamped_calls", None)]  # the source plans' launches
            comm.check()
    # rank 1 switches to fp16 (both dtypes used before): the same bytes everywhere. Rank 1
    # receives the int4 records of ranks 2 and 3 behind raw rows of 600 bytes (not 16-byte
    # aligned: decoded by the codec's own kernels, their stamps compared by
    # check_stamp_table); ranks 2 and 3 decode rank 1's in p2p_exchange launches. Rank 0
    # meets rank 1 in raw rows only, which carry no stamp.
    codec = mf.LinkCodecs(intra_node="bf16", inter_node=mf.CodecConfig(bits=4))
    with mf.Communicator(gate=False, topology=2, codec=codec) as comm:
        x = make_input(rank, sum(S[rank]), (100,), torch.bfloat16, 61).cuda()
        kw = _kwargs(S, rank, world)
        expected = comm.all_to_all(x, **kw)
        comm.all_to_all(x.half(), **kw)
        comm.all_to_all(x.half() if rank == 1 else x, **kw)
        torch.cuda.synchronize()
        if rank == 0:
            comm.check()
        else:
            with pytest.raises(ConfigMismatchError) as info:
                comm.check()
            sent = "torch.bfloat16" if rank == 1 else "torch.float16"
            assert f"records ({sent}, hidden 100)" in str(info.value), str(info.value)
        comm.check()
        assert torch.equal(comm.all_to_all(x, **kw), expected)


def same_size_switch(rank, comm, x):
    """Codecs of the same record size, both used by every rank, then rank 1 switches at one
    call: only the stamps tell. Every rank (each exchanges with rank 1) raises at its next
    call, naming both sides, and the group works afterwards. Returns the two codecs and
    their outputs."""
    H = x.shape[1]
    a, b = mf.CodecConfig(bits=4, group_size=128), mf.CodecConfig(bits=4, group_size=32,
                                                                  spikes=False)
    assert record_bytes(H, a) == record_bytes(H, b)  # the same bytes: only a stamp tells
    expected = {c: comm.all_to_all(x, codec=c) for c in (a, b)}
    comm.all_to_all(x, codec=b if rank == 1 else a)  # returns: the kernels check
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError) as info:
        comm.all_to_all(x, codec=a)
    msg = str(info.value)
    assert (f"rank 1 sent 4 rows of int4/g32 records (torch.bfloat16, hidden {H}); this rank "
            f"expected 4 rows of int4/g128+spikes" if rank != 1 else
            "this rank expected 4 rows of int4/g32 records") in msg, msg
    for c, out in expected.items():
        assert torch.equal(comm.all_to_all(x, codec=c), out)
    return a, b, expected


def hierarchical_disagreement(rank, world):
    """The same switch under the hierarchical algorithm: the stages only move bytes and the
    destinations' decodes compare the stamps."""
    x = make_input(rank, 4 * world, (256,), torch.bfloat16, 80).cuda()
    with mf.Communicator(gate=False, topology=2, algorithm="hierarchical") as comm:
        same_size_switch(rank, comm, x)


def disagreement(rank, world, comm):
    """Configurations both ranks have used, used differently at one call: the decodes compare
    the stamps, every rank raises at its next call, and the group works afterwards."""
    x = make_input(rank, 4 * world, (256,), torch.bfloat16, 70).cuda()
    a, b, expected = same_size_switch(rank, comm, x)
    sr, near = mf.CodecConfig(bits=8, rounding="stochastic"), mf.CodecConfig(bits=8)
    for c in (near, sr):  # both roundings used by every rank before the switch
        comm.all_to_all(x, codec=c)
    # stochastic rounding: its encode is the codec's own kernel with the stamp copied in
    comm.all_to_all(x, codec=sr if rank == 1 else near)
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError) as info:
        comm.all_to_all(x, codec=a)
    assert ("rank 1 sent 4 rows of int8/g128+spikes+sr records" if rank != 1 else
            "this rank expected 4 rows of int8/g128+spikes+sr records") in str(info.value), \
        str(info.value)
    assert torch.equal(comm.all_to_all(x, codec=a), expected[a])
    # the last call's disagreement, read on demand (and nothing left after it)
    comm.all_to_all(x, codec=b if rank == 1 else a)
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError, match="this rank expected 4 rows"):
        comm.check()
    comm.check()
    # and at close(), once everything is freed
    comm.all_to_all(x, codec=b if rank == 1 else a)
    with pytest.raises(ConfigMismatchError, match="this rank expected 4 rows"):
        comm.close()


def all_reduce_checks(rank, world):
    """The flat all-reduce: bit-identical to the specification (codecs, dtypes, one and two
    pipeline ranges, a numel that needs padding); a rank that switches to a codec of the same
    record size, or to a dtype of the same size, makes every rank raise at its next call
    (every pair meets in the reduce-scatter), as does a numel that pads to the same rows; the
    group works afterwards."""
    n = 3 * ROW * world + 5
    codecs = CODECS[:3] + ["bf16"]  # (the passthrough: reduce_cast)
    with mf.Communicator(gate=False) as comm:
        for (i, cfg), dtype, chunks in itertools.product(
                enumerate(codecs), (torch.bfloat16, torch.float32, torch.float16), (1, 2)):
            x = reduce_input(rank, (n,), dtype, 90 + i).cuda()
            want = reference_all_reduce([reduce_input(p, (n,), dtype, 90 + i)
                                         for p in range(world)], cfg)
            assert torch.equal(comm.all_reduce(x, codec=cfg, chunks=chunks).cpu(), want), \
                (cfg, dtype, chunks)
        stamped = [p for p in comm.all_reduce_plans.values() if p.stamped]
        assert stamped and all(p.stamped_calls for p in stamped)
        a, b = mf.CodecConfig(bits=4, spikes=False), mf.CodecConfig(bits=3, group_size=64)
        assert record_bytes(ROW, a) == record_bytes(ROW, b)  # the same bytes: only a stamp tells
        x = reduce_input(rank, (n,), torch.bfloat16, 99).cuda()
        expected = {c: comm.all_reduce(x.clone(), codec=c) for c in (a, b)}
        comm.all_reduce(x.clone(), codec=b if rank == 1 else a)  # returns: the kernels check
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError) as info:
            comm.all_reduce(x.clone(), codec=a)
        msg, rows = str(info.value), rows_per_rank(n, world)
        assert msg.startswith("moe_flashcomm.all_reduce: ranks of the group disagree"), msg
        assert (f"rank 1 sent {rows} rows of int3/g64+spikes records (torch.bfloat16, numel "
                f"{n} mod 16384); this rank expected {rows} rows of int4/g128 records"
                if rank != 1 else f"this rank expected {rows} rows of int3/g64+spikes records"
                ) in msg, msg
        for c, out in expected.items():
            assert torch.equal(comm.all_reduce(x.clone(), codec=c), out)
        # numels that pad to the same rows (both used before): the stamps carry the numel
        assert rows_per_rank(n - 1, world) == rows
        comm.all_reduce(x[:n - 1].clone(), codec=a)
        comm.all_reduce(x[:n - 1].clone() if rank == 1 else x.clone(), codec=a)
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError, match=f"numel {n - 1} mod 16384"):
            comm.all_reduce(x.clone(), codec=a)
        assert torch.equal(comm.all_reduce(x.clone(), codec=a), expected[a])
        # fp16 against bf16 (both used before), found by comm.check()
        comm.all_reduce(x.half(), codec=a)
        comm.all_reduce(x.half() if rank == 1 else x.clone(), codec=a)
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError, match="torch.float16"):
            comm.check()
        comm.check()
        assert torch.equal(comm.all_reduce(x.clone(), codec=a), expected[a])
        # the same with the passthrough (bf16 and fp16 values travel as themselves)
        passthrough = comm.all_reduce(x.clone(), codec="bf16")
        comm.all_reduce(x.half(), codec="bf16")
        comm.all_reduce(x.half() if rank == 1 else x.clone(), codec="bf16")
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError) as info:
            comm.all_reduce(x.clone(), codec="bf16")
        assert ("rank 1 sent" if rank != 1 else "this rank expected") + f" {rows} rows of bf16 " \
            "records (torch.float16" in str(info.value), str(info.value)
        assert torch.equal(comm.all_reduce(x.clone(), codec="bf16"), passthrough)


def hierarchical_all_reduce(rank, world):
    """The hierarchical all-reduce on 2 "nodes" of 2: bit-identical to the specification. A
    rank that switches codec (every codec used by every rank before) is met by some ranks in
    a stage; the others learn of it from the marked slots of the final records: every rank
    raises at its next call. The same where only its inter-node codec differs (met in stage
    2 by one rank alone), and where its numel differs but pads to the same rows. The group
    works afterwards."""
    n = 3 * ROW * world + 5
    with mf.Communicator(gate=False, topology=2) as comm:
        for (i, cfg), dtype in itertools.product(enumerate(CODECS[:3] + ["bf16"]),
                                                 (torch.bfloat16, torch.float32)):
            x = reduce_input(rank, (n,), dtype, 110 + i).cuda()
            want = reference_all_reduce([reduce_input(p, (n,), dtype, 110 + i)
                                         for p in range(world)], cfg, local_size=2)
            got = comm.all_reduce(x, codec=cfg, algorithm="hierarchical")
            assert torch.equal(got.cpu(), want), (cfg, dtype)
        assert [p for p in comm.all_reduce_plans.values()
                if p.hierarchical and p.stamped and p.stamped_calls]
        a, b = mf.CodecConfig(bits=4, spikes=False), mf.CodecConfig(bits=3, group_size=64)
        codecs = {"a": a, "b": b, "inter b": mf.LinkCodecs(intra_node=a, inter_node=b)}
        x = reduce_input(rank, (n,), torch.bfloat16, 119).cuda()
        expected = comm.all_reduce(x.clone(), codec=a, algorithm="hierarchical")
        for c in codecs.values():
            comm.all_reduce(x.clone(), codec=c, algorithm="hierarchical")
        for switch in ("b", "inter b"):
            comm.all_reduce(x.clone(), codec=codecs[switch] if rank == 1 else a,
                            algorithm="hierarchical")  # returns: the kernels check
            torch.cuda.synchronize()
            with pytest.raises(ConfigMismatchError) as info:
                comm.all_reduce(x.clone(), codec=a, algorithm="hierarchical")
            assert str(info.value).startswith(
                "moe_flashcomm.all_reduce: ranks of the group disagree"), (switch, str(info.value))
            got = comm.all_reduce(x.clone(), codec=a, algorithm="hierarchical")
            assert torch.equal(got, expected), switch
        # numels that pad to the same rows (both used before): every rank raises
        comm.all_reduce(x[:n - 1].clone(), codec=a, algorithm="hierarchical")
        comm.all_reduce(x[:n - 1].clone() if rank == 1 else x.clone(), codec=a,
                        algorithm="hierarchical")
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError, match="mod 16384"):
            comm.all_reduce(x.clone(), codec=a, algorithm="hierarchical")
        got = comm.all_reduce(x.clone(), codec=a, algorithm="hierarchical")
        assert torch.equal(got, expected)
        # the passthrough, rank 1 in fp16 (both dtypes used before): the stages' reductions
        # (reduce_cast) check the stamps and write the slot, the last decode checks the
        # slots: every rank raises
        passthrough = comm.all_reduce(x.clone(), codec="bf16", algorithm="hierarchical")
        comm.all_reduce(x.half(), codec="bf16", algorithm="hierarchical")
        comm.all_reduce(x.half() if rank == 1 else x.clone(), codec="bf16",
                        algorithm="hierarchical")
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError, match="ranks of the group disagree"):
            comm.all_reduce(x.clone(), codec="bf16", algorithm="hierarchical")
        got = comm.all_reduce(x.clone(), codec="bf16", algorithm="hierarchical")
        assert torch.equal(got, passthrough)


def _checks(rank, world):
    torch.cuda.set_device(0)  # every process on the one GPU
    comm = mf.Communicator(gate=False)
    assert all(b is None for b in comm._peer_buffers.values())
    exactness(rank, world, comm)
    backward(rank, world, comm)
    disagreement(rank, world, comm)
    all_reduce_checks(rank, world)
    strided_backend_sum(rank, world)
    torch.cuda.synchronize()


def strided_backend_sum(rank, world):
    """A strided CUDA tensor that goes to the backend's own sum ("native", or gated below the
    size gate): summed through a contiguous copy, in place (the backends take contiguous
    tensors only; it raised). Integer values: every order of the sum is exact."""
    def values(p):
        g = torch.Generator().manual_seed(300 + p)
        return torch.randint(-100, 100, (64, 6), generator=g).float()
    with mf.Communicator() as comm:
        base = values(rank).cuda()
        x = base[:, ::2]
        assert not x.is_contiguous()
        assert comm.all_reduce(x, codec="native") is x
        want = sum(values(p) for p in range(world))
        assert torch.equal(base[:, ::2].cpu(), want[:, ::2])
        assert torch.equal(base[:, 1::2].cpu(), values(rank)[:, 1::2])  # untouched


def _mixed(rank, world):
    torch.cuda.set_device(0)
    mixed(rank, world)
    hierarchical_disagreement(rank, world)
    hierarchical_all_reduce(rank, world)
    torch.cuda.synchronize()


@pytest.mark.parametrize("cfg", [mf.CodecConfig(bits=4), mf.CodecConfig(bits="bf16")], ids=str)
def test_all_reduce_slots_carry_the_whole_numel(cfg):
    """Past 16 ranks two numels 2^14 apart can pad to the same rows and so give the same
    stamp (whose hidden field holds the numel mod 2^14): the slot's second word holds the
    whole numel, and the fused reduction compares it. Rank 0 of 3 reduces records behind
    slots written as StampedCall writes them, one peer's with numel + 2^14: reported as that
    peer's numel; with the right numel, nothing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from moe_flashcomm import kernels as K
    from moe_flashcomm.comm import p2p
    from moe_flashcomm.comm.all_reduce import StampCheck, reduce_chunk
    m, numel, dtype, dev = 4, 17 * 2 * ROW + 3, torch.bfloat16, torch.device("cuda", 0)
    slot = K.STAMP_BYTES + m * record_bytes(ROW, cfg)
    buf = torch.empty(2, slot, dtype=torch.uint8, device=dev)
    for i in range(2):
        buf[i, K.STAMP_BYTES:] = mf.encode(torch.randn(m, ROW, device=dev).to(dtype),
                                           cfg).view(-1)
    stamp = p2p.stamp(cfg, m, numel, dtype)

    def write_slot(i: int, second: int) -> None:
        words = np.array([stamp, second], dtype=np.uint64).view(np.uint8)
        buf[i, :K.STAMP_BYTES] = torch.from_numpy(words).to(dev)
    write_slot(0, numel)
    write_slot(1, numel + (1 << 14))
    peers = buf[:, K.STAMP_BYTES:].view(2, m, -1)
    own = torch.randn(m, ROW, device=dev).to(dtype)
    page = p2p.ErrorPage(dev)
    try:
        reduce_chunk(peers, own, 0, cfg, check=StampCheck(page.address, numel))
        torch.cuda.synchronize()
        words = page.report()
        assert words is not None and words[1:6] == [2, numel + (1 << 14), numel, 0,
                                                    K.P2P_ERROR_REDUCE_NUMEL], words
        page.clear()
        write_slot(1, numel)
        reduce_chunk(peers, own, 0, cfg, check=StampCheck(page.address, numel))
        torch.cuda.synchronize()
        assert page.report() is None
    finally:
        page.close()


def test_stamped_two_processes_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_checks, 2, env=ENV, timeout=600)


def test_stamped_three_processes_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_checks, 3, env=ENV, timeout=600)


def test_stamped_mixed_wires_four_processes_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_mixed, 4, env=ENV, timeout=600)
