"""The collective protocol of the peer-to-peer transport's buffers (moe_flashcomm/comm/p2p.py)
over real gloo process groups, on a CPU machine: device memory and CUDA IPC are replaced by a
bookkeeping stand-in (the data path itself runs only on GPUs: tests/test_all_to_all.py,
multigpu). Checked: every rank maps every other rank's allocation, growth replaces and frees the
old buffers, and one rank's failed allocation makes every rank raise instead of leaving the
others waiting in a collective.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools

import pytest
import torch

from moe_flashcomm.codec import CodecConfig
from moe_flashcomm.comm import ConfigMismatchError
from tests.distributed import spawn


class FakeRuntime:
    """cudaMalloc / CUDA IPC bookkeeping: pointers are numbers, handles carry them."""
    cudaIpcMemLazyEnablePeerAccess = 1

    def __init__(self, rank: int, fail_size: int = -1) -> None:
        self.next = itertools.count((rank + 1) << 40, 1 << 30)
        self.live, self.mapped, self.fail_size = set(), set(), fail_size
        self.host: dict = {}

    def malloc(self, n):
        if n == self.fail_size:
            raise MemoryError("out of device memory")
        p = next(self.next)
        self.live.add(p)
        return p

    def memset(self, p, v, n):
        assert p in self.live

    def free(self, p):
        self.live.remove(p)

    def ipcGetMemHandle(self, p):
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


def _protocol(rank, world):
    rt = FakeRuntime(rank)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"))
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
    assert len(rt.host) == 1 and bufs._error_page in rt.host  # the kernels' error page
    bufs.check()  # nothing reported
    # what a decode kernel writes when a peer sent 5 int8 rows where 4 int4 were due
    peer = (rank + 1) % world
    int4, int8 = CodecConfig(bits=4), CodecConfig(bits=8)
    got, want = p2p.stamp(int8, 5, 64, torch.bfloat16), p2p.stamp(int4, 4, 64, torch.bfloat16)
    (ctypes.c_uint64 * 6).from_address(bufs._error_page)[:] = [1, peer, got, want, 9, 1]
    with pytest.raises(ConfigMismatchError, match=(
            f"rank {peer} sent 5 rows of int8/g128\\+spikes records \\(torch.bfloat16, hidden "
            "64\\); this rank expected 4 rows of int4/g128\\+spikes records")):
        bufs.close()  # everything freed first, then raised
    assert not rt.live and not rt.mapped and not rt.host


def _failure(rank, world):
    total = world * (4 << 20)
    rt = FakeRuntime(rank, fail_size=total if rank == world - 1 else -1)
    p2p = _fake(rt)
    bufs = p2p.PeerBuffers(None, rank, world, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=rf"ranks \[{world - 1}\] could not allocate"):
        bufs.reserve(4 << 20)
    assert bufs.cap == 0 and len(rt.live) == 1  # only the flags: the new buffer was freed


def test_p2p_buffers_protocol_gloo_3():
    spawn(_protocol, 3)


def test_p2p_buffers_failed_allocation_raises_everywhere_gloo_2():
    spawn(_failure, 2)
