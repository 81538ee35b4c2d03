"""Flat quantized all-to-all: rows are encoded per destination link, exchanged as one flat
byte buffer per chunk (one ``all_to_all_single``), and decoded on arrival.

Wire per (rank, peer) pair, decided on both sides from the pair's row count alone:
  * ``RAW``: the rows' own bytes. Rows a rank keeps (never leave it), the "native" codec
    (any dtype), and bf16 passthrough of 16-bit input (exact).
  * a CodecConfig: ``record_bytes(H, codec)`` per row (moe_flashcomm.codec records). The
    size gate turns a pair's codec into the bf16 passthrough below its threshold.
So every rank computes its byte splits from row splits, and metadata travels inside the
records: no second collective. On CUDA (unless MOE_FLASHCOMM_STAMPS=0) each pair's records
travel behind a 16-byte stamp of the pair (codec, rows, dtype, hidden) that the receiver's
decode kernel checks (``StampedCall``): ranks that disagree raise at the next call instead
of decoding garbage. The byte buffers travel typed as the tokens' dtype (every
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

Over gloo (CPU tensors) every pair travels behind a header its receiver checks
(``comm/frame.py``): ranks that disagree raise instead of aborting or decoding garbage.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from ..codec import CodecConfig, record_bytes
from ..codec import decode as _codec_decode
from ..codec import encode as _codec_encode
from ..codec import cuda as _cuda
from ..codec import reference as _reference
from .. import kernels
from ..memo import remember
from . import direct
from .check import ConfigMismatchError
from .gate import wire_gate
from . import frame as framing
from . import p2p
from .plan import chunk_range, offsets

RAW = "raw"
Wire = Union[CodecConfig, str, None]  # None: not in the exchange (a rank's own rows)
RAW_DTYPES = (torch.bfloat16, torch.float16)  # passthrough is exact for these ("native": all)
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
    streams: Optional["SideStreams"] = field(default=None, compare=False, hash=False, repr=False)
    framing: Optional[framing.Framing] = field(default=None, compare=False, hash=False,
                                               repr=False)  # gloo: headers (comm/frame.py)
    pages: Optional[dict] = field(default=None, compare=False, hash=False, repr=False)
    # CUDA: the communicator's error pages per device (p2p.ErrorPage); pairs of records
    # carry stamps its kernels check (StampedCall)

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


# ---- codec calls (CUDA kernels on CUDA tensors, the reference on CPU) ------------------------
def encode(x: torch.Tensor, cfg: CodecConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens [n, H] (contiguous, validated) -> records uint8 [n, record_bytes], written to
    ``out`` (contiguous, 16-byte aligned) when given."""
    if x.is_cuda:
        seed = _reference.resolve_seed(None) if cfg.is_stochastic else 0
        return _cuda.encode_impl(x, cfg, seed, out=out)
    rec = _codec_encode(x, cfg)
    return rec if out is None else out.copy_(rec)


def decode(rec: torch.Tensor, cfg: CodecConfig, hidden: int, dtype: torch.dtype,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Records uint8 [n, record_bytes] -> tokens [n, hidden] of ``dtype``, written to ``out``
    (contiguous [n, hidden]) when given."""
    if rec.is_cuda:
        return _cuda.decode_impl(rec, cfg, hidden, dtype, out=out)
    y = _codec_decode(rec, cfg, hidden, dtype)
    return y if out is None else out.copy_(y)


# ---- the exchange ------------------------------------------------------------------------
@dataclass
class _Seg:
    """``rows`` rows at row ``row`` of a tensor, ``wire`` on the wire, at byte ``byte``;
    ``peer``: the group rank they go to or come from (the first, where peers merged)."""
    row: int
    rows: int
    wire: Wire
    byte: int = 0
    nbytes: int = 0
    peer: int = -1


def _segments(row_off: Sequence[int], counts: Sequence[int], wires: Sequence[Wire],
              k: int, chunks: int, hidden: int, dtype: torch.dtype,
              stamped: bool = False) -> tuple[list, list[int]]:
    """Segments of chunk ``k`` in peer order and the byte split per peer. With one chunk,
    neighbouring peers on the same wire merge into one segment (one encode/decode call).
    ``stamped``: each pair's records follow a stamp of STAMP_BYTES (never merged)."""
    segs: list[_Seg] = []
    splits, byte = [], 0
    for p, (off, n, w) in enumerate(zip(row_off, counts, wires)):
        a, b = chunk_range(n, k, chunks)
        nbytes = (b - a) * row_bytes(w, hidden, dtype)
        stamp = stamp_bytes(stamped, w, b - a)
        splits.append(stamp + nbytes)
        if b > a and w is not None:
            last = segs[-1] if segs else None
            if chunks == 1 and not stamp and last is not None and last.wire == w \
                    and last.row + last.rows == off + a and last.byte + last.nbytes == byte:
                last.rows += b - a
                last.nbytes += nbytes
            else:
                segs.append(_Seg(off + a, b - a, w, byte + stamp, nbytes, p))
        byte += stamp + nbytes
    return segs, splits


# StampedCalls a plan keeps (one per device, or per reduce-scatter and device): a bound only
STAMPED_CALLS_KEPT = 64


def stamp_bytes(stamped: bool, wire: Wire, rows: int) -> int:
    """The bytes before a pair's rows on the wire: a stamp where the exchange is ``stamped``
    and the pair carries records (raw rows and empty pairs carry none)."""
    return kernels.STAMP_BYTES if stamped and rows and isinstance(wire, CodecConfig) else 0


def _pack(x: torch.Tensor, segs: list[_Seg]) -> torch.Tensor:
    """The send buffer (flat uint8) of ``segs`` of ``x`` [T, H]: records encoded in place."""
    if len(segs) == 1 and segs[0].byte == 0:  # the buffer is the one segment's bytes
        s = segs[0]
        rows = x[s.row:s.row + s.rows]
        return (rows.view(torch.uint8) if s.wire == RAW else encode(rows, s.wire)).reshape(-1)
    total = segs[-1].byte + segs[-1].nbytes if segs else 0
    return _pack_into(torch.empty(total, dtype=torch.uint8, device=x.device), x, segs)


def _pack_into(send: torch.Tensor, x: torch.Tensor, segs: list[_Seg]) -> torch.Tensor:
    """Write ``segs`` of ``x`` into ``send`` (flat uint8): rows copied, records encoded."""
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


class SideStreams:
    """A communicator's extra CUDA streams, one per (device, role): decode of pipelined
    chunks, the copy engine of the peer-to-peer transport."""

    def __init__(self) -> None:
        self._streams: dict = {}

    def get(self, device: torch.device, role: str) -> "torch.cuda.Stream":
        key = (kernels.index_of(device), role)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.Stream(device=key[0])
        return stream


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
    p2p_call: Optional["P2PCall"] = None  # its launches, made at the first call
    framed: Optional[tuple] = None  # gloo: (sends, receives) per group rank, each entry
                          # (row, rows, wire, bytes), None at this rank, then their
                          # frame.Legs (comm/frame.py)
    stamped: bool = False  # CUDA: the chunks' pairs of records carry stamps (StampedCall)
    stamped_calls: dict = field(default_factory=dict)  # device index -> StampedCall

    def sides(self) -> list:
        """(send segments, receive segments) per chunk: what a StampedCall launches."""
        return [(send_segs, recv_segs) for send_segs, _, recv_segs, _ in self.chunks]


def make_plan(route: Route, in_rows: tuple, out_rows: tuple, hidden: int,
              dtype: torch.dtype, chunks: int, uniform: bool = False) -> Plan:
    """``uniform``: no rank of the call passed split sizes (every pair has in_rows[0] rows)."""
    r = route.rank
    own = (sum(in_rows[:r]), sum(out_rows[:r]), in_rows[r])
    send_w = [route.wire(p, n, hidden, dtype) for p, n in enumerate(in_rows)]
    recv_w = [route.wire(p, n, hidden, dtype) for p, n in enumerate(out_rows)]
    in_off, out_off = offsets(in_rows), offsets(out_rows)
    if route.framing is not None:  # every pair travels with its header, even empty ones
        def entries(off, rows, wires):
            return tuple(None if p == r else (off[p], n, w, n * row_bytes(w, hidden, dtype))
                         for p, (n, w) in enumerate(zip(rows, wires)))

        def legs(es):
            return tuple(None if e is None else framing.Leg(e[1], e[3], framing.wire_code(e[2]))
                         for e in es)
        sends, recvs = entries(in_off, in_rows, send_w), entries(out_off, out_rows, recv_w)
        return Plan(False, False, sum(out_rows), own, [], False,
                    framed=(sends, recvs, legs(sends), legs(recvs)))
    if all(w == RAW for p, w in enumerate(send_w + recv_w) if p % route.world != r):
        # every pair as the rows themselves (own rows included): the tensor as it is
        return Plan(True, uniform, sum(out_rows), own, [], False)
    send_w[r] = recv_w[r] = None  # own rows: copied aside, exactly
    chunks = max(1, chunks)
    if route.p2p is not None and (uniform or route.world == 2):
        # every rank knows every pair's size (no split sizes anywhere) or there is one pair:
        # every rank takes the same decision and reserves the same room
        sends = tuple((p, in_off[p], n, send_w[p], n * row_bytes(send_w[p], hidden, dtype))
                      for p, n in enumerate(in_rows) if p != r and n)
        recvs = tuple((p, out_off[p], n, recv_w[p], n * row_bytes(recv_w[p], hidden, dtype))
                      for p, n in enumerate(out_rows) if p != r and n)
        need = max([e[-1] for e in sends + recvs], default=0)
        if -(-need // 16) * 16 * route.world <= route.p2p.max_bytes:  # (regions: 16-byte units)
            return Plan(False, False, sum(out_rows), own, [], False, (need, sends, recvs))
    parts = []
    unit, stamped = dtype.itemsize, route.pages is not None
    for k in range(chunks):
        send_segs, send_bytes = _segments(in_off, in_rows, send_w, k, chunks, hidden, dtype,
                                          stamped)
        recv_segs, recv_bytes = _segments(out_off, out_rows, recv_w, k, chunks, hidden, dtype,
                                          stamped)
        parts.append((send_segs, _items(send_bytes, unit), recv_segs, _items(recv_bytes, unit)))
    first = parts[0][2]
    direct = (not stamped and chunks == 1 and len(first) == 1 and first[0].wire != RAW
              and first[0].rows == sum(out_rows))
    return Plan(False, False, sum(out_rows), own, parts, direct, stamped=stamped)


def _items(nbytes: list, unit: int) -> list:
    """Byte splits as items of ``unit`` bytes (every segment is a whole number of them)."""
    assert all(n % unit == 0 for n in nbytes), (nbytes, unit)
    return [n // unit for n in nbytes]


def cached_plan(route: Route, in_rows: tuple, out_rows: tuple, hidden: int, dtype: torch.dtype,
                chunks: int, uniform: bool = False) -> Plan:
    """``make_plan``'s result, cached in ``route.plans``."""
    return remember(route.plans, (in_rows, out_rows, hidden, dtype, chunks, uniform),
                    lambda: make_plan(route, in_rows, out_rows, hidden, dtype, chunks, uniform),
                    256)


def exchange(x: torch.Tensor, in_rows: tuple, out_rows: tuple, route: Route,
             chunks: int = 1, uniform: bool = False, operation: str = "all_to_all",
             detail: int = 0) -> Pending:
    """Start the all-to-all of ``x`` [T, H]: ``in_rows[p]`` rows go to group rank p and
    ``out_rows[p]`` rows come from it. ``uniform``: no rank of the call passed split sizes.
    ``operation``, ``detail``: its name and a word more in the headers of a framed exchange
    (frame.OPERATIONS; the caller's row shape). Returns a Pending whose ``wait()`` gives the
    output [sum(out_rows), H] of ``x.dtype``."""
    x = x.contiguous()
    H, dtype, group = x.shape[1], x.dtype, route.group
    plan = cached_plan(route, in_rows, out_rows, H, dtype, chunks, uniform)

    if plan.framed is not None:
        return _framed_exchange(x, plan, route, operation, detail)

    if plan.p2p is not None:
        out = p2p_call(route, plan, H, dtype, x.device).run(x, (plan.out_total, H))
        return Pending([], lambda: out)
    if plan.fast:  # bit-identical to all_to_all_single
        out = x.new_empty((plan.out_total, H))
        splits = ([], []) if plan.uniform else (list(out_rows), list(in_rows))
        work = direct.all_to_all_single(group, out, x, *splits, async_op=True)
        return Pending([work], lambda: (work.wait(), out)[1])
    return _coded_exchange(x, plan, route)


def _coded_exchange(x: torch.Tensor, plan: Plan, route: Route) -> Pending:
    """``exchange`` of a plan that codes its records (CUDA, NCCL or gloo): per chunk, the
    records packed (behind stamps where ``plan.stamped``), one ``all_to_all_single``, and
    the decodes in ``finish`` (on a side stream where chunks overlap)."""
    H, dtype, group = x.shape[1], x.dtype, route.group
    stamped = stamped_call(route, plan, H, dtype, x.device) if plan.stamped else None
    if stamped is not None:
        x = stamped.prepare(x)
    out = None if plan.direct else x.new_empty((plan.out_total, H))
    side = route.streams.get(x.device, "decode") if x.is_cuda and len(plan.chunks) > 1 else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))  # `out` is allocated
    works, buffers = [], []
    for k, (send_segs, send_splits, recv_segs, recv_splits) in enumerate(plan.chunks):
        send = (_pack(x, send_segs) if stamped is None
                else stamped.pack(k, x, sum(send_splits) * dtype.itemsize))
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
            for k, (work, (send, recv, recv_segs)) in enumerate(zip(works, buffers)):
                work.wait()
                if plan.direct:
                    seg = recv_segs[0]
                    out = decode(recv.view(seg.rows, -1), seg.wire, H, dtype)
                elif stamped is not None:
                    stamped.unpack(k, recv, out)
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


def stamped_call(route: Route, plan, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> "StampedCall":
    """The kernels of ``plan`` on ``device``, made at its first call there. ``plan``: a
    stamped Plan, or any plan with its ``stamped_calls`` dict and ``sides()``
    (hierarchical.py's source plans)."""
    index = kernels.index_of(device)
    return remember(plan.stamped_calls, index, lambda: StampedCall(
        route, plan.sides(), hidden, dtype, index, error_page(route.pages, index)),
        STAMPED_CALLS_KEPT)


def error_page(pages: dict, index: int) -> "p2p.ErrorPage":
    """The error page of device ``index`` in ``pages`` (a communicator's), made at first use."""
    page = pages.get(index)
    if page is None:
        page = pages[index] = p2p.ErrorPage(torch.device("cuda", index))
    return page


def raise_stamp_report(page: "p2p.ErrorPage", route_or_comm) -> None:
    """Raise ConfigMismatchError for what the decodes reported on ``page`` (then cleared);
    ``route_or_comm``: anything with the group's ``group``, ``rank`` and ``world``."""
    words = page.report()
    if words is not None:
        page.clear()
        g = route_or_comm
        raise ConfigMismatchError(p2p.stamp_mismatch(words, g.group, g.rank, g.world,
                                                     "exchanges of records before this check"))


class StampedCall:
    """The kernels of an exchange whose records NCCL (or gloo) carries, on one device: the
    flat all-to-all's chunks, the hierarchical algorithm's source and destination, or the
    flat all-reduce's reduce-scatter (encodes only: its fused reduction checks). Every
    pair's records travel behind a stamp (``p2p.stamp``: codec, rows, dtype, hidden); the
    receiver's decode compares it with the stamp it expects and writes a difference to the
    communicator's error page, which the next call (or ``Communicator.check``) raises on
    both ranks of the pair. Per chunk one launch of p2p_exchange's LOCAL variant
    (csrc/p2p.cu) encodes the pairs of one codec (up to MAX_PEERS) behind their stamps, and
    one decodes them: as many launches as the plain layout's merged codec calls.
    Stochastic encodes take the codec's own kernels with the stamp copied in. Records a
    launch cannot take (past 2^31 items, or not 16-byte aligned behind raw rows of odd size)
    are encoded with their stamp copied in and decoded by the codec's own kernels, one
    check_stamp_table launch per chunk comparing their stamps. Raw
    pairs (their own bytes) carry no stamp: a rank whose pairs are all raw sends its tensor
    as it is, and its peers must expect the same bytes."""

    def __init__(self, route: Route, sides: list, hidden: int, dtype: torch.dtype, dev: int,
                 page: "p2p.ErrorPage", kind: int = kernels.P2P_ERROR_STAMP,
                 numel: Optional[int] = None) -> None:
        """``sides``: (send segments, receive segments) per chunk, made with stamps.
        ``kind``: what the decodes report a differing stamp as (the error page's kinds).
        ``numel``: the all-reduce's, which its stamps carry in place of the hidden size (mod
        p2p.HIDDEN_MOD) and whole in the slot's second word (the fused reduction checks it);
        None: an all-to-all's (the hidden size; the second word 0)."""
        self.group, self.rank, self.world, self.page = route.group, route.rank, route.world, page
        self.kind = kind
        self.stamp_hidden = hidden if numel is None else numel
        self.detail = 0 if numel is None else numel
        self.hidden, self.dtype, self.dev = hidden, dtype, dev
        self.device = torch.device("cuda", dev)
        self.chunks = [(self._launches(send_segs, True), self._launches(recv_segs, False))
                       for send_segs, recv_segs in sides]

    def _launches(self, segs: list, send: bool) -> tuple[list, list, Sequence]:
        """(p2p_exchange launches, the segments left to the codec's own path or copies, and
        for those left that carry records: sending, the byte positions of their stamps and
        the stamps' bytes on the device; receiving, the launches that check their stamps) of
        one side of a chunk."""
        by_codec: dict = {}
        left = []
        for s in segs:
            if s.wire == RAW or s.byte % 16 or (send and s.wire.is_stochastic):
                left.append(s)
            else:  # (a decode does not depend on the rounding)
                by_codec.setdefault(dataclasses.replace(s.wire, rounding="nearest"), []).append(s)
        launches = []
        for cfg, group in by_codec.items():
            for i in range(0, len(group), p2p.MAX_PEERS):
                batch = group[i:i + p2p.MAX_PEERS]
                tasks = [(s.peer, s.row, s.rows, s.byte) for s in batch]
                stamps = p2p.padded([p2p.stamp(s.wire, s.rows, self.stamp_hidden, self.dtype)
                                     for s in batch])
                args = kernels.p2p_args((), self.rank, self.world, 0,
                                        error_page=self.page.address, mode=self.kind,
                                        stamp_detail=self.detail,
                                        **{"send_stamp" if send else "recv_stamp": stamps})
                launch = p2p.exchange_kernel(self.dev, tasks if send else [],
                                             [] if send else tasks, self.hidden, cfg, self.dtype,
                                             (0, 0, 0), args, local=True)
                if launch is None:
                    left += batch
                else:
                    launches.append(launch)
        coded = [s for s in left if s.wire != RAW]
        if not coded:
            return launches, left, ()
        want = [p2p.stamp(s.wire, s.rows, self.stamp_hidden, self.dtype) for s in coded]
        if not send:
            return launches, left, kernels.stamp_check_launches(
                self.dev, [(s.byte - kernels.STAMP_BYTES, w, s.peer) for s, w in zip(coded, want)],
                self.kind, self.page.address)
        # every stamp's bytes and where they go, for one index_copy_ (one launch, any alignment)
        words = np.array([[w, self.detail] for w in want],
                         dtype=np.uint64).view(np.uint8).reshape(-1)
        at = np.array([s.byte - kernels.STAMP_BYTES + i for s in coded
                       for i in range(kernels.STAMP_BYTES)], dtype=np.int64)
        return launches, left, (torch.from_numpy(at).to(self.device),
                                torch.from_numpy(words).to(self.device))

    def check(self) -> None:
        raise_stamp_report(self.page, self)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Before a call: raise what the kernels of earlier calls found (a host memory read);
        ``x`` itself, or a 16-byte aligned copy (the encodes were planned for aligned rows)."""
        self.check()
        return x.clone() if x.data_ptr() % 16 else x

    def pack(self, k: int, x: torch.Tensor, nbytes: int) -> torch.Tensor:
        """Chunk ``k``'s send buffer (flat uint8, ``nbytes``) of ``x`` (16-byte aligned)."""
        launches, left, stamps = self.chunks[k][0]
        send = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        stream, xp, sp = kernels.raw_stream(self.dev), x.data_ptr(), send.data_ptr()
        for launch in launches:
            launch(stream, xp, sp)
        _pack_into(send, x, left)
        if stamps:
            send.index_copy_(0, *stamps)
        return send

    def unpack(self, k: int, recv: torch.Tensor, out: torch.Tensor) -> None:
        """Decode chunk ``k``'s receive buffer into ``out``, checking the stamps."""
        launches, left, checks = self.chunks[k][1]
        stream, rp, op = kernels.raw_stream(self.dev), recv.data_ptr(), out.data_ptr()
        for launch in launches:
            launch(stream, rp, op)
        _unpack(recv, left, out)
        for check in checks:
            check(stream, rp)


def _framed_exchange(x: torch.Tensor, plan: Plan, route: Route, operation: str,
                     detail: int) -> Pending:
    """The exchange over gloo: each pair's rows behind a header the receiver checks."""
    H, dtype = x.shape[1], x.dtype
    sends, recvs, send_legs, recv_legs = plan.framed
    try:  # (the output first: nothing is sent before both are allocated)
        out = x.new_empty((plan.out_total, H))
        frame = framing.Frame(route.framing, route.group, route.rank, route.world, operation,
                              dtype, H, send_legs, recv_legs, detail)
    except (RuntimeError, OverflowError, MemoryError) as e:
        # sizes no memory (or no int64) holds, in practice garbage split sizes: the peers
        # are in this exchange already; take part as rejected so that they raise now
        # instead of waiting for the timeout (or pairing with this rank's next call)
        framing.reject(route.framing, route.group, route.rank, route.world, operation)
        hint = " (output_split_sizes)" if operation == "all_to_all" else ""
        raise RuntimeError(
            f"moe_flashcomm.{operation}: group rank {route.rank} of {route.world} cannot "
            f"allocate the buffers to receive {plan.out_total} rows of hidden size {H}{hint}: "
            f"{type(e).__name__}: {e}") from e
    try:
        for p in frame.peers:
            row, rows, wire, nbytes = sends[p]
            if rows:
                src = x[row:row + rows]
                frame.payload(p).copy_((src.view(torch.uint8) if wire == RAW
                                        else encode(src, wire)).reshape(-1))
    except Exception:  # (out of memory encoding): the peers wait in this numbered exchange
        framing.reject(route.framing, route.group, route.rank, route.world, operation,
                       number=frame.number, counter=frame.counter)
        raise
    frame.start()
    src, dst, n = plan.own
    if n:
        out[dst:dst + n].copy_(x[src:src + n])

    def finish() -> torch.Tensor:
        got = frame.wait()
        for p in frame.peers:
            row, rows, wire, nbytes = recvs[p]
            if rows:
                if wire == RAW:
                    out[row:row + rows].view(torch.uint8).view(-1).copy_(got[p])
                else:
                    decode(got[p].view(rows, -1), wire, H, dtype, out=out[row:row + rows])
        frame.release()
        return out

    return Pending([frame], finish)


def p2p_call(route: Route, plan: Plan, hidden: int, dtype: torch.dtype,
             device: torch.device) -> "P2PCall":
    """The launches of ``plan`` (a peer-to-peer plan), made at its first call and again when
    the peer buffers have moved. Growing the buffers is collective: every rank of the group
    makes the same call (the plan's sizes are known to all)."""
    call = plan.p2p_call
    if call is None or call.generation != route.p2p.generation:
        call = plan.p2p_call = P2PCall(route, plan, hidden, dtype, device)
    return call


class P2PCall:
    """One peer-to-peer exchange of fixed sizes with every launch prepared: a call costs the
    host an output allocation and one driver call per kernel or copy (comm/p2p.py).

    Where every pair of the call moves records of one wire (or nothing), the common case, a
    call is one launch: per peer, encode blocks that wait until the peer is done with its
    buffer and publish "landed" when its records are there, and decode blocks that wait for
    "landed" and publish "freed"; other blocks copy the rows this rank keeps. Records large
    enough for the copy engine add, per pipelined part, a launch that encodes them into a
    staging buffer and the copies. Otherwise (raw pairs, stochastic rounding, pairs of
    different codecs) three sync launches frame plain copies, encodes and decodes. ``steps``
    holds the call as ``kernels.Step`` data (bases: tokens, output), run in one C++ call by
    the compiled launcher (``native``) or step by step from Python."""

    def __init__(self, route: Route, plan: Plan, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        bufs = route.p2p
        bufs.reserve(plan.p2p[0])
        self.bufs, self.generation = bufs, bufs.generation
        self.stamps = self._stamps(route, plan, hidden, dtype)
        self.device, self.dev, self.dtype = device, device.index, dtype
        self.side = 0  # the copy engine's stream, where the call has staged copies
        row = hidden * dtype.itemsize
        src, dst, n = plan.own
        o_off, x_off, own = dst * row, src * row, n * row
        steps = []
        if own and row % 16:  # not whole 16-byte words: the copy engine, first
            steps.append(kernels.Step(kernels.COPY, refs=((kernels.OUTPUT, o_off),
                                                          (kernels.TOKENS, x_off)), nbytes=own))
            own = 0
        launches = self._one_launch(route, plan, hidden, dtype, o_off, x_off, own)
        if launches is None:
            launches = self._framed(route, plan, hidden, dtype, o_off, x_off, own)
        self.steps = tuple(steps + launches)
        self.native = self._compiled()

    def _compiled(self):
        """The call as one object of the compiled launcher (csrc/launcher.cpp ``Exchange``:
        the check, the allocation, the stream and every step in C++), or None where the
        launcher is off or the steps were prepared without it (``run`` takes them)."""
        native = kernels.KERNELS.native
        program = None if native is None else kernels.compiled_program(native, self.dev,
                                                                        self.steps)
        if program is None:
            return None
        bufs = self.bufs
        return native.Exchange(program, self.side, self.dtype, *bufs.cells, bufs.check,
                               bufs.begin)

    @staticmethod
    def _stamps(route: Route, plan: Plan, hidden: int, dtype: torch.dtype) -> tuple:
        """(send, receive) stamps per group rank (p2p.stamp): what each pair's receiver
        checks on the device."""
        _, sends, recvs = plan.p2p

        def per_rank(entries):
            stamps = [p2p.stamp(None, 0, hidden, dtype)] * route.world
            for p, first, rows, wire, nbytes in entries:
                stamps[p] = p2p.stamp(wire, rows, hidden, dtype)
            return tuple(stamps)
        return per_rank(sends), per_rank(recvs)

    def _one_launch(self, route: Route, plan: Plan, hidden: int, dtype: torch.dtype,
                    o_off: int, x_off: int, own: int) -> Optional[list]:
        """The steps of a call whose pairs all move records of one wire (or nothing), None
        otherwise: one p2p_exchange launch, its encodes storing straight into the peers.
        Records of ``copy_bytes`` or more per peer go by the copy engine instead: launches of
        their own encode them into a staging buffer (``_staged``), and the call's launch
        publishes their "landed" from tasks without rows. The ranks of a call may decide
        differently: the flags are per pair, and every kind of call moves them alike."""
        K = kernels
        bufs, r, w = route.p2p, route.rank, route.world
        _, sends, recvs = plan.p2p
        wires = {e[3] for e in sends + recvs}
        if len(wires) != 1:
            return None
        wire = wires.pop()
        if wire == RAW or wire.is_stochastic:
            return None
        direct = [e for e in sends if e[4] < bufs.copy_bytes]
        staged = [e for e in sends if e[4] >= bufs.copy_bytes]

        def tasks(entries, order, remote):  # every peer, empty pairs included (their flags move)
            given = {e[0]: e[1:3] for e in entries}
            return [(p, *given.get(p, (0, 0)), remote(p))
                    for p in sorted(set(range(w)) - {r}, key=order)]
        # each rank first encodes for the next ranks and decodes from the previous ones
        launch = bufs.exchange_launch(
            tasks(direct, lambda p: (p - r) % w, lambda p: bufs.region(p, r)),
            tasks(recvs, lambda p: (r - p) % w, lambda p: bufs.region(r, p)),
            hidden, wire, dtype, (x_off, o_off, own), self.stamps)
        if launch is None:
            return None
        steps = []
        if staged:
            def encode_part(pieces):
                stage = bufs.exchange_launch(
                    [(p, first, rows, at) for p, first, rows, _, at in pieces], [], hidden, wire,
                    dtype, (0, 0, 0), self.stamps, stage=True)
                return None if stage is None else [
                    K.Step(K.LAUNCH, stage, ((K.TOKENS, 0), (K.STAGING, 0)))]
            steps = self._staged(route, staged, encode_part)
            if steps is None:
                return None
        return steps + [K.Step(K.LAUNCH, launch, ((K.TOKENS, 0), (K.OUTPUT, 0)))]

    def _staged(self, route: Route, staged: list, encode_part) -> Optional[list]:
        """The steps that move the records of ``staged`` (send entries) by the copy engine,
        which moves bytes over NVLink faster than an encode kernel's remote stores: one
        staging buffer for them all, and per part (COPY_CHUNKS, by rows) the steps of
        ``encode_part(pieces)`` (pieces: peer, first row, rows, wire, staging offset; None:
        not possible) encode part k of every pair into it, then the copy engine moves that
        part into the peers' buffers: on the copy stream while the next part is encoded, the
        last part on the call's own stream, after its encode. Then the call's stream waits
        for the copy stream: the records are in place and the staging buffer is free."""
        K = kernels
        bufs, r, n = route.p2p, route.rank, p2p.COPY_CHUNKS
        self.side = route.streams.get(self.device, "copy").cuda_stream
        fork, join = K.Order(self.dev), K.Order(self.dev)
        places, total = [], 0  # (peer, first row, rows, wire, record bytes, staging offset)
        for p, first, rows, wire, nbytes in staged:
            places.append((p, first, rows, wire, nbytes // rows, total))
            total += nbytes
        steps, forked = [K.Step(K.STAGE, nbytes=total)], False
        for k in range(n):
            parts = [(p, first, wire, rb, at, *chunk_range(rows, k, n))
                     for p, first, rows, wire, rb, at in places]
            parts = [part for part in parts if part[-1] > part[-2]]
            if not parts:
                continue
            encoded = encode_part([(p, first + a, b - a, wire, at + a * rb)
                                   for p, first, wire, rb, at, a, b in parts])
            if encoded is None:
                return None
            steps += encoded
            stream = K.MAIN if k == n - 1 else K.SIDE
            if stream == K.SIDE:
                steps.append(K.Step(K.ORDER, fork, stream=K.SIDE))
                forked = True
            steps += [K.Step(K.COPY, refs=((K.FIXED, bufs.region(p, r) + a * rb),
                                           (K.STAGING, at + a * rb)),
                             nbytes=(b - a) * rb, stream=stream)
                      for p, first, wire, rb, at, a, b in parts]
        if forked:
            steps.append(K.Step(K.ORDER, join, stream=K.MAIN))
        return steps

    def _framed(self, route: Route, plan: Plan, hidden: int, dtype: torch.dtype, o_off: int,
                x_off: int, own: int) -> list:
        """The steps of any call: sync (the peers are done with their buffers; its other
        blocks copy the rows this rank keeps), copies and encodes into the peers' buffers
        (records of ``copy_bytes`` or more per peer by the copy engine: ``_staged``), sync
        (ours have landed there, theirs here), decodes and copies, sync (we are done)."""
        K = kernels
        bufs, r, dev = route.p2p, route.rank, self.dev
        _, sends, recvs = plan.p2p
        row, vec = hidden * dtype.itemsize, hidden % 8 == 0
        ready = bufs.sync(K.WAIT_FREED, self.stamps, copy_bytes=own)
        landed = bufs.sync(K.PUBLISH_LANDED | K.WAIT_LANDED, self.stamps)
        done = bufs.sync(K.PUBLISH_FREED, self.stamps, advance=True)
        steps = [K.Step(K.LAUNCH, ready, ((K.TOKENS, x_off), (K.OUTPUT, o_off)))]
        staged = []
        for p, first, rows, wire, nbytes in sends:
            to, off = bufs.region(p, r), first * row
            if wire == RAW:
                steps.append(K.Step(K.COPY, refs=((K.FIXED, to), (K.TOKENS, off)), nbytes=nbytes))
            elif nbytes < bufs.copy_bytes:
                steps += _encode_steps(_cuda.encode_launches(dev, rows, hidden, wire, dtype, vec),
                                       wire, (K.TOKENS, off), (K.FIXED, to))
            else:
                staged.append((p, first, rows, wire, nbytes))
        if staged:
            steps += self._staged(route, staged, lambda pieces: [
                step for p, first, rows, wire, at in pieces
                for step in _encode_steps(_cuda.encode_launches(dev, rows, hidden, wire, dtype, vec),
                                          wire, (K.TOKENS, first * row), (K.STAGING, at))])
        steps.append(K.Step(K.LAUNCH, landed))
        for p, first, rows, wire, nbytes in recvs:
            frm, off = bufs.region(r, p), first * row
            if wire == RAW:
                steps.append(K.Step(K.COPY, refs=((K.OUTPUT, off), (K.FIXED, frm)), nbytes=nbytes))
            else:
                steps += [K.Step(K.LAUNCH, launch, ((K.FIXED, frm), (K.OUTPUT, off)))
                          for launch in _cuda.decode_launches(dev, rows, hidden, wire, dtype)]
        steps.append(K.Step(K.LAUNCH, done))
        return steps

    def run(self, x: torch.Tensor, out_shape: tuple) -> torch.Tensor:
        """The exchange of ``x`` (contiguous, rows of ``hidden``): the output ``out_shape``."""
        if self.native is not None and self.bufs.failed is None:
            return self.native(x, out_shape)
        self.bufs.check()  # what the kernels of earlier calls found (a host memory read)
        if x.data_ptr() % 16:
            x = x.clone()  # the encodes were planned for 16-byte aligned rows
        out = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        stream = kernels.raw_stream(self.dev)
        if stream != self.bufs.stream:
            self.bufs.begin(stream)
        kernels.run_steps(self.steps, self.device, stream, self.side, x.data_ptr(),
                          out.data_ptr())
        return out


def _encode_steps(launches: tuple, wire: CodecConfig, src: tuple, dst: tuple) -> list:
    """The steps of an encode plan's ``launches`` from address ``src`` into ``dst`` (refs);
    a stochastic one first draws this call's seed from torch's generator, as the codec does."""
    steps = [kernels.Step(kernels.LAUNCH, launch, (src, dst)) for launch in launches]
    if wire.is_stochastic:
        def draw_seed() -> None:
            _cuda.set_seed(launches, _cuda.seed_key(wire, _reference.resolve_seed(None)))
        steps.insert(0, kernels.Step(kernels.CALL, draw_seed))
    return steps
