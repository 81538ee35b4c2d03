"""CUDA streams, graphs and edge cases of the exchange paths (codec/cuda.py, kernels.py,
comm/exchange.py, comm/p2p.py), from a review of the CUDA host code. Each test asserts the
documented behaviour and names in its docstring the bug it guards against (fixed: an
asynchronous call waited for on another stream, peer buffers freed under a captured graph)
or says it probes a path believed correct. Multi-process cases follow tests/test_p2p_gpu.py
and tests/test_stamped_gpu.py: 2 processes share one GPU, gloo for the small collectives,
CUDA IPC (peer-to-peer) or gloo (``MOE_FLASHCOMM_P2P=0``: the stamped "NCCL" path) for the
data. Every spawn has a hard timeout."""
from __future__ import annotations

import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm.codec import CodecConfig, record_bytes
from moe_flashcomm.codec import cuda as C
from moe_flashcomm.codec import reference as R
from tests.a2a_cases import make_input
from tests.distributed import spawn

BF16 = torch.bfloat16
INT4 = CodecConfig(bits=4)
# GPU cycles torch.cuda._sleep spins: about 0.2-0.3 s on an H100, far longer than a call takes
LONG_SLEEP = 400_000_000
STAMPED = {"MOE_FLASHCOMM_P2P": "0", "MOE_FLASHCOMM_STAMPS": "1"}  # the NCCL path, over gloo
P2P = {"LOCAL_WORLD_SIZE": 2}


def _need_gpu(n: int = 1) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPU(s)")


def _bufs(comm):
    """The communicator's one PeerBuffers (the peer-to-peer transport), or None."""
    return next((b for b in comm._peer_buffers.values() if b is not None), None)


def _want(rank, world, S, seed, dtype, cfg, hidden, device="cuda"):
    """What ``rank`` receives when rank p sends S[p][q] rows of make_input(p, ...) to q
    (peers' rows through the CUDA codec, bit-identical to the reference; own rows exact)."""
    parts = []
    for p in range(world):
        x = make_input(p, sum(S[p]), (hidden,), dtype, seed).to(device)
        off = sum(S[p][:rank])
        rows = x[off:off + S[p][rank]]
        parts.append(rows if p == rank else
                     mf.decode(mf.encode(rows, cfg), cfg, hidden, dtype) if rows.shape[0] else rows)
    return torch.cat(parts)


def _kw(S, rank, world):
    return dict(input_split_sizes=S[rank], output_split_sizes=[S[p][rank] for p in range(world)])


# ---- 1. async all_to_all waited for on another stream (peer-to-peer) -------------------------
def _p2p_async_other_stream(rank, world):
    torch.cuda.set_device(0)
    H, T = 1024, 64 * world
    with mf.Communicator(gate=False, timeout=60) as comm:
        comm.all_to_all(make_input(rank, T, (H,), BF16, 300).cuda(), codec=INT4)  # warm-up
        torch.cuda.synchronize()
        assert _bufs(comm) is not None and _bufs(comm).cap > 0, "peer-to-peer not used"
        start, later = torch.cuda.Stream(), torch.cuda.Stream()
        for i in range(3):
            x = make_input(rank, T, (H,), BF16, 301 + i).cuda()
            start.wait_stream(torch.cuda.current_stream())
            later.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(start):
                # the output block comes back to this stream's pool holding NaNs
                poison = torch.full((T, H), float("nan"), dtype=BF16, device="cuda")
                del poison
                torch.cuda._sleep(LONG_SLEEP)  # the call's stream is busy for a while
                handle = comm.all_to_all(x, codec=INT4, async_op=True)
            with torch.cuda.stream(later):
                y = handle.wait()  # "ordered before later work on the current stream"
                seen = y.clone()   # later work on the current stream
            torch.cuda.synchronize()
            want = comm.all_to_all(x, codec=INT4)
            torch.cuda.synchronize()
            assert torch.equal(seen, want), (
                f"call {i}: the output read on the stream current at wait() is not the "
                f"exchange's ({int(torch.isnan(seen.float()).any(1).sum())} rows still NaN)")


@pytest.mark.cuda
def test_p2p_async_handle_waited_on_another_stream():
    """Suspected bug: ``AllToAllHandle.wait()`` promises its output "ordered before later
    work on the current stream" (like torch's ``Work.wait``). On the peer-to-peer path the
    whole call runs on the stream current at the *start* and ``Pending`` returns ``out``
    without ordering anything (comm/exchange.py ``exchange``: ``Pending([], lambda: out)``).
    Started on stream A (busy), waited on stream B: B's work reads ``out`` before the kernel
    wrote it (here: the NaNs of a freed block)."""
    _need_gpu()
    spawn(_p2p_async_other_stream, 2, env=P2P, timeout=240)


# ---- 2. async all_to_all waited for on another stream (stamped path over NCCL/gloo) ----------
def _stamped_async_other_stream(rank, world):
    torch.cuda.set_device(0)
    H, own, peer, tail = 4096, 1 << 19, 4, 4096  # 4 GiB of own rows: a long copy
    S = [[own, peer], [peer, own]]
    g = torch.Generator(device="cuda").manual_seed(310 + rank)
    x = torch.randn(own + peer, H, device="cuda", dtype=BF16, generator=g)
    x_own = sum(S[rank][:rank])       # where this rank's own rows are in x
    y_own = sum(S[p][rank] for p in range(rank))  # and in the output
    with mf.Communicator(gate=False) as comm:
        comm.all_to_all(x, codec=INT4, **_kw(S, rank, world))  # warm-up: plans, first-use check
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # (the warm-up's 4 GiB output)
        assert all(b is None for b in comm._peer_buffers.values())
        start, later = torch.cuda.Stream(), torch.cuda.Stream()
        for i in range(4):
            start.wait_stream(torch.cuda.current_stream())
            later.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(start):
                poison = torch.full((own + peer, H), float("nan"), dtype=BF16, device="cuda")
                del poison
                handle = comm.all_to_all(x, codec=INT4, async_op=True, **_kw(S, rank, world))
            with torch.cuda.stream(later):
                y = handle.wait()
                seen = y[y_own + own - tail:y_own + own].clone()  # the last own rows
            torch.cuda.synchronize()
            assert torch.equal(seen, x[x_own + own - tail:x_own + own]), (
                f"call {i}: own rows read on the stream current at wait() were not written yet")
            del y, seen, handle


@pytest.mark.cuda
def test_stamped_async_handle_waited_on_another_stream_sees_own_rows():
    """Suspected bug (same contract as above, NCCL path): ``exchange``'s ``finish`` orders
    the stream current at ``wait()`` after the collective (``work.wait()``) and after the side
    stream, but the copy of the rows a rank keeps, ``out[dst:dst + n].copy_(x[src:src + n])``,
    is queued on the *start* stream after the collective and is never waited for. Started on
    stream A, waited on stream B: B may read own rows before A's copy wrote them. Made likely
    with 4 GiB of own rows and 4 rows to the peer (the copy outlasts the transfer); 4 rounds."""
    _need_gpu()
    free, _ = torch.cuda.mem_get_info()
    if free < 40 << 30:
        pytest.skip("needs about 40 GiB of free GPU memory (two processes)")
    spawn(_stamped_async_other_stream, 2, env=STAMPED, timeout=240)


# ---- 3. peer-to-peer buffers that grow after a call was captured in a CUDA graph ---------------
def _p2p_growth_after_capture(rank, world):
    torch.cuda.set_device(0)
    H, T = 1024, 8 * world
    with mf.Communicator(gate=False, timeout=5) as comm:
        sx = make_input(rank, T, (H,), BF16, 500).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as the README asks
            for _ in range(2):
                comm.all_to_all(sx, codec=INT4)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        bufs = _bufs(comm)
        assert bufs is not None and bufs.cap > 0, "peer-to-peer not used"
        generation, cap = bufs.generation, bufs.cap
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # e.g. a decode step's graph
            y = comm.all_to_all(sx, codec=INT4)
        # then a larger eager call (e.g. a prefill): every rank's buffers grow, the old ones go
        rows = cap // record_bytes(H, INT4) + 1  # per peer: more than a region holds
        big = make_input(rank, rows * world, (H,), BF16, 501).cuda()
        assert torch.equal(comm.all_to_all(big, codec=INT4),
                           _want(rank, world, [[rows] * world] * world, 501, BF16, INT4, H))
        torch.cuda.synchronize()
        assert bufs.generation != generation, "precondition: the buffers did not grow"
        for seed in (502, 503):
            new = make_input(rank, T, (H,), BF16, seed).cuda()
            sx.copy_(new)
            graph.replay()       # its kernels hold the addresses of the buffers before growth
            torch.cuda.synchronize()
            comm.check()
            assert torch.equal(y, comm.all_to_all(new, codec=INT4)), seed
            assert torch.equal(y, _want(rank, world, [[T // world] * world] * world, seed, BF16,
                                        INT4, H)), seed
        del graph
        torch.cuda.synchronize()


@pytest.mark.cuda
def test_p2p_graph_replays_after_the_peer_buffers_grew():
    """Suspected bug: ``PeerBuffers.reserve`` (comm/p2p.py) frees the old receive buffer
    (``rt.free``) and closes the peers' IPC mappings (``ipcCloseMemHandle``) when a larger
    eager call grows them, while a CUDA graph captured earlier still holds those addresses
    in its p2p_exchange launches (nothing tracks captured calls; only growth *during*
    capture is refused). Decode-step graphs captured at a small size followed by an eager
    prefill larger than the buffers is the usual inference pattern: every later replay
    writes into unmapped or reused memory (illegal address, or silent corruption)."""
    _need_gpu()
    spawn(_p2p_growth_after_capture, 2, env=P2P, timeout=180)


# ---- 4. peer-to-peer edge cases (probes of paths believed correct) ----------------------------
def _p2p_edges(rank, world):
    torch.cuda.set_device(0)
    with mf.Communicator(gate=False, timeout=30) as comm:
        # the very first call of the communicator moves no rows (no buffers yet: cap 0)
        out = comm.all_to_all(torch.empty(0, 1024, dtype=BF16, device="cuda"), codec=INT4)
        assert out.shape == (0, 1024)
        torch.cuda.synchronize()
        comm.check()
        for H in (1024, 100):  # rows of 16-byte words, and of 200 bytes (own rows: copy engine)
            for S in ([[4, 4], [4, 4]], [[5, 0], [0, 3]], [[3, 5], [7, 2]], [[0, 6], [1, 0]]):
                seed = 600 + H + sum(map(sum, S))
                x = make_input(rank, sum(S[rank]), (H,), BF16, seed).cuda()
                want = _want(rank, world, S, seed, BF16, INT4, H)
                assert torch.equal(comm.all_to_all(x, codec=INT4, **_kw(S, rank, world)), want), \
                    (H, S, "aligned")
                # the same rows 2 bytes off 16-byte alignment (a storage offset)
                flat = torch.empty(x.numel() + 8, dtype=BF16, device="cuda")
                xm = flat[1:1 + x.numel()].view_as(x).copy_(x)
                got = comm.all_to_all(xm, codec=INT4, **_kw(S, rank, world))
                assert torch.equal(got, want), (H, S, "misaligned")
                # and from a non-default current stream, twice (the group's stream order)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    a = comm.all_to_all(xm, codec=INT4, **_kw(S, rank, world))
                    b = comm.all_to_all(x, codec=INT4, **_kw(S, rank, world))
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                assert torch.equal(a, want) and torch.equal(b, want), (H, S, "side stream")
        comm.check()


@pytest.mark.cuda
def test_p2p_empty_misaligned_uneven_and_side_stream_calls():
    """Probe (believed correct): peer-to-peer calls whose first call moves no rows (the
    buffers are never reserved: P2PCall's sync-only steps), pairs without rows, own rows
    whose size is not a multiple of 16 bytes (a copy-engine step), inputs with a storage
    offset (the launcher's aligned clone), and calls made on a non-default current stream
    (PeerBuffers.begin orders it after the last one)."""
    _need_gpu()
    spawn(_p2p_edges, 2, env=P2P, timeout=240)


# ---- 5. byte offsets past 2^31 in one launch (single process; probe) ---------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [CodecConfig(bits=8), CodecConfig(bits="fp8"),
                                 CodecConfig(bits="bf16")], ids=str)
def test_codec_rows_past_two_gib(cfg):
    """Probe (believed correct): tokens and records past byte 2^31 of one launch (4 GiB of
    bf16 tokens; int8, fp8 and passthrough records over 2 GiB): the last rows' records and
    decoded values are those of the same rows encoded alone and of the reference (a 32-bit
    byte offset anywhere in the kernels' row addressing would corrupt them)."""
    _need_gpu()
    free, _ = torch.cuda.mem_get_info()
    if free < 16 << 30:
        pytest.skip("needs about 16 GiB of free GPU memory")
    H, T, k = 8192, (1 << 18) + 32, 16
    g = torch.Generator(device="cuda").manual_seed(800)
    x = torch.randn(T, H, device="cuda", dtype=BF16, generator=g)
    x[-k:, 5] = 40.0  # spikes in the rows checked
    assert x.numel() * 2 > 2**32
    rec = C.encode(x, cfg)
    assert rec.numel() > 2**31
    tail = x[-k:].clone()
    want = R.encode(tail.cpu(), cfg)
    assert torch.equal(rec[-k:].cpu(), want)
    assert torch.equal(rec[-k:], C.encode(tail, cfg))
    mid = T // 2 + 3
    assert torch.equal(rec[mid:mid + 1], C.encode(x[mid:mid + 1].clone(), cfg))
    del x, tail
    y = C.decode(rec, cfg, H, BF16)
    last = R.decode(want, cfg, H, BF16)
    assert torch.equal(y[-k:].cpu().view(torch.int16), last.view(torch.int16))
    del y, rec
    torch.cuda.empty_cache()
