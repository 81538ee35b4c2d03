"""Flat quantized all-to-all: rows are encoded per destination link, exchanged as one flat
byte buffer per chunk (one ``all_to_all_single``), and decoded on arrival.

Wire per (rank, peer) pair, decided on both sides from the pair's row count alone:
  * ``RAW``: the rows' own bytes. Rows a rank keeps (never leave it), the "native" codec
    (any dtype), and bf16 passthrough of 16-bit input (exact).
  * a CodecConfig: ``record_bytes(H, codec)`` per row (moe_flashcomm.codec records). The
    size gate turns a pair's codec into the bf16 passthrough below its threshold.
So every rank computes its byte splits from row splits, and metadata travels inside the
records: no second collective. The byte buffers travel typed as the tokens' dtype (every
segment is a whole number of its items: rows, or records of 16-byte multiples), so a rank
whose pairs are all size-gated can send its tensor as it is and still pair with a rank that
sends records: both ends of every pair use the same element type. Likewise the even form of
``all_to_all_single`` (no split lists) is used only where no rank passed split sizes
(``uniform``), so every rank of a call takes the same form.

On CUDA with ``chunks`` > 1 each peer's rows are cut into ``chunks`` parts; chunk k's
encode runs on the current stream, its transfer on NCCL's stream, its decode on a side
stream, so encode(k+1), transfer(k) and decode(k-1) overlap.

Inside one node over NVLink the bytes skip NCCL: encode kernels write the records straight
into the peers' memory (``comm/p2p.py``) for calls whose sizes every rank knows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..codec import CodecConfig, record_bytes
from ..codec import decode as _codec_decode
from ..codec import encode as _codec_encode
from ..codec import reference as _reference
from .gate import wire_gate
from . import p2p
from .plan import chunk_range, offsets
from .topology import _warn_once

RAW = "raw"
Wire = Union[CodecConfig, str, None]  # None: not in the exchange (a rank's own rows)
RAW_DTYPES = (torch.bfloat16, torch.float16)  # passthrough is exact for these ("native": all)
OWN_SIDE_BYTES = 4 << 20  # peer-to-peer: own rows from this size are copied on a side stream
ALGORITHMS = ("flat", "hierarchical", "auto")  # the last two: comm/hierarchical.py


@dataclass(frozen=True)
class Route:
    """One direction of an all-to-all in a group, independent of sizes.

    codecs[p] / thresholds[p]: codec and size-gate threshold (bf16 bytes) towards group
    rank p; the entries at ``rank`` are unused (own rows are copied).
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    codecs: tuple
    thresholds: tuple
    plans: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    paths: tuple = ()  # link path towards each group rank (topology.PATHS), if known
    p2p: Optional[p2p.PeerBuffers] = field(default=None, compare=False, hash=False, repr=False)

    def without_p2p(self) -> "Route":
        """This route with NCCL carrying every pair (its own plan cache)."""
        return dataclasses.replace(self, p2p=None, plans={})

    def wire(self, peer: int, rows: int, hidden: int, dtype: torch.dtype) -> Wire:
        cfg = wire_gate(self.codecs[peer], rows * hidden * 2, self.thresholds[peer])
        exact = cfg.is_native or (cfg.is_passthrough and dtype in RAW_DTYPES)
        return RAW if exact else cfg


def row_bytes(wire: Wire, hidden: int, dtype: torch.dtype) -> int:
    """Bytes one row takes on the wire."""
    if wire is None:
        return 0
    if wire == RAW:
        return hidden * dtype.itemsize
    return record_bytes(hidden, wire, dtype)


# ---- codec calls (CUDA kernels; the CPU reference where the kernels are missing) ----------
@functools.lru_cache(maxsize=None)
def _cuda_codec():
    """moe_flashcomm.codec.cuda, or None (then CUDA tensors go through the CPU reference)."""
    try:
        from ..codec import cuda
        return cuda
    except ImportError as e:
        _warn_once(f"moe_flashcomm: CUDA codec kernels unavailable ({e}); CUDA tensors "
                   "are encoded/decoded by the CPU reference (slow)")
        return None


@functools.lru_cache(maxsize=None)
def _impl(name: str) -> tuple:
    """The kernels' ``encode_impl``/``decode_impl`` (inputs already validated here: no
    custom-op dispatch, whose host time small messages feel) and whether it takes ``out=``;
    (None, False) without kernels."""
    fn = getattr(_cuda_codec(), name, None)
    return (fn, fn is not None and "out" in inspect.signature(fn).parameters)


def encode(x: torch.Tensor, cfg: CodecConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens [n, H] (contiguous, validated) -> records uint8 [n, record_bytes], written to
    ``out`` (contiguous, 16-byte aligned) when given."""
    fn, takes_out = _impl("encode_impl") if x.is_cuda else (None, False)
    if fn is not None:
        seed = _reference.resolve_seed(None) if cfg.is_int and cfg.rounding == "stochastic" else 0
        if takes_out and out is not None:
            return fn(x, cfg, seed, out=out)
        rec = fn(x, cfg, seed)
    elif x.is_cuda and _cuda_codec() is None:
        rec = _reference.encode(x.cpu(), cfg).to(x.device)
    else:
        rec = _codec_encode(x, cfg)
    return rec if out is None else out.copy_(rec)


def decode(rec: torch.Tensor, cfg: CodecConfig, hidden: int, dtype: torch.dtype,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Records uint8 [n, record_bytes] -> tokens [n, hidden] of ``dtype``, written to ``out``
    (contiguous [n, hidden]) when given."""
    fn, takes_out = _impl("decode_impl") if rec.is_cuda else (None, False)
    if fn is not None:
        if takes_out and out is not None:
            return fn(rec, cfg, hidden, dtype, out=out)
        y = fn(rec, cfg, hidden, dtype)
    elif rec.is_cuda and _cuda_codec() is None:
        y = _reference.decode(rec.cpu(), cfg, hidden, dtype).to(rec.device)
    else:
        y = _codec_decode(rec, cfg, hidden, dtype)
    return y if out is None else out.copy_(y)


# ---- the exchange ------------------------------------------------------------------------
@dataclass
class _Seg:
    """``rows`` rows at row ``row`` of a tensor, ``wire`` on the wire, at byte ``byte``."""
    row: int
    rows: int
    wire: Wire
    byte: int = 0
    nbytes: int = 0


def _segments(row_off: Sequence[int], counts: Sequence[int], wires: Sequence[Wire],
              k: int, chunks: int, hidden: int, dtype: torch.dtype) -> tuple[list, list[int]]:
    """Segments of chunk ``k`` in peer order and the byte split per peer. With one chunk,
    neighbouring peers on the same wire merge into one segment (one encode/decode call)."""
    segs: list[_Seg] = []
    splits, byte = [], 0
    for p, (off, n, w) in enumerate(zip(row_off, counts, wires)):
        a, b = chunk_range(n, k, chunks)
        nbytes = (b - a) * row_bytes(w, hidden, dtype)
        splits.append(nbytes)
        if b > a and w is not None:
            last = segs[-1] if segs else None
            if chunks == 1 and last is not None and last.wire == w \
                    and last.row + last.rows == off + a and last.byte + last.nbytes == byte:
                last.rows += b - a
                last.nbytes += nbytes
            else:
                segs.append(_Seg(off + a, b - a, w, byte, nbytes))
        byte += nbytes
    return segs, splits


def _pack(x: torch.Tensor, segs: list[_Seg]) -> torch.Tensor:
    """The send buffer (flat uint8) of ``segs`` of ``x`` [T, H]: records encoded in place."""
    if len(segs) == 1 and segs[0].byte == 0:  # the buffer is the one segment's bytes
        s = segs[0]
        rows = x[s.row:s.row + s.rows]
        return (rows.view(torch.uint8) if s.wire == RAW else encode(rows, s.wire)).reshape(-1)
    total = segs[-1].byte + segs[-1].nbytes if segs else 0
    send = torch.empty(total, dtype=torch.uint8, device=x.device)
    for s in segs:
        rows, dst = x[s.row:s.row + s.rows], send[s.byte:s.byte + s.nbytes]
        if s.wire == RAW:
            dst.copy_(rows.view(torch.uint8).reshape(-1))
        elif s.byte % 16 == 0:  # the kernels store records with 16-byte writes
            encode(rows, s.wire, out=dst.view(s.rows, -1))
        else:
            dst.copy_(encode(rows, s.wire).reshape(-1))
    return send


def _unpack(recv: torch.Tensor, segs: list[_Seg], out: torch.Tensor) -> None:
    """Decode the flat uint8 ``recv`` into the rows of ``out`` [R, H] that ``segs`` name."""
    hidden = out.shape[1]
    for s in segs:
        raw = recv[s.byte:s.byte + s.nbytes]
        dst = out[s.row:s.row + s.rows]
        if s.wire == RAW:
            dst.view(torch.uint8).view(-1).copy_(raw)
        else:
            decode(raw.view(s.rows, -1), s.wire, hidden, out.dtype, out=dst)


_side_streams: dict = {}


def _side_stream(device: torch.device, role: str = "decode") -> "torch.cuda.Stream":
    """A stream of a device for ``role`` (one per process, device and role)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), role)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=key[0])
    return _side_streams[key]


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    return _side_stream(device, "copy")


class Pending:
    """A started all-to-all. ``wait()`` completes it and returns the output tensor; on CUDA
    the current stream is then ordered after it (like torch's ``Work.wait``)."""

    def __init__(self, works: list, finish: Callable[[], torch.Tensor]) -> None:
        self._works = works
        self._finish: Optional[Callable[[], torch.Tensor]] = finish
        self._result: Optional[torch.Tensor] = None

    def is_completed(self) -> bool:
        """True once the transfers are done (the decode may still be to run)."""
        return self._finish is None or all(w.is_completed() for w in self._works)

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result


@dataclass
class Plan:
    """How one all-to-all of given row splits moves: wires, chunks, segments, splits.
    A pure function of (route, row splits, hidden, dtype, chunks, uniform), cached per route."""

    fast: bool            # one all_to_all_single of the tensor itself (16-bit input: the
                          # passthrough codec, or every pair size-gated)
    uniform: bool         # no rank passed split sizes: all_to_all_single without lists
    out_total: int        # output rows
    own: tuple            # (input row, output row, rows) a rank keeps, copied aside
    chunks: list          # per chunk: (send segments, send splits, recv segments, recv splits),
                          # the splits in items of the tokens' dtype
    direct: bool          # one decoded segment is the whole output
    p2p: Optional[tuple] = None  # (bytes per sender region, sends, receives): the peer-to-peer
                          # transport, each entry (peer, row, rows, wire, bytes)


def make_plan(route: Route, in_rows: tuple, out_rows: tuple, hidden: int,
              dtype: torch.dtype, chunks: int, uniform: bool = False) -> Plan:
    """``uniform``: no rank of the call passed split sizes (every pair has in_rows[0] rows)."""
    r = route.rank
    own = (sum(in_rows[:r]), sum(out_rows[:r]), in_rows[r])
    send_w = [route.wire(p, n, hidden, dtype) for p, n in enumerate(in_rows)]
    recv_w = [route.wire(p, n, hidden, dtype) for p, n in enumerate(out_rows)]
    if all(w == RAW for p, w in enumerate(send_w + recv_w) if p % route.world != r):
        # every pair as the rows themselves (own rows included): the tensor as it is
        return Plan(True, uniform, sum(out_rows), own, [], False)
    send_w[r] = recv_w[r] = None  # own rows: copied aside, exactly
    chunks = max(1, chunks)
    in_off, out_off = offsets(in_rows), offsets(out_rows)
    if route.p2p is not None and (uniform or route.world == 2):
        # every rank knows every pair's size (no split sizes anywhere) or there is one pair:
        # every rank takes the same decision and reserves the same room
        sends = tuple((p, in_off[p], n, send_w[p], n * row_bytes(send_w[p], hidden, dtype))
                      for p, n in enumerate(in_rows) if p != r and n)
        recvs = tuple((p, out_off[p], n, recv_w[p], n * row_bytes(recv_w[p], hidden, dtype))
                      for p, n in enumerate(out_rows) if p != r and n)
        need = max([e[-1] for e in sends + recvs], default=0)
        if need * p2p.SLOTS * route.world <= p2p.max_bytes():
            return Plan(False, False, sum(out_rows), own, [], False, (need, sends, recvs))
    parts = []
    unit = dtype.itemsize
    for k in range(chunks):
        send_segs, send_bytes = _segments(in_off, in_rows, send_w, k, chunks, hidden, dtype)
        recv_segs, recv_bytes = _segments(out_off, out_rows, recv_w, k, chunks, hidden, dtype)
        parts.append((send_segs, _items(send_bytes, unit), recv_segs, _items(recv_bytes, unit)))
    first = parts[0][2]
    direct = (chunks == 1 and len(first) == 1 and first[0].wire != RAW
              and first[0].rows == sum(out_rows))
    return Plan(False, False, sum(out_rows), own, parts, direct)


def _items(nbytes: list, unit: int) -> list:
    """Byte splits as items of ``unit`` bytes (every segment is a whole number of them)."""
    assert all(n % unit == 0 for n in nbytes), (nbytes, unit)
    return [n // unit for n in nbytes]


def cached_plan(route: Route, in_rows: tuple, out_rows: tuple, hidden: int, dtype: torch.dtype,
                chunks: int, uniform: bool = False) -> Plan:
    """``make_plan``'s result, cached in ``route.plans``."""
    key = (in_rows, out_rows, hidden, dtype, chunks, uniform)
    plan = route.plans.get(key)
    if plan is None:
        if len(route.plans) > 256:
            route.plans.clear()
        plan = route.plans[key] = make_plan(route, in_rows, out_rows, hidden, dtype, chunks,
                                            uniform)
    return plan


def exchange(x: torch.Tensor, in_rows: tuple, out_rows: tuple, route: Route,
             chunks: int = 1, uniform: bool = False) -> Pending:
    """Start the all-to-all of ``x`` [T, H]: ``in_rows[p]`` rows go to group rank p and
    ``out_rows[p]`` rows come from it. ``uniform``: no rank of the call passed split sizes.
    Returns a Pending whose ``wait()`` gives the output [sum(out_rows), H] of ``x.dtype``."""
    x = x.contiguous()
    H, dtype, group = x.shape[1], x.dtype, route.group
    plan = cached_plan(route, in_rows, out_rows, H, dtype, chunks, uniform)

    if plan.p2p is not None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _exchange_p2p(x, plan, route)
    if plan.fast:  # bit-identical to all_to_all_single
        out = x.new_empty((plan.out_total, H))
        if plan.uniform:
            work = dist.all_to_all_single(out, x, group=group, async_op=True)
        else:
            work = dist.all_to_all_single(out, x, list(out_rows), list(in_rows), group=group,
                                          async_op=True)
        return Pending([work], lambda: (work.wait(), out)[1])

    if not plan.chunks:  # a peer-to-peer plan, met under graph capture: NCCL this time
        plan = make_plan(route.without_p2p(), in_rows, out_rows, H, dtype, chunks, uniform)
    out = None if plan.direct else x.new_empty((plan.out_total, H))
    side = _side_stream(x.device) if x.is_cuda and len(plan.chunks) > 1 else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))  # `out` is allocated
    works, buffers = [], []
    for send_segs, send_splits, recv_segs, recv_splits in plan.chunks:
        send = _pack(x, send_segs)
        recv = torch.empty(sum(recv_splits), dtype=dtype, device=x.device).view(torch.uint8)
        works.append(dist.all_to_all_single(recv.view(dtype), send.view(dtype), recv_splits,
                                            send_splits, group=group, async_op=True))
        buffers.append((send, recv, recv_segs))
    src, dst, n = plan.own
    if n:  # own rows: exact copy, overlapping the transfers
        out[dst:dst + n].copy_(x[src:src + n])

    def finish() -> torch.Tensor:
        nonlocal out
        stream = side if side is not None else (
            torch.cuda.current_stream(x.device) if x.is_cuda else None)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for work, (send, recv, recv_segs) in zip(works, buffers):
                work.wait()
                if plan.direct:
                    seg = recv_segs[0]
                    out = decode(recv.view(seg.rows, -1), seg.wire, H, dtype)
                else:
                    _unpack(recv, recv_segs, out)
                if stream is not None:  # keep the buffers until this stream is past them
                    send.record_stream(stream)
                    recv.record_stream(stream)
        if side is not None:
            torch.cuda.current_stream(x.device).wait_stream(side)
        buffers.clear()
        return out

    return Pending(works, finish)


def _exchange_p2p(x: torch.Tensor, plan: Plan, route: Route) -> Pending:
    """The exchange of ``plan`` through the peers' memory (comm/p2p.py) on the current
    stream: encode into the peers' buffers, barrier, decode ours; own rows copied aside."""
    bufs, H = route.p2p, x.shape[1]
    need, sends, recvs = plan.p2p
    bufs.reserve(need)
    slot = bufs.begin()
    out = x.new_empty((plan.out_total, H))
    src, dst_row, n = plan.own
    # a large copy of own rows overlaps the encodes on a side stream (they are bound by
    # instruction issue and NVLink, the copy by device memory)
    side = _side_stream(x.device) if n * H * x.element_size() >= OWN_SIDE_BYTES else None
    if n:
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            out[dst_row:dst_row + n].copy_(x[src:src + n])
    copier = None
    for p, row, rows, wire, nbytes in sends:
        dst = bufs.region(p, slot, route.rank, nbytes)
        if wire == RAW:
            dst.copy_(x[row:row + rows].view(torch.uint8).reshape(-1))
        elif nbytes < p2p.copy_engine_bytes():
            encode(x[row:row + rows], wire, out=dst.view(rows, -1))
        else:  # encode locally, the copy engine moves chunk k while chunk k+1 is encoded
            copier = copier or _copy_stream(x.device)
            _encode_and_copy(x[row:row + rows], wire, dst.view(rows, -1), copier)
    if copier is not None:
        torch.cuda.current_stream(x.device).wait_stream(copier)
    bufs.barrier()
    for p, row, rows, wire, nbytes in recvs:
        raw = bufs.region(route.rank, slot, p, nbytes)
        if wire == RAW:
            out[row:row + rows].view(torch.uint8).view(-1).copy_(raw)
        else:
            decode(raw.view(rows, -1), wire, H, x.dtype, out=out[row:row + rows])
    if side is not None:
        torch.cuda.current_stream(x.device).wait_stream(side)
    return Pending([], lambda: out)


def _encode_and_copy(rows: torch.Tensor, cfg: CodecConfig, dst: torch.Tensor,
                     copier: "torch.cuda.Stream") -> None:
    """Encode ``rows`` into a local buffer in p2p.COPY_CHUNKS parts, each copied into ``dst``
    (a peer's memory) on ``copier`` as soon as it is encoded. The copy engine moves bytes
    over NVLink faster than the encode kernel's own remote stores (docs/benchmarks.md)."""
    cur = torch.cuda.current_stream(rows.device)
    rec = torch.empty(dst.shape, dtype=torch.uint8, device=rows.device)
    n = rows.shape[0]
    for k in range(p2p.COPY_CHUNKS):
        a, b = chunk_range(n, k, p2p.COPY_CHUNKS)
        if b > a:
            encode(rows[a:b], cfg, out=rec[a:b])
            copier.wait_stream(cur)
            with torch.cuda.stream(copier):
                dst[a:b].copy_(rec[a:b])
    rec.record_stream(copier)
