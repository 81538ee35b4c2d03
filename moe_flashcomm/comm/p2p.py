"""Peer-to-peer transport for the all-to-all of GPUs on one node (NVLink).

NCCL moves an all-to-all's bytes with its own kernels after ours have written them to a
send buffer. Inside a node the encode kernel can write the records straight into the
receiving GPU's memory instead, through CUDA IPC: the quantization and the transfer become
one pass, and NCCL's launch and staging disappear. Per call, on the current stream:

  1. for each peer: encode its rows into that peer's receive buffer (remote stores);
  2. one small kernel (csrc/p2p.cu) publishes "call e has landed" into every peer's flag
     and waits for every peer's flag (a device-side barrier: no host synchronisation);
  3. copy the rows this rank keeps, decode what every peer wrote into our buffer.

Receive buffers alternate between two slots by call parity: a sender writes call e+2 into
the slot of call e only after the barrier of call e+1, which every receiver passes only
after it has decoded call e (stream order), so one barrier per call is enough.

Every rank of the group must take this path for the same calls, so the decision uses only
what every rank knows: the route (all peers on this node over NVLink, decided once,
collectively) and the call's sizes (even splits, or a group of two ranks whose one pair both
sides know). Buffers grow collectively, when such a call needs more room.

``MOE_FLASHCOMM_P2P=0`` turns the transport off (read when a configuration is first used).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import env

MAX_PEERS = 16  # kMaxPeers in csrc/p2p.cu
SLOTS = 2
ALIGN = 1 << 20  # per-sender regions are whole MiB (16-byte record stores need 16)
TIMEOUT_S = 120  # a barrier that waits this long traps (a rank died): no silent hang
# Records for one peer from this size are encoded locally and moved by the copy engine in
# COPY_CHUNKS pipelined parts; smaller ones are stored into the peer by the encode kernel.
# Measured on 2x H200 (tools/p2p_stages.py, docs/benchmarks.md): remote stores move ~250 GB/s,
# the copy engine ~375 GB/s but costs a local round trip and more launches; at 256 MiB per
# rank int8 (72 MB per peer) gains, int4 (39 MB) and int2 lose.
COPY_CHUNKS = 2

P2P_ARGS = np.dtype([("peer_flags", "<u8", (MAX_PEERS,)), ("epoch", "<u8"),
                     ("timeout_ns", "<u8"), ("rank", "<i4"), ("world", "<i4")])


enabled = env.p2p_enabled
max_bytes = env.p2p_max_bytes  # most device memory one rank's receive buffers may take
copy_engine_bytes = env.p2p_copy_bytes


def _runtime():
    import cupy
    return cupy, cupy.cuda.runtime


def _view(ptr: int, nbytes: int, device: torch.device, owner) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of device memory at ``ptr`` (local or a peer's mapping)
    labelled with ``device``, the device whose kernels will access it."""
    cupy, _ = _runtime()
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device_id=device.index)
    arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
    return torch.from_dlpack(arr)


class PeerBuffers:
    """Receive buffers and flags of one process group on one device, mapped by every peer.

    Create with :func:`peer_buffers` (collective). ``cap`` is the bytes one sender may write
    per call; the buffer holds ``SLOTS x world`` such regions.
    """

    def __init__(self, group, rank: int, world: int, device: torch.device) -> None:
        self.group, self.rank, self.world, self.device = group, rank, world, device
        self.epoch = 0
        self.cap = 0
        self.stream: Optional[int] = None  # the stream of the last call
        self.flag_ptrs = self._exchange(8 * MAX_PEERS)
        self.data_ptrs: list[int] = []
        self.data: list[torch.Tensor] = []  # uint8 view of each rank's receive buffer
        self._barrier = None  # (kernel, argument struct)

    # -- collective setup ------------------------------------------------------------------
    def _exchange(self, nbytes: int) -> list[int]:
        """Allocate ``nbytes`` of zeroed device memory; every rank's allocation as mapped in
        this process (ours as is). Collective: every rank takes part in the gather even when
        its own allocation or export failed (then every rank raises), so none is left waiting."""
        _, rt = _runtime()
        ptr = handle = None
        try:
            ptr = _cudamalloc_zeroed(nbytes, self.device)
            with torch.cuda.device(self.device):
                handle = bytes(rt.ipcGetMemHandle(ptr))
        except Exception:
            handle = None
        handles: list = [None] * self.world
        dist.all_gather_object(handles, handle, group=self.group)
        if any(h is None for h in handles):
            if ptr is not None:
                with torch.cuda.device(self.device):
                    rt.free(ptr)
            raise RuntimeError(f"ranks {[p for p, h in enumerate(handles) if h is None]} "
                               f"could not allocate {nbytes} bytes or export them through CUDA IPC")
        ptrs = []
        with torch.cuda.device(self.device):
            for p, h in enumerate(handles):
                ptrs.append(ptr if p == self.rank else
                            rt.ipcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess))
        return ptrs

    def _release(self, ptrs: list[int]) -> None:
        """Unmap the peers' entries of ``ptrs`` and free ours."""
        _, rt = _runtime()
        with torch.cuda.device(self.device):
            for p, q in enumerate(ptrs):
                if p == self.rank:
                    rt.free(q)
                else:
                    rt.ipcCloseMemHandle(q)

    def reserve(self, nbytes: int) -> None:
        """Make every sender region hold ``nbytes``. Collective when it grows: call only
        with a size every rank of the group computes identically."""
        if nbytes <= self.cap:
            return
        # double to grow rarely, within the memory limit; make_plan checked nbytes against it
        cap = max(-(-nbytes // ALIGN) * ALIGN,
                  min(2 * self.cap, max_bytes() // (SLOTS * self.world) // ALIGN * ALIGN))
        total = SLOTS * self.world * cap
        torch.cuda.synchronize(self.device)  # our writes into the old buffers are done
        # the gather inside _exchange is a barrier: every rank has synchronised, so nobody
        # still reads or writes the old buffers when they go
        ptrs = self._exchange(total)
        if self.data_ptrs:
            self._release(self.data_ptrs)
        self.data_ptrs, self.cap = ptrs, cap
        self.data = [_view(q, total, self.device, self) for q in ptrs]

    # -- per call --------------------------------------------------------------------------
    def begin(self) -> int:
        """Start a call on the current stream: its slot."""
        from ..codec.cuda import _raw_stream
        stream = _raw_stream(self.device.index)
        if self.stream is not None and stream != self.stream:
            # the slot reasoning needs the calls in one stream order
            torch.cuda.current_stream(self.device).wait_stream(
                torch.cuda.ExternalStream(self.stream, device=self.device))
        self.stream = stream
        self.epoch += 1
        return self.epoch % SLOTS

    def region(self, owner: int, slot: int, sender: int, nbytes: int) -> torch.Tensor:
        """Bytes of ``owner``'s buffer where ``sender`` writes in ``slot``."""
        start = (slot * self.world + sender) * self.cap
        return self.data[owner][start:start + nbytes]

    def barrier(self) -> None:
        """After this (on the stream) every peer's writes of this call are in our buffer."""
        from ..codec import cuda
        if self._barrier is None:
            flags = list(self.flag_ptrs) + [0] * (MAX_PEERS - self.world)
            args = cuda._struct(P2P_ARGS, peer_flags=flags, timeout_ns=TIMEOUT_S * 10**9,
                                rank=self.rank, world=self.world)
            fn = cuda._function(self.device.index, "p2p.cu", "mfc::p2p_barrier")
            self._barrier = fn, args, cuda.by_value(args)
        fn, args, arg = self._barrier
        args["epoch"] = self.epoch  # in place: the launch copies the value
        cuda._run(self.device.index, fn, 1, [arg])

    def close(self) -> None:
        """Unmap the peers' memory and free ours (after the device is idle)."""
        torch.cuda.synchronize(self.device)
        for ptrs in (self.data_ptrs, self.flag_ptrs):
            if ptrs:
                self._release(ptrs)
        self.data_ptrs, self.flag_ptrs, self.data = [], [], []


def _cudamalloc_zeroed(nbytes: int, device: torch.device) -> int:
    """Device memory outside torch's caching allocator (its blocks are not IPC-safe
    one by one)."""
    _, rt = _runtime()
    with torch.cuda.device(device):
        ptr = rt.malloc(nbytes)
        rt.memset(ptr, 0, nbytes)
    return ptr


_buffers: dict = {}


def peer_buffers(group, rank: int, world: int, device: torch.device) -> Optional[PeerBuffers]:
    """The PeerBuffers of ``group`` on ``device``, or None where the transport cannot run on
    every rank (CuPy missing, more than MAX_PEERS ranks, memory not mappable). Collective the
    first time for a group: every rank of it must call it then."""
    from .check import group_key
    key = (group_key(group), device.index)
    if key in _buffers:
        return _buffers[key]
    ok = 2 <= world <= MAX_PEERS
    try:
        _runtime()
    except ImportError:
        ok = False
    bufs = None
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if flag.item():
        try:
            bufs = PeerBuffers(group, rank, world, device)
            err = ""
        except Exception as e:  # e.g. the IPC mapping is refused: every rank falls back
            err = f"{type(e).__name__}: {e}"
        flag = torch.tensor([int(not err)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            from .topology import _warn_once
            _warn_once(f"moe_flashcomm: peer-to-peer all-to-all unavailable ({err or 'on a peer'}); "
                       "NCCL carries the intra-node traffic")
            if bufs is not None:
                bufs.close()
            bufs = None
    _buffers[key] = bufs
    return bufs
