"""The collective protocol of the peer-to-peer transport's buffers (moe_flashcomm/comm/p2p.py)
over real gloo process groups, on a CPU machine: device memory and CUDA IPC are replaced by a
bookkeeping stand-in (the data path itself runs only on GPUs: tests/test_all_to_all.py,
multigpu). Checked: every rank maps every other rank's allocation, growth replaces and frees the
old buffers, one rank's failed allocation makes every rank raise instead of leaving the
others waiting in a collective, what the host raises for each report of the kernels'
error page (the kernels that write it run in tests/test_p2p_gpu.py), and the tickets of the
one-launch call's tasks.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import time

import pytest
import torch

from moe_flashcomm.codec import CodecConfig
from moe_flashcomm import env, kernels as K
from moe_flashcomm.comm import ConfigMismatchError, PeerTimeoutError
from moe_flashcomm.comm.frame import Framing
from tests.distributed import spawn


class FakeRuntime:
    """cudaMalloc / CUDA IPC bookkeeping: pointers are numbers, handles carry them."""
    cudaIpcMemLazyEnablePeerAccess = 1

    def __init__(self, rank: int, fail_size: int = -1) -> None:
        self.next = itertools.count((rank + 1) << 40, 1 << 30)
        self.live, self.mapped, self.fail_size = set(), set(), fail_size
        self.host: dict = {}
        self.sizes: dict = {}  # pointer -> bytes allocated

    def malloc(self, n):
        if n == self.fail_size:
            raise MemoryError("out of device memory")
        p = next(self.next)
        self.live.add(p)
        self.sizes[p] = n
        return p

    def memset(self, p, v, n):  # (asynchronous to the host, as cudaMemset is)
        assert p in self.live
        self.zeroing = p

    def deviceSynchronize(self):
        self.zeroing = None

    def free(self, p):
        self.live.remove(p)

    def ipcGetMemHandle(self, p):
        # shared only once zeroed: a peer's first writes could land before the memset's
        assert getattr(self, "zeroing", None) != p, "exported while its memset may be running"
        return p.to_bytes(8, "little")

    def ipcOpenMemHandle(self, h, flags):
        q = int.from_bytes(h, "little") + 7  # another process's address of it
        self.mapped.add(q)
        return q

    def ipcCloseMemHandle(self, q):
        self.mapped.remove(q)

    def hostAlloc(self, n, flags):  # pinned host memory: here plain host memory
        buf = ctypes.create_string_buffer(n)
        self.host[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def freeHost(self, p):
        del self.host[p]


def _fake(rt):
    """moe_flashcomm.comm.p2p on ``rt`` (in a spawned worker: the patches die with it)."""
    from moe_flashcomm.comm import p2p
    p2p._runtime = lambda: rt
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.device = lambda d: contextlib.nullcontext()
    torch.cuda.synchronize = lambda d=None: None
    return p2p


def limits() -> tuple:
    """The peer-to-peer memory limits a Communicator reads and hands its PeerBuffers."""
    return env.p2p_max_bytes(), env.p2p_copy_bytes()


def _protocol(rank, world, framed):
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(),
                           Framing(60) if framed else None)
    assert len(bufs.flag_ptrs) == world and bufs.flag_ptrs[rank] in rt.live
    assert all(q in rt.mapped for p, q in enumerate(bufs.flag_ptrs) if p != rank)
    bufs.reserve(3 << 20)
    first = list(bufs.data_ptrs)
    assert bufs.cap == 3 << 20 and first[rank] in rt.live and bufs.generation == 1
    bufs.reserve(1 << 20)  # fits: no collective, nothing changes
    assert bufs.data_ptrs == first and bufs.generation == 1
    bufs.reserve(5 << 20)  # grows to at least twice the old room, old buffers released
    assert bufs.cap == 6 << 20 and first[rank] not in rt.live and bufs.generation == 2
    assert not any(q in rt.mapped for p, q in enumerate(first) if p != rank)
    # one region per sender in every receiver's buffer, at fixed addresses
    assert [bufs.region(rank, p) - bufs.data_ptrs[rank] for p in range(world)] == \
        [p * (6 << 20) for p in range(world)]
    assert len(rt.host) == 1 and bufs.page.address in rt.host  # the kernels' error page
    bufs.check()  # nothing reported
    # what a decode kernel writes when a peer sent 5 int8 rows where 4 int4 were due
    peer = (rank + 1) % world
    int4, int8 = CodecConfig(bits=4), CodecConfig(bits=8)
    got, want = p2p.stamp(int8, 5, 64, torch.bfloat16), p2p.stamp(int4, 4, 64, torch.bfloat16)
    page = (ctypes.c_uint64 * K.P2P_ERROR_WORDS).from_address(bufs.page.address)
    page[:] = [1, peer, got, want, 9, K.P2P_ERROR_STAMP, 1]
    mismatch = (f"rank {peer} sent 5 rows of int8/g128\\+spikes records \\(torch.bfloat16, "
                "hidden 64\\); this rank expected 4 rows of int4/g128\\+spikes records")
    with pytest.raises(ConfigMismatchError, match=mismatch):
        bufs.check()
    bufs.check()  # read once: the flags stay in step after a stamp that differs
    page[:] = [1, peer, got, want, 9, K.P2P_ERROR_STAMP, 1]
    with pytest.raises(ConfigMismatchError, match=mismatch):
        bufs.close()  # everything freed first, then raised
    assert not rt.live and not rt.mapped and not rt.host


def _timeout(rank, world):
    """What the host makes of a kernel's wait that timed out (csrc/p2p.cu writes the page)."""
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(), Framing(60))
    bufs.reserve(1 << 20)
    page = (ctypes.c_uint64 * K.P2P_ERROR_WORDS).from_address(bufs.page.address)
    peer = (rank + 1) % world
    page[:] = [1, peer, 11, 12, 12, K.P2P_ERROR_LANDED_TIMEOUT, 1]
    said = (f"group rank {rank} of {world} waited 7 s on the GPU, at its peer-to-peer call #12, "
            f"for rank {peer} for its records \\(\"landed\"\\): its last call seen here is #11")
    with pytest.raises(PeerTimeoutError, match=said):
        bufs.check()
    assert page[K.P2P_ERROR_SET] == 1  # kept, so the kernels still queued give up at once
    with pytest.raises(PeerTimeoutError, match=said):  # every later call, too
        bufs.check()
    with pytest.raises(PeerTimeoutError, match=said):
        bufs.reserve(8 << 20)  # no growth (a collective) once out of step
    assert bufs.cap == 1 << 20
    bufs.close()  # raised already: not again; everything freed
    assert not rt.live and not rt.mapped and not rt.host


def _failure(rank, world):
    total = world * (4 << 20)
    rt = FakeRuntime(rank, fail_size=total if rank == world - 1 else -1)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(), Framing(60))
    with pytest.raises(RuntimeError, match=rf"ranks \[{world - 1}\] could not allocate"):
        bufs.reserve(4 << 20)
    assert bufs.cap == 0 and len(rt.live) == 1  # only the flags: the new buffer was freed


@pytest.mark.parametrize("framed", [False, True], ids=["all_gather_object", "framed"])
def test_p2p_buffers_protocol_gloo_3(framed):
    spawn(_protocol, 3, framed)


def _growth_after_capture(rank, world, framed):
    """Buffers a CUDA graph was captured on (one rank's, here rank 1's) are kept by every
    rank when they grow, until close(): the graph's kernels hold their addresses (they were
    freed and unmapped, and a replay wrote into released memory); without a capture they go."""
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(),
                           Framing(60) if framed else None)
    bufs.reserve(1 << 20)
    first = list(bufs.data_ptrs)
    bufs.captured = rank == 1  # (what begin() notes during a capture)
    bufs.reserve(3 << 20)
    assert bufs.retired == [first] and not bufs.captured
    assert first[rank] in rt.live and all(q in rt.mapped for p, q in enumerate(first) if p != rank)
    second = list(bufs.data_ptrs)
    bufs.reserve(9 << 20)  # no capture since: released
    assert second[rank] not in rt.live and bufs.retired == [first]
    bufs.close()
    assert not rt.live and not rt.mapped and not rt.host


@pytest.mark.parametrize("framed", [False, True], ids=["all_gather_object", "framed"])
def test_p2p_buffers_a_graph_holds_are_kept_gloo_3(framed):
    spawn(_growth_after_capture, 3, framed)


def _growth_alone(rank, world):
    """Sizes that disagree where the buffers must grow: rank 0 grows, rank 1 does not. Over
    gloo the handles travel framed, so rank 0 raises after the timeout, naming rank 1."""
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(), Framing(2))
    bufs.reserve(1 << 20)
    if rank == 1:  # its call fits: no collective (its kernels would wait for rank 0)
        bufs.reserve(1 << 20)
        time.sleep(6)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError, match=r"moe_flashcomm.peer-to-peer buffers: group rank "
                                               r"0 of 2, .* nothing came from ranks \[1\]"):
        bufs.reserve(8 << 20)
    assert 2 <= time.monotonic() - start < 10
    assert bufs.cap == 1 << 20 and len(rt.live) == 2  # flags and the old buffer; the new freed
    with pytest.raises(PeerTimeoutError, match="nothing came from ranks"):
        bufs.check()  # out of step from here: every later call raises
    os._exit(0)  # the exchange is in flight: leave without tearing the group down


def test_p2p_buffers_grown_on_one_rank_only_gloo_2():
    spawn(_growth_alone, 2, timeout=60)


def test_p2p_wait_timeout_raises_at_every_later_call_gloo_2():
    spawn(_timeout, 2)


def test_p2p_buffers_failed_allocation_raises_everywhere_gloo_2():
    spawn(_failure, 2)


def _freeing(rank, world):
    """What frees a communicator's peer buffers: close(), once, even when a release fails
    part-way (the rest leaks rather than be freed twice by a later caller: the address may be
    reused by then); dropped without close(), the finalizer at once, unless a CUDA graph
    captured on them may still replay."""
    from moe_flashcomm import Communicator
    rt = FakeRuntime(rank)
    p2p = _fake(rt)

    def communicator():
        comm = Communicator()
        bufs = comm._peer_buffers[0] = p2p.PeerBuffers(  # (where a CUDA call puts them)
            None, rank, world, torch.device("cpu"), 7, limits(), comm.framing)
        bufs.reserve(1 << 20)
        return comm, bufs

    comm, bufs = communicator()
    flags, data, free = bufs.flag_ptrs[rank], bufs.data_ptrs[rank], rt.free

    def failing(p):
        if p == flags:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        free(p)
    rt.free = failing
    with pytest.raises(RuntimeError, match="illegal memory access"):
        comm.close()
    rt.free = free
    assert rt.live == {flags} and not comm._peer_buffers and not bufs.data_ptrs
    del comm, bufs  # (the finalizer finds nothing left to free: a second free would raise)
    assert rt.live == {flags} and data not in rt.live
    rt.live.clear()

    for captured in (False, True):
        comm, bufs = communicator()
        bufs.captured = captured  # (what begin() notes during a capture)
        mine = [bufs.data_ptrs[rank], bufs.flag_ptrs[rank]]
        del comm, bufs
        assert all((p in rt.live) == captured for p in mine), captured


def test_p2p_buffers_are_freed_once_gloo_2():
    spawn(_freeing, 2)


def _mapping_refused(rank, world, framed):
    """Growth where rank 1 cannot map a peer's new buffer (cudaIpcOpenMemHandle fails after
    the handles were shared): every rank raises, naming rank 1, frees the new memory and keeps
    its old buffers, so the group stays in step and grows together at the next call."""
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7, limits(),
                           Framing(60) if framed else None)
    bufs.reserve(1 << 20)
    old, live, mapped = list(bufs.data_ptrs), set(rt.live), set(rt.mapped)
    opened = rt.ipcOpenMemHandle
    if rank == 1:
        calls = itertools.count()

        def refuse(h, flags):  # the second peer's mapping fails, after one succeeded
            if next(calls) == 1:
                raise RuntimeError("cudaErrorMapBufferObjectFailed (stand-in)")
            return opened(h, flags)
        rt.ipcOpenMemHandle = refuse
    with pytest.raises(RuntimeError, match=r"ranks \[1\] could not map their peers' new "
                                           r"\d+-byte buffers"):
        bufs.reserve(3 << 20)
    assert (bufs.data_ptrs, bufs.cap, bufs.generation) == (old, 1 << 20, 1)
    assert (rt.live, rt.mapped, bufs.failed) == (live, mapped, None)  # new memory freed
    rt.ipcOpenMemHandle = opened
    bufs.reserve(3 << 20)  # the next call's growth: together
    assert bufs.cap == 3 << 20 and bufs.generation == 2 and old[rank] not in rt.live
    bufs.close()
    assert not rt.live and not rt.mapped


@pytest.mark.parametrize("framed", [False, True])
def test_p2p_buffers_refused_mapping_raises_everywhere_gloo_3(framed):
    spawn(_mapping_refused, 3, framed)


def _memory_limit(rank, world):
    """MOE_FLASHCOMM_P2P_MAX_MB bounds the device memory of a rank's receive buffer, where
    the limit is not a whole MiB per sender too (its regions are whole MiB where that fits)."""
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    for max_mb, needs in ((1, (1000, 200_000, 349_520)),  # (1 MiB / 3: 349,525 bytes)
                          (4096, (5 << 20, 1365 << 20, (1365 << 20) + 300_000))):
        bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"), 7,
                               (max_mb << 20, limits()[1]), Framing(60))
        for need in needs:  # what a plan takes this transport for: need * world <= limit
            assert need * world <= max_mb << 20
            bufs.reserve(need)
            allocated = rt.sizes[bufs.data_ptrs[rank]]
            assert need <= bufs.cap and bufs.cap % 16 == 0 and allocated == world * bufs.cap
            assert allocated <= max_mb << 20, (max_mb, need, allocated)
        assert bufs.cap % (1 << 20) == 0 or bufs.cap == (max_mb << 20) // world // 16 * 16
        bufs.close()
    assert not rt.live and not rt.mapped


def test_p2p_buffers_stay_within_the_memory_limit_gloo_3():
    spawn(_memory_limit, 3)


def test_exchange_table_tickets():
    """The one-launch call's tasks (csrc/p2p.cu's p2p_exchange): encode tickets first, then
    the kept rows' copy, then the decodes, each task's tickets contiguous; an empty pair takes
    one block that only moves its flags; every task's items are the codec's own launch's."""
    from moe_flashcomm.codec import cuda as C
    from moe_flashcomm.comm import p2p
    H, cfg, dtype, rank = 7168, CodecConfig(bits=4), torch.bfloat16, 1
    region = lambda owner, sender: (owner << 32) + (sender << 20)  # noqa: E731
    # (peer, first row, rows, address of the records), in ticket order
    sends = [(p, first, rows, region(p, rank))
             for p, first, rows in [(2, 40, 8), (3, 48, 0), (0, 0, 20)]]
    recvs = [(p, first, rows, region(rank, p))
             for p, first, rows in [(0, 0, 5), (3, 5, 0), (2, 5, 9)]]
    row = H * dtype.itemsize
    keep = (20 * row, 14 * row, 20 * row)
    table, blocks = p2p.exchange_table(sends, recvs, H, cfg, dtype, keep)
    t = table[0]
    assert (t["sends"], t["tasks"]) == (3, 6)
    ticket = 0
    for i, (kind, (peer, first, rows, remote)) in enumerate([("encode", e) for e in sends]
                                                            + [("decode", e) for e in recvs]):
        if i == 3:  # the copy of the kept rows sits between encodes and decodes
            assert t["keep_first"] == ticket and t["keep_blocks"] == K.copy_blocks(keep[2])
            assert (t["keep_src"], t["keep_dst"]) == keep[:2]
            ticket += int(t["keep_blocks"])
        task = t["task"][i]
        pieces = (C.encode_pieces(rows, H, cfg, dtype, True) if kind == "encode"
                  else C.decode_pieces(rows, H, cfg, dtype))[1]
        want_blocks, want_items = (pieces[0][0], int(pieces[0][3]["total"][0])) if rows else (1, 0)
        assert (task["peer"], task["offset"], task["remote"]) == (peer, first * row, remote)
        assert (task["first"], task["blocks"], task["items"]) == (ticket, want_blocks, want_items)
        ticket += want_blocks
    assert blocks == ticket
    # a pair past 2^31 items would take two launches of the codec: no one-launch table
    huge = (2**31 // (H // 32)) + 1
    assert p2p.exchange_table([(0, 0, huge, 0)], [(0, 0, 1, 0)], H, cfg, dtype, (0, 0, 0)) is None


def _stamp_reports(rank, world):
    from moe_flashcomm.comm import p2p
    a, b = CodecConfig(bits=4, spikes=False), CodecConfig(bits=3, group_size=64)
    got, want = p2p.stamp(b, 3, 1024, torch.bfloat16), p2p.stamp(a, 3, 1024, torch.bfloat16)
    for kind, call, same, size in (  # (the all-reduce's stamps carry its numel as "hidden")
            (K.P2P_ERROR_STAMP, "all_to_all", "hidden size and split sizes", "hidden 1024"),
            (K.P2P_ERROR_REDUCE_STAMP, "all_reduce", "dtype and number of values",
             "numel 1024 mod 16384")):
        msg = p2p.stamp_mismatch([1, 1, got, want, 0, kind, 1], None, rank, world, "next call")
        assert msg.startswith(f"moe_flashcomm.{call}: ranks of the group disagree (seen by "
                              f"group rank {rank} of {world}"), msg
        assert (f"rank 1 sent 3 rows of int3/g64+spikes records (torch.bfloat16, {size}); "
                "this rank expected 3 rows of int4/g128 records") in msg, msg
        assert same in msg, msg
    # a rank's mark in place of a stamp: it saw ranks disagree (the hierarchical all-reduce)
    msg = p2p.stamp_mismatch([1, 1, K.SAW_DISAGREEMENT, want, 0, K.P2P_ERROR_REDUCE_STAMP, 1],
                             None, rank, world, "next call")
    assert ("rank 1 sent a mark that it saw ranks of the group disagree earlier in this call; "
            "this rank expected 3 rows of int4/g128 records") in msg, msg
    # the same stamp with another numel in the slot's second word (numels 2^14 apart)
    msg = p2p.stamp_mismatch([1, 1, 17413, 1029, 0, K.P2P_ERROR_REDUCE_NUMEL, 1], None, rank,
                             world, "next call")
    assert msg.startswith("moe_flashcomm.all_reduce: ranks of the group disagree"), msg
    assert ("rank 1 sent the records of a tensor of 17413 values; this rank expected 1029 "
            "values") in msg, msg


def test_stamp_report_names_the_call_that_found_it():
    """A stamp that differs, as the host words it: found by an all-to-all's decode or by the
    all-reduce's fused reduction (its reduce-scatter: kind P2P_ERROR_REDUCE_STAMP, or
    P2P_ERROR_REDUCE_NUMEL for the numel in the slot's second word)."""
    spawn(_stamp_reports, 2)


@pytest.mark.parametrize("p2p, shm, path", [
    (None, None, "nvlink"), ("1", None, "host"), ("1", "1", "network"), (" 1", "0x1", "network"),
    ("01", "1", "network"), ("+1", "", "host"), ("1abc", None, "host"),
    ("0", "1", "nvlink"), ("", None, "nvlink"), ("2", None, "nvlink"), ("-1", None, "nvlink"),
    ("true", None, "nvlink"), ("yes", None, "nvlink"), ("on", None, "nvlink"),
    ("1", "true", "host"), ("1", "2", "host")])
def test_nccl_switches_are_read_as_nccl_reads_them(monkeypatch, p2p, shm, path):
    """NCCL_P2P_DISABLE / NCCL_SHM_DISABLE turn NCCL's transport off only where strtol(value,
    NULL, 0) is 1 (its ncclGetLevel and ncclParamShmDisable): with "true", "yes" or 2 NCCL
    still uses NVLink, and so must the link class this library names (the size gate's row,
    whether the peer-to-peer transport may run)."""
    from moe_flashcomm.comm.topology import intra_node_path
    for name, value in (("NCCL_P2P_DISABLE", p2p), ("NCCL_SHM_DISABLE", shm)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert intra_node_path("cuda") == path
    assert intra_node_path("cpu") == "cpu"


def test_the_error_page_is_cleared_reported_first_claimed_last():
    """A kernel may claim the page while the host clears it. Cleared claimed-first, the
    claim survived and its report was wiped: the page stayed claimed and never reported
    again. Cleared the other way round, such a kernel finds it claimed and drops its report."""
    import numpy as np
    from moe_flashcomm import kernels as K
    from moe_flashcomm.comm import p2p
    writes = []

    class Words(np.ndarray):
        def __setitem__(self, key, value):
            writes.append(key)
            super().__setitem__(key, value)
    page = p2p.ErrorPage.__new__(p2p.ErrorPage)
    page.words = np.arange(1, K.P2P_ERROR_WORDS + 1, dtype=np.uint64).view(Words)
    page.clear()
    assert not page.words.any() and page.report() is None
    covered = [set(range(K.P2P_ERROR_WORDS)[w]) if isinstance(w, slice) else {w} for w in writes]
    assert covered[0] == {K.P2P_ERROR_SET} and covered[-1] == {0}
    assert set().union(*covered) == set(range(K.P2P_ERROR_WORDS))
