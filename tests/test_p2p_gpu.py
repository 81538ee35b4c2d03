"""The peer-to-peer all-to-all on GPUs: two processes that share one GPU (gloo for the small
agreement collectives, CUDA IPC between the processes for the data; marked ``cuda``), or two
GPUs over NCCL (``multigpu``). Checked: bit-identical to the reference codec (even and uneven
splits, several codecs and dtypes, forward and backward), CUDA graph capture of forward and
backward replayed many times bit-identical to eager calls, stamps that disagree, a silent peer
(the kernels' waits time out and both ranks raise), close() (it waits for the peers to take
its last records) and a new communicator on the same group, and a process group destroyed and
made again with permuted ranks."""
from __future__ import annotations

import ctypes
import datetime
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm import kernels as K
from moe_flashcomm.comm import ConfigMismatchError, PeerTimeoutError
from tests.distributed import free_port, spawn
from tests.test_all_to_all import make_input

H = 7168
CODECS = [mf.CodecConfig(bits=4), mf.CodecConfig(bits=2, group_size=32, spikes=False),
          mf.CodecConfig(bits="fp8"), mf.CodecConfig(bits=8, rounding="nearest"),
          mf.CodecConfig(bits=3, group_size=64)]


def cuda_roundtrip(rows: torch.Tensor, cfg) -> torch.Tensor:
    """``rows`` through the CUDA codec (bit-identical to the reference: test_cuda_codec.py)."""
    flat = rows.reshape(-1, rows.shape[-1])
    return mf.decode(mf.encode(flat, cfg), cfg, rows.shape[-1], rows.dtype).view(rows.shape)


def want(rank, world, S, seed, dtype, cfg, hidden=H):
    """What ``rank`` receives when rank p sends S[p][q] rows of make_input(p, ...) to q."""
    parts = []
    for p in range(world):
        x = make_input(p, sum(S[p]), (hidden,), dtype, seed).cuda()
        off = sum(S[p][:rank])
        rows = x[off:off + S[p][rank]]
        parts.append(rows if p == rank else cuda_roundtrip(rows, cfg))
    return torch.cat(parts)


def _uses_p2p(comm) -> bool:
    return any(b is not None and b.cap > 0 for b in comm._peer_buffers.values())


def _p2p_calls(comm) -> list:
    """The peer-to-peer calls (exchange.P2PCall) a communicator has made, both directions."""
    return [plan.p2p_call for fwd, bwd in comm._setups.values() for route in (fwd, bwd)
            for plan in route.plans.values() if plan.p2p_call is not None]


def _compiled_calls(comm) -> int:
    """Peer-to-peer calls made through the compiled launcher's Exchange (csrc/launcher.cpp)."""
    return sum(c.native is not None for c in _p2p_calls(comm))


def exactness(rank, world, comm):
    even = [[4] * world for _ in range(world)]
    uneven = [[3, 5], [7, 2]] if world == 2 else even  # p2p takes split sizes for pairs
    for i, cfg in enumerate(CODECS):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for S in (even, uneven):
                x = make_input(rank, sum(S[rank]), (H,), dtype, 10 + i).cuda()
                kw = {} if S is even else dict(input_split_sizes=S[rank],
                                               output_split_sizes=[S[p][rank] for p in range(world)])
                got = comm.all_to_all(x, codec=cfg, **kw)
                assert torch.equal(got, want(rank, world, S, 10 + i, dtype, cfg)), (cfg, dtype, S)
    assert _uses_p2p(comm), "the peer-to-peer transport was not used"
    # the passthrough: 16-bit rows travel as they are; fp32 rows are cast to bf16
    # (p2p_exchange_cast)
    S = [[4] * world for _ in range(world)]
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = make_input(rank, 4 * world, (H,), dtype, 19).cuda()
        got = comm.all_to_all(x, codec="bf16")
        assert torch.equal(got, want(rank, world, S, 19, dtype, mf.CodecConfig(bits="bf16"))), \
            dtype
    if K.KERNELS.native is not None:  # (unless MOE_FLASHCOMM_NATIVE_LAUNCH=0)
        assert _compiled_calls(comm), "no call went through the compiled launcher"


def both_launchers(rank, world):
    """The compiled launcher's calls (csrc/launcher.cpp Exchange, whatever the environment
    says) give the bits of the ctypes ones, forward and backward, on communicators of their
    own: calls of one launch, and framed calls of every step kind (records the copy engine
    moves from a staging buffer, a seed drawn per call, and at two ranks raw rows one way and
    records the other, a size gate between the pairs' sizes), each framed kind also with the
    copy engine; calls back to back, and with an error page and stream cell they share with
    nothing."""
    prior = K.KERNELS.native is not None
    even = [[4] * world for _ in range(world)]
    # (codec, MOE_FLASHCOMM_P2P_COPY_MB, gate, splits)
    cases = [(mf.CodecConfig(bits=4), None, False, even),
             (mf.CodecConfig(bits=8), None, False, even),
             (mf.CodecConfig(bits=8), "0", False, even),  # every pair through the copy engine
             (mf.CodecConfig(bits=4, rounding="stochastic"), None, False, even),
             (mf.CodecConfig(bits=4, rounding="stochastic"), "0", False, even)]
    if world == 2:  # pairs under 6 rows travel raw: rank 0 sends 5 raw, receives 7 as int8
        gate = {"nvlink": {"int8": 6 * H * 2}}
        cases += [(mf.CodecConfig(bits=8), copy_mb, gate, [[3, 5], [7, 2]])
                  for copy_mb in (None, "0")]
    results = {}
    try:
        for compiled in (False, True):
            K.KERNELS.use_launcher(compiled)
            got = []
            for i, (cfg, copy_mb, gate, S) in enumerate(cases):
                if copy_mb is not None:
                    os.environ["MOE_FLASHCOMM_P2P_COPY_MB"] = copy_mb
                with mf.Communicator(gate=gate) as c:
                    torch.manual_seed(100 + i)  # (the stochastic case's seeds)
                    kw = {} if S is even else dict(
                        input_split_sizes=S[rank], output_split_sizes=[S[p][rank] for p in range(world)])
                    x = make_input(rank, sum(S[rank]), (H,), torch.bfloat16, 70 + i).cuda()
                    xg = x.clone().requires_grad_()
                    y = c.all_to_all(xg, codec=cfg, grad_codec=cfg, **kw)
                    y.backward(make_input(rank + 9, y.shape[0], (H,), torch.bfloat16, 72).cuda())
                    got += [y.detach(), xg.grad, c.all_to_all(x, codec=cfg, **kw)]
                    # (read when the peer buffers are made, at the first call)
                    os.environ.pop("MOE_FLASHCOMM_P2P_COPY_MB", None)
                    if gate:  # the raw pair's rows arrive as they are
                        p, n = 1 - rank, S[1 - rank][rank]
                        if n < 6:
                            sent = make_input(p, sum(S[p]), (H,), torch.bfloat16, 70 + i).cuda()
                            assert torch.equal(got[-1][:n] if p == 0 else got[-1][-n:],
                                               sent[:n] if p == 1 else sent[-n:])
                    elif not cfg.is_stochastic:
                        assert torch.equal(got[-1], want(rank, world, S, 70 + i,
                                                         torch.bfloat16, cfg)), (cfg, copy_mb)
                    torch.cuda.synchronize()
                    calls = _p2p_calls(c)
                    # every call compiled, or none; each case took the kind of call it is for
                    assert calls and all((p.native is not None) == compiled for p in calls), \
                        (compiled, cfg, copy_mb)
                    kinds = {(s.kind, s.stream) for call in calls for s in call.steps}
                    staged = copy_mb is not None
                    assert ((K.STAGE, K.MAIN) in kinds) == staged, (cfg, kinds)
                    assert ((K.CALL, K.MAIN) in kinds) == cfg.is_stochastic, (cfg, kinds)
                    # the copy engine: the first part on the copy stream, the last on the
                    # call's; raw rows: copies on the call's stream
                    assert ((K.COPY, K.SIDE) in kinds) == staged, (cfg, kinds)
                    assert ((K.COPY, K.MAIN) in kinds) == (staged or bool(gate)), (cfg, kinds)
                    # raw rows or a seed per call: p2p_sync launches (no pointers) frame the
                    # call; one wire: p2p_exchange launches only, the staged parts' among them
                    framed = {any(s.kind == K.LAUNCH and not s.refs for s in call.steps)
                              for call in calls}
                    assert framed == {bool(gate) or cfg.is_stochastic}, (cfg, copy_mb, framed)
            results[compiled] = got
    finally:
        K.KERNELS.use_launcher(prior)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


def backward(rank, world, comm):
    """The backward is the reverse exchange of the gradient with the grad codec."""
    S = [[3, 5], [7, 2]] if world == 2 else [[4] * world for _ in range(world)]
    cfg, gcfg = mf.CodecConfig(bits=4), mf.CodecConfig(bits=8)
    x = make_input(rank, sum(S[rank]), (H,), torch.bfloat16, 40).cuda().requires_grad_()
    out_rows = [S[p][rank] for p in range(world)]
    y = comm.all_to_all(x, out_rows, S[rank], codec=cfg, grad_codec=gcfg)
    assert torch.equal(y, want(rank, world, S, 40, torch.bfloat16, cfg))
    gy = make_input(rank + 100, sum(out_rows), (H,), torch.bfloat16, 41).cuda()
    y.backward(gy)
    # rank r's gradient rows for peer p: p's gy rows that came from r, through the grad codec
    parts = []
    for p in range(world):
        gp = make_input(p + 100, sum(S[q][p] for q in range(world)), (H,), torch.bfloat16, 41).cuda()
        off = sum(S[q][p] for q in range(rank))
        rows = gp[off:off + S[rank][p]]
        parts.append(rows if p == rank else cuda_roundtrip(rows, gcfg))
    assert torch.equal(x.grad, torch.cat(parts))


def graphs(rank, world, comm):
    """Forward and backward captured once, replayed many times: every replay gives what an
    eager call gives on the same data (epochs advance on the device). Calls of one launch,
    and framed calls whose records the copy engine moves (a staging buffer, the copy stream
    forked from the capture and joined back)."""
    os.environ["MOE_FLASHCOMM_P2P_COPY_MB"] = "0"
    staged = mf.Communicator(gate=False)
    try:  # (the variable is read when the peer buffers are made, at the first call)
        staged.all_to_all(make_input(rank, 64 * world, (H,), torch.bfloat16, 59).cuda())
    finally:
        os.environ.pop("MOE_FLASHCOMM_P2P_COPY_MB", None)
    with staged:
        _graphs(rank, world, [(comm, mf.CodecConfig(bits=4)), (comm, mf.CodecConfig(bits="fp8")),
                              (staged, mf.CodecConfig(bits=8))])


def _graphs(rank, world, cases):
    T = 64 * world
    for comm, cfg in cases:
        sx = make_input(rank, T, (H,), torch.bfloat16, 60).cuda().requires_grad_()
        sg = make_input(rank, T, (H,), torch.bfloat16, 61).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (plans, buffers) off the capture
            for _ in range(2):
                comm.all_to_all(sx, codec=cfg).backward(sg)
                sx.grad = None
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = comm.all_to_all(sx, codec=cfg)
            y.backward(sg)
        for seed in range(70, 82):
            x = make_input(rank, T, (H,), torch.bfloat16, seed).cuda()
            g = make_input(rank, T, (H,), torch.bfloat16, seed + 500).cuda()
            with torch.no_grad():
                sx.copy_(x)
            sg.copy_(g)
            graph.replay()
            xe = x.clone().requires_grad_()
            ye = comm.all_to_all(xe, codec=cfg)  # eager, between replays
            ye.backward(g)
            torch.cuda.synchronize()
            assert torch.equal(y, ye), (cfg, seed)
            assert torch.equal(sx.grad, xe.grad), (cfg, seed)
        del graph
        torch.cuda.synchronize()
    staged = _p2p_calls(cases[-1][0])
    assert any(s.kind == K.STAGE for call in staged for s in call.steps), "no staged call"


def close_and_again(rank, world, comm):
    x = make_input(rank, 8 * world, (H,), torch.bfloat16, 90).cuda()
    before = comm.all_to_all(x)
    ptrs = list(next(b for b in comm._peer_buffers.values() if b is not None).data_ptrs)
    y = comm.all_to_all(x.clone().requires_grad_())  # its backward would use freed buffers
    comm.close()
    with pytest.raises(mf.comm.CommunicatorClosedError):
        comm.all_to_all(x)
    with pytest.raises(mf.comm.CommunicatorClosedError, match="before the backward"):
        y.float().sum().backward()
    with mf.Communicator(gate=False) as again:  # the same buffers allocated and mapped again
        assert torch.equal(again.all_to_all(x), before)
        bufs = next(b for b in again._peer_buffers.values() if b is not None)
        assert len(bufs.data_ptrs) == len(ptrs)
    assert not bufs.data_ptrs and not bufs.flag_ptrs  # freed by the with block


def permuted_reinit(rank, world, port):
    """A process group destroyed and made again with the ranks permuted: no stale state."""
    x = make_input(rank, 4 * world, (H,), torch.bfloat16, 95).cuda()
    S = [[4] * world for _ in range(world)]
    cfg = mf.CodecConfig(bits=4)
    assert torch.equal(mf.all_to_all(x, codec=cfg, gate=False), want(rank, world, S, 95, torch.bfloat16, cfg))
    backend = dist.get_backend()
    dist.destroy_process_group()
    new = world - 1 - rank
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=new,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    x = make_input(new, 4 * world, (H,), torch.bfloat16, 96).cuda()
    assert torch.equal(mf.all_to_all(x, codec=cfg, gate=False), want(new, world, S, 96, torch.bfloat16, cfg))


def disagreement(rank, world, comm):
    """Ranks that disagree at a call the first-use check cannot see (configurations both have
    used): the receiving kernels compare the pair's stamps, both ranks raise at their next
    call, and the group works afterwards."""
    x = make_input(rank, 4 * world, (H,), torch.bfloat16, 30).cuda()
    int4, int8 = mf.CodecConfig(bits=4), mf.CodecConfig(bits=8)
    expected = {c: comm.all_to_all(x, codec=c) for c in (int4, int8)}
    comm.all_to_all(x, codec=int8 if rank == 1 else int4)  # returns: the kernels check
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError) as info:
        comm.all_to_all(x, codec=int4)
    msg = str(info.value)
    # rank 1 hears first from one of the others (the kernels report the first difference)
    assert re.search(r"rank 1 sent 4 rows of int8/g128\+spikes.*expected 4 rows of int4/g128"
                     if rank != 1 else r"rank \d+ sent 4 rows of int4/g128\+spikes.*"
                     r"expected 4 rows of int8/g128", msg), msg
    for c, out in expected.items():
        assert torch.equal(comm.all_to_all(x, codec=c), out)
    # stochastic rounding takes the framed protocol (p2p_sync) on rank 1, one launch on the others
    sr = mf.CodecConfig(bits=4, rounding="stochastic")
    comm.all_to_all(x, codec=sr)
    comm.all_to_all(x, codec=sr if rank == 1 else int4)
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError) as info:
        comm.all_to_all(x, codec=int4)
    assert ("rank 1 sent 4 rows of int4/g128+spikes+sr records" if rank != 1 else
            "this rank expected 4 rows of int4/g128+spikes+sr records") in str(info.value), \
        str(info.value)
    for c, out in expected.items():
        assert torch.equal(comm.all_to_all(x, codec=c), out)
    if world == 2:  # split sizes that disagree both ways (buffers already large enough)
        send, recv = ([3, 5], [3, 7]) if rank == 0 else ([8, 1], [6, 1])
        xs = make_input(rank, sum(send), (H,), torch.bfloat16, 31).cuda()
        comm.all_to_all(xs, recv, send, codec=int4)
        torch.cuda.synchronize()
        with pytest.raises(ConfigMismatchError) as info:
            comm.all_to_all(x, codec=int4)
        assert (f"rank 1 sent 8 rows of int4/g128+spikes records (torch.bfloat16, hidden {H}); "
                f"this rank expected 7 rows" if rank == 0 else
                f"rank 0 sent 5 rows of int4/g128+spikes records (torch.bfloat16, hidden {H}); "
                f"this rank expected 6 rows") in str(info.value), str(info.value)
        assert torch.equal(comm.all_to_all(x, codec=int4), expected[int4])
    # the last call's disagreement, read on demand (and nothing left after it)
    comm.all_to_all(x, codec=int8 if rank == 1 else int4)
    torch.cuda.synchronize()
    with pytest.raises(ConfigMismatchError, match="this rank expected 4 rows"):
        comm.check()
    comm.check()


def silent_peer(rank, world):
    """Rank 1 skips a call. Rank 0's kernel gives up its wait after the communicator's
    timeout and reports it: rank 0 raises PeerTimeoutError at its next call and at every call
    after it. Rank 1's calls then find rank 0 silent in turn, and it raises too. No trap, no
    hang: both processes go on (the one-launch exchange kernel, then p2p_sync's, which
    stochastic rounding takes)."""
    for codec in (mf.CodecConfig(bits=4), mf.CodecConfig(bits=4, rounding="stochastic")):
        with mf.Communicator(gate=False, codec=codec, timeout=2) as comm:
            x = make_input(rank, 4 * world, (H,), torch.bfloat16, 33).cuda()
            expected = comm.all_to_all(x)
            torch.cuda.synchronize()
            if rank == 0:
                comm.all_to_all(x)  # rank 1 is not there: the wait gives up after 2 s
                start = time.monotonic()
                torch.cuda.synchronize()
                assert time.monotonic() - start < 30
                said = r"group rank 0 of 2 waited 2 s on the GPU, at its peer-to-peer call #2, for rank 1"
                with pytest.raises(PeerTimeoutError, match=said):
                    comm.all_to_all(x)
                with pytest.raises(PeerTimeoutError, match=said):  # every later call
                    comm.check()
                dist.barrier()
            else:
                dist.barrier()  # rank 0 has failed
                # rank 0's records of its call #2 are here: this call completes with them
                got = comm.all_to_all(x)
                assert codec.is_stochastic or torch.equal(got, expected)
                comm.all_to_all(x)  # rank 0 makes no more calls: this wait gives up
                torch.cuda.synchronize()
                with pytest.raises(PeerTimeoutError,
                                   match=r"group rank 1 of 2 waited 2 s on the GPU, at its "
                                         r"peer-to-peer call #3, for rank 0"):
                    comm.check()
            dist.barrier()
    torch.cuda.synchronize()


def close_waits_for_peers(rank, world):
    """close() waits on the GPU, for at most the timeout, until every peer has taken our last
    records (its "freed" is its last write into our memory). Here rank 0's call counter is
    moved one past its last call, as if rank 1 had not taken that call's records yet: rank 0's
    close() raises after the timeout, naming rank 1, and still frees everything."""
    import cupy
    rt = cupy.cuda.runtime
    comm = mf.Communicator(gate=False, timeout=2)
    comm.all_to_all(make_input(rank, 4 * world, (H,), torch.bfloat16, 36).cuda())
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        bufs = next(b for b in comm._peer_buffers.values() if b is not None)
        counter, at = ctypes.c_uint64(), bufs.flag_ptrs[rank] + 8 * K.P2P_COUNTER
        rt.memcpy(ctypes.addressof(counter), at, 8, rt.memcpyDeviceToHost)
        counter.value += 1
        rt.memcpy(at, ctypes.addressof(counter), 8, rt.memcpyHostToDevice)
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError, match=(
                rf"closing its communicator, group rank 0 of 2 waited 2 s on the GPU for rank 1 "
                rf"to take the records of its last peer-to-peer call \(#{counter.value}\); the "
                rf"last it took were of call #{counter.value - 1}")):
            comm.close()
        assert 2 <= time.monotonic() - start < 30
        assert not bufs.data_ptrs and not bufs.flag_ptrs
    else:
        comm.close()  # rank 0 has taken all of ours: no wait
    dist.barrier()


def _checks(rank, world, port):
    if dist.get_backend() == "gloo":  # two processes on one GPU
        torch.cuda.set_device(0)
    comm = mf.Communicator(gate=False)
    exactness(rank, world, comm)
    backward(rank, world, comm)
    both_launchers(rank, world)
    graphs(rank, world, comm)
    disagreement(rank, world, comm)
    if world == 2:
        silent_peer(rank, world)
        close_waits_for_peers(rank, world)
    for copy_mb in ("1000000", "0"):  # records stored by the encode kernel, then the copy engine
        os.environ["MOE_FLASHCOMM_P2P_COPY_MB"] = copy_mb
        with mf.Communicator(gate=False) as c:
            xs = [make_input(rank, 256 * world, (H,), torch.bfloat16, 200 + i).cuda()
                  for i in range(5)]
            outs = [c.all_to_all(x) for x in xs]  # back to back, no synchronisation
            for i, out in enumerate(outs):
                S = [[256] * world for _ in range(world)]
                assert torch.equal(out, want(rank, world, S, 200 + i, torch.bfloat16,
                                             mf.CodecConfig(bits=4))), (copy_mb, i)
        del os.environ["MOE_FLASHCOMM_P2P_COPY_MB"]
    close_and_again(rank, world, comm)
    permuted_reinit(rank, world, port)
    torch.cuda.synchronize()


def _dropped(rank, world, port):
    """A Communicator dropped without close() frees its peer memory, mappings and error page
    as it goes, at once (nothing holds it back: docs/design.md, "Communicators"); before, its
    raw allocations were never freed. The group works on with a new one."""
    import gc
    import weakref
    torch.cuda.set_device(0)
    S = [[64] * world for _ in range(world)]
    x = make_input(rank, 64 * world, (H,), torch.bfloat16, 300).cuda()
    gc.collect()
    gc.disable()
    try:
        comm = mf.Communicator(gate=False)
        leaf = x.clone().requires_grad_()
        comm.all_to_all(leaf).float().sum().backward()
        assert torch.equal(comm.all_to_all(x, async_op=True).wait(),
                           want(rank, world, S, 300, torch.bfloat16, mf.CodecConfig(bits=4)))
        bufs = comm.peer_buffers(x.device)
        assert bufs is not None and bufs.data_ptrs and bufs.page.address  # the p2p path ran
        alive = weakref.ref(comm)
        del comm
        assert alive() is None
        assert not bufs.data_ptrs and not bufs.flag_ptrs and not bufs.page.address
    finally:
        gc.enable()
    with mf.Communicator(gate=False) as comm:
        assert torch.equal(comm.all_to_all(x), want(rank, world, S, 300, torch.bfloat16,
                                                    mf.CodecConfig(bits=4)))


@pytest.mark.cuda
def test_a_dropped_communicator_frees_its_peer_memory_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_dropped, 2, free_port(), env={"LOCAL_WORLD_SIZE": 2}, timeout=180)


@pytest.mark.cuda
def test_p2p_two_processes_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_checks, 2, free_port(), env={"LOCAL_WORLD_SIZE": 2})


@pytest.mark.cuda
def test_p2p_three_processes_one_gpu():
    """Every peer's tasks in one launch (tickets across three peers' encodes and decodes),
    and calls of the two kinds mixed among three ranks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_checks, 3, free_port(), env={"LOCAL_WORLD_SIZE": 3}, timeout=600)


def _growth_alone(rank, world, port):
    """Sizes that disagree where only rank 0 needs larger peer buffers: rank 0's growth (a
    framed exchange over gloo) names rank 1 after the timeout; rank 1's kernels give up
    waiting for rank 0 and rank 1 raises at its next check. Both within seconds."""
    torch.cuda.set_device(0)
    small = make_input(rank, 4 * world, (H,), torch.bfloat16, 34).cuda()
    with mf.Communicator(gate=False) as warm:  # kernels compiled and loaded on both ranks
        warm.all_to_all(small)
    comm = mf.Communicator(gate=False, timeout=2)
    comm.all_to_all(small)
    torch.cuda.synchronize()
    start = time.monotonic()
    if rank == 0:  # 4096 rows per peer: more than the first buffers hold
        big = make_input(rank, 4096 * world, (H,), torch.bfloat16, 35).cuda()
        with pytest.raises(PeerTimeoutError, match=r"peer-to-peer buffers: group rank 0 of 2.*"
                                                   r"nothing came from ranks \[1\]"):
            comm.all_to_all(big)
    else:
        comm.all_to_all(small)
        torch.cuda.synchronize()
        with pytest.raises(PeerTimeoutError, match="group rank 1 of 2 waited 2 s on the GPU"):
            comm.check()
        time.sleep(5)  # still connected while rank 0's exchange times out
    assert time.monotonic() - start < 30
    os._exit(0)  # rank 0's exchange is in flight: leave without tearing the group down


@pytest.mark.cuda
def test_p2p_buffers_grown_on_one_rank_only_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    spawn(_growth_alone, 2, free_port(), env={"LOCAL_WORLD_SIZE": 2}, timeout=120)


@pytest.mark.multigpu
def test_p2p_two_gpus_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_checks, 2, free_port(), backend="nccl")
