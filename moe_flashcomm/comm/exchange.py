"""Flat quantized all-to-all: rows are encoded per destination link, exchanged as one flat
uint8 ``all_to_all_single`` (per chunk) with byte split sizes, and decoded on arrival.

Wire per (rank, peer) pair, decided on both sides from the pair's row count alone:
  * ``RAW``: the rows' own bytes. Rows a rank keeps (never leave it), and bf16 passthrough
    of 16-bit input (exact).
  * a CodecConfig: ``record_bytes(H, codec)`` per row (moe_flashcomm.codec records). The
    size gate turns a pair's codec into the bf16 passthrough below its threshold.
So every rank computes its byte splits from row splits, and metadata travels inside the
records: no second collective.

On CUDA with ``chunks`` > 1 each peer's rows are cut into ``chunks`` parts; chunk k's
encode runs on the current stream, its transfer on NCCL's stream, its decode on a side
stream, so encode(k+1), transfer(k) and decode(k-1) overlap.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..codec import CodecConfig, record_bytes
from ..codec import decode as _codec_decode
from ..codec import encode as _codec_encode
from ..codec import reference as _reference
from .gate import PASSTHROUGH, wire_gate
from .plan import chunk_range, offsets
from .topology import _warn_once

RAW = "raw"
Wire = Union[CodecConfig, str, None]  # None: not in the exchange (a rank's own rows)
RAW_DTYPES = (torch.bfloat16, torch.float16)  # passthrough is exact for these
ALGORITHMS = ("flat",)


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

    @property
    def passthrough(self) -> bool:
        """Every link sends bf16 passthrough (for 16-bit input: a plain all_to_all_single)."""
        return all(c.is_passthrough for p, c in enumerate(self.codecs) if p != self.rank)

    def wire(self, peer: int, rows: int, hidden: int, dtype: torch.dtype) -> Wire:
        cfg = wire_gate(self.codecs[peer], rows * hidden * 2, self.thresholds[peer])
        return RAW if cfg.is_passthrough and dtype in RAW_DTYPES else cfg


def row_bytes(wire: Wire, hidden: int, dtype: torch.dtype) -> int:
    """Bytes one row takes on the wire."""
    if wire is None:
        return 0
    if wire == RAW:
        return hidden * torch.empty((), dtype=dtype).element_size()
    return record_bytes(hidden, wire)


# ---- codec calls (CUDA kernels; the CPU reference where the kernels are missing) ----------
def _cuda_codec_available() -> bool:
    try:
        from ..codec import cuda  # noqa: F401
        return True
    except ImportError as e:
        _warn_once(f"moe_flashcomm: CUDA codec kernels unavailable ({e}); CUDA tensors are "
                   "encoded/decoded by the CPU reference (slow)")
        return False


def encode(x: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    """Tokens [n, H] -> records uint8 [n, record_bytes]."""
    if x.is_cuda and not _cuda_codec_available():
        return _reference.encode(x.cpu(), cfg).to(x.device)
    return _codec_encode(x, cfg)


def decode(rec: torch.Tensor, cfg: CodecConfig, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Records uint8 [n, record_bytes] -> tokens [n, hidden] of ``dtype``."""
    if rec.is_cuda and not _cuda_codec_available():
        return _reference.decode(rec.cpu(), cfg, hidden, dtype).to(rec.device)
    return _codec_decode(rec, cfg, hidden, dtype)


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
    """The send buffer (flat uint8) of ``segs`` of ``x`` [T, H]."""
    pieces = []
    for s in segs:
        rows = x[s.row:s.row + s.rows]
        pieces.append(rows.view(torch.uint8).reshape(-1) if s.wire == RAW
                      else encode(rows, s.wire).reshape(-1))
    if not pieces:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _unpack(recv: torch.Tensor, segs: list[_Seg], out: torch.Tensor) -> None:
    """Decode the flat uint8 ``recv`` into the rows of ``out`` [R, H] that ``segs`` name."""
    hidden = out.shape[1]
    for s in segs:
        raw = recv[s.byte:s.byte + s.nbytes]
        dst = out[s.row:s.row + s.rows]
        if s.wire == RAW:
            dst.view(torch.uint8).view(-1).copy_(raw)
        else:
            dst.copy_(decode(raw.view(s.rows, -1), s.wire, hidden, out.dtype))


_side_streams: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The decode stream of a device (one per process and device)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=key)
    return _side_streams[key]


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


def exchange(x: torch.Tensor, in_rows: Sequence[int], out_rows: Sequence[int], route: Route,
             chunks: int = 1) -> Pending:
    """Start the all-to-all of ``x`` [T, H] (contiguous); ``in_rows[p]`` rows go to group
    rank p and ``out_rows[p]`` come from it. Returns a Pending whose ``wait()`` gives the
    output [sum(out_rows), H] of ``x.dtype``."""
    x = x.contiguous()
    T, H = x.shape
    dtype, r, group = x.dtype, route.rank, route.group
    if route.passthrough and dtype in RAW_DTYPES:  # bit-identical to all_to_all_single
        out = x.new_empty((sum(out_rows), H))
        work = dist.all_to_all_single(out, x, list(out_rows), list(in_rows), group=group,
                                      async_op=True)
        return Pending([work], lambda: (work.wait(), out)[1])

    send_w = [route.wire(p, n, H, dtype) for p, n in enumerate(in_rows)]
    recv_w = [route.wire(p, n, H, dtype) for p, n in enumerate(out_rows)]
    # own rows travel inside the exchange only when everything is raw bytes (then the
    # buffers are the tensors themselves); otherwise they are copied aside
    all_raw = all(w == RAW for p, w in enumerate(send_w + recv_w) if p % route.world != r)
    send_w[r] = recv_w[r] = RAW if all_raw else None
    chunks = 1 if all_raw else max(1, chunks)
    in_off, out_off = offsets(in_rows), offsets(out_rows)

    plans = []
    for k in range(chunks):
        send_segs, send_splits = _segments(in_off, in_rows, send_w, k, chunks, H, dtype)
        recv_segs, recv_splits = _segments(out_off, out_rows, recv_w, k, chunks, H, dtype)
        plans.append((send_segs, send_splits, recv_segs, recv_splits))

    # the output: a single decoded segment covering it is the output itself
    recv_segs0 = plans[0][2]
    direct = (chunks == 1 and len(recv_segs0) == 1 and recv_segs0[0].wire != RAW
              and recv_segs0[0].rows == sum(out_rows))
    out = None if direct else x.new_empty((sum(out_rows), H))
    side = _side_stream(x.device) if x.is_cuda and chunks > 1 else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))  # `out` is allocated

    works, buffers = [], []
    for send_segs, send_splits, recv_segs, recv_splits in plans:
        send = _pack(x, send_segs)
        if all_raw:
            recv = out.view(torch.uint8).view(-1)
        else:
            recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=x.device)
        works.append(dist.all_to_all_single(recv, send, recv_splits, send_splits,
                                            group=group, async_op=True))
        buffers.append((send, recv, recv_segs))
    if not all_raw and in_rows[r]:  # own rows: exact copy, overlapping the transfers
        out[out_off[r]:out_off[r] + out_rows[r]].copy_(x[in_off[r]:in_off[r] + in_rows[r]])

    def finish() -> torch.Tensor:
        nonlocal out
        stream = side if side is not None else (
            torch.cuda.current_stream(x.device) if x.is_cuda else None)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for work, (send, recv, recv_segs) in zip(works, buffers):
                work.wait()
                if all_raw:
                    pass
                elif direct:
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
