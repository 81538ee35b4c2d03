"""Counters of the all-to-alls a patched MoE layer sends through moe_flashcomm.

Bytes are what this rank puts on the wire towards *other* ranks (rows it keeps are never
sent), per link class: ``intra_node`` (a peer on this rank's node) and ``inter_node``.
``bf16_bytes`` is what the same rows would take as bf16, for the compression ratio.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from ..comm.autograd import split_key
from ..comm.exchange import RAW, row_bytes
from ..memo import keep, remember

DIRECTIONS = ("dispatch", "combine", "dispatch_grad", "combine_grad")
LINKS = ("intra_node", "inter_node")


def _zeros(keys: Sequence[str]) -> dict:
    return {k: 0 for k in keys}


def _per_link() -> dict:
    return {d: _zeros(LINKS) for d in DIRECTIONS}


def _check(what: str, value: Optional[str], allowed: tuple) -> None:
    """A reader's ``direction`` / ``link``: None or one of ``allowed`` (a misspelt one would
    match nothing and read as 0 or 1.0)."""
    if value is not None and value not in allowed:
        raise ValueError(f"ExchangeStats: {what} must be None or one of {allowed}, got {value!r}")


# ExchangeStats' counters: {direction: n}, and {direction: {link: bytes}}
PER_DIRECTION = ("calls", "quantized", "seconds", "slots_sent", "slots_stock")
PER_DIRECTION_AND_LINK = ("bytes_sent", "bf16_bytes")


@dataclass
class ExchangeStats:
    """Exchanges of one layer (or a sum of layers) since enable or the last ``reset()``.

    calls:      all-to-alls sent through moe_flashcomm, per direction: ``dispatch``,
                ``combine`` and their gradients ``dispatch_grad``, ``combine_grad``.
    quantized:  of those, the ones where at least one link to another rank carried an
                integer or fp8 codec (not bf16 passthrough, not gated to bf16).
    bytes_sent: ``{direction: {link: bytes}}``, wire bytes of this rank's rows sent to other
                ranks, by the link class of their destination (``intra_node``,
                ``inter_node``): what the flat algorithm sends. The hierarchical one also
                relays node-mates' rows (more intra-node bytes), which is not counted here.
    bf16_bytes: the same rows in bf16, same keys.
    slots_sent: capacity slots (token rows of DeepSpeed's [E, C, M] tensor) sent to other
                ranks, per direction; ``slots_stock``: those the stock, padded exchange
                sends. They differ where ``skip_padding`` sends only the filled slots; read
                the share with ``slot_share()``. For AutoEP (no padding) both count tokens.
    seconds:    time inside the exchanges per direction (encode, transfer, decode), read
                with ``elapsed()``: on CUDA it is timed with events, resolved when read.
    """

    calls: dict = field(default_factory=lambda: _zeros(DIRECTIONS))
    quantized: dict = field(default_factory=lambda: _zeros(DIRECTIONS))
    bytes_sent: dict = field(default_factory=_per_link)
    bf16_bytes: dict = field(default_factory=_per_link)
    slots_sent: dict = field(default_factory=lambda: _zeros(DIRECTIONS))
    slots_stock: dict = field(default_factory=lambda: _zeros(DIRECTIONS))
    seconds: dict = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    _pending: list = field(default_factory=list, repr=False)  # (direction, start, end) CUDA events
    # what one call adds, per call arguments: padded MoE exchanges repeat their shapes, and
    # counting a call peer by peer costs the host O(world) route lookups (docs/notes.md)
    _counted: dict = field(default_factory=dict, repr=False, compare=False)
    # what one pair adds, per (call arguments but the rows, link class, rows): skip_padding's
    # row counts change at every call, so the whole-call memo above mostly misses there
    _pairs: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickled and copied with its CUDA timings resolved and without its memos of call
        shapes (whose keys hold communicators)."""
        self._resolve()
        return {**self.__dict__, "_counted": {}, "_pairs": {}}

    def start(self, device: torch.device):
        """A start mark for ``stop``: a host clock on CPU, a recorded event on CUDA."""
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, direction: str, start) -> None:
        """Add the time since ``start`` to ``direction`` (no host synchronisation on CUDA)."""
        if isinstance(start, float):
            self.seconds[direction] += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((direction, start, end))
        if len(self._pending) > 512:  # keep the list short: fold in what has finished
            self._resolve(only_done=True)

    def _resolve(self, only_done: bool = False) -> None:
        keep = []
        for direction, start, end in self._pending:
            if only_done and not end.query():
                keep.append((direction, start, end))
                continue
            end.synchronize()
            self.seconds[direction] += start.elapsed_time(end) / 1e3
        self._pending = keep

    def elapsed(self, direction: Optional[str] = None) -> float:
        """Seconds spent in exchanges of ``direction`` (None: all directions)."""
        _check("direction", direction, DIRECTIONS)
        self._resolve()
        return sum(v for d, v in self.seconds.items() if direction in (None, d))

    @property
    def exchanges(self) -> int:
        """All calls, every direction."""
        return sum(self.calls.values())

    @property
    def quantized_exchanges(self) -> int:
        return sum(self.quantized.values())

    def link_bytes(self, link: Optional[str] = None, bf16: bool = False) -> int:
        """Bytes over every direction, on ``link`` (None: both link classes); ``bf16``: the
        bf16 equivalent instead of what was sent."""
        _check("link", link, LINKS)
        table = self.bf16_bytes if bf16 else self.bytes_sent
        return sum(v for d in table.values() for k, v in d.items() if link in (None, k))

    def slot_share(self, direction: Optional[str] = None) -> float:
        """Slots sent / slots of the stock exchange, in ``direction`` (None: all; 1.0 when
        nothing was sent)."""
        _check("direction", direction, DIRECTIONS)
        stock = sum(v for d, v in self.slots_stock.items() if direction in (None, d))
        sent = sum(v for d, v in self.slots_sent.items() if direction in (None, d))
        return sent / stock if stock else 1.0

    @property
    def compression(self) -> float:
        """bf16 bytes / wire bytes over everything sent (1.0 when nothing was sent)."""
        sent = self.link_bytes()
        return self.link_bytes(bf16=True) / sent if sent else 1.0

    def reset(self) -> None:
        self._resolve()
        for name in PER_DIRECTION:
            d = getattr(self, name)
            for k in d:
                d[k] = 0.0 if name == "seconds" else 0
        for name in PER_DIRECTION_AND_LINK:
            for d in getattr(self, name).values():
                for k in d:
                    d[k] = 0

    def __add__(self, other: "ExchangeStats") -> "ExchangeStats":
        out = ExchangeStats()
        self._resolve()
        other._resolve()
        for name in PER_DIRECTION:
            a, b, c = getattr(self, name), getattr(other, name), getattr(out, name)
            for k in c:
                c[k] = a[k] + b[k]
        for name in PER_DIRECTION_AND_LINK:
            a, b, c = getattr(self, name), getattr(other, name), getattr(out, name)
            for d in c:
                for k in c[d]:
                    c[d][k] = a[d][k] + b[d][k]
        return out

    @classmethod
    def total(cls, stats: Iterable["ExchangeStats"]) -> "ExchangeStats":
        out = cls()
        for s in stats:
            out = out + s
        return out

    def as_dict(self) -> dict:
        self._resolve()
        return {**{name: dict(getattr(self, name)) for name in PER_DIRECTION},
                **{name: {d: dict(v) for d, v in getattr(self, name).items()}
                   for name in PER_DIRECTION_AND_LINK}}

    def record(self, direction: str, x: torch.Tensor, send_rows: Optional[Sequence[int]],
               comm, codecs, stock_slots: Optional[int] = None) -> None:
        """Count one all-to-all of ``x`` (dim 0 routed, ``send_rows[p]`` rows to group rank
        p, None: even split) sent on Communicator ``comm`` with ``codecs`` (LinkCodecs): its
        route decides each pair's wire exactly as the exchange does. ``stock_slots``: slots
        the padded exchange would send to other ranks (None: as many as this one)."""
        rows = None if send_rows is None else split_key(send_rows)
        key = (x.shape, x.dtype, x.device.type, rows, comm, codecs)
        quantized, slots, sent, bf16 = remember(
            self._counted, key, lambda: _count(x, rows, comm, codecs, self._pairs), 256)
        self.calls[direction] += 1
        self.quantized[direction] += quantized
        self.slots_sent[direction] += slots
        self.slots_stock[direction] += slots if stock_slots is None else stock_slots
        for link in LINKS:
            self.bytes_sent[direction][link] += sent[link]
            self.bf16_bytes[direction][link] += bf16[link]


def _count(x: torch.Tensor, rows: Optional[tuple], comm, codecs, pairs: dict) -> tuple:
    """What ExchangeStats.record adds for one call: (quantized 0/1, slots sent to other
    ranks, wire bytes per link, bf16 bytes per link). ``pairs``: what a pair adds (wire
    bytes, quantized) by its link class and rows, kept across calls: a pair's wire depends
    on nothing else (its codec and gate row are its link class's)."""
    route, nodes = comm.route(codecs, x.device.type), comm.nodes
    rank, world = route.rank, route.world
    rows = rows if rows is not None else [x.shape[0] // world] * world
    per_row = math.prod(x.shape[1:-1])
    hidden = x.shape[-1]
    base = (x.shape[1:], x.dtype, x.device.type, comm, codecs)
    quantized, slots = False, 0
    sent, bf16 = _zeros(LINKS), _zeros(LINKS)
    for p, n in enumerate(rows):
        n *= per_row
        if p == rank or n == 0:
            continue
        slots += n
        link = LINKS[0] if nodes[p] == nodes[rank] else LINKS[1]
        key = (base, link, n)
        pair = pairs.get(key)
        if pair is None:
            wire = route.wire(p, n, hidden, x.dtype)
            pair = keep(pairs, key, (n * row_bytes(wire, hidden, x.dtype),
                                     wire != RAW and not wire.is_passthrough), 4096)
        sent[link] += pair[0]
        bf16[link] += n * hidden * 2
        quantized |= pair[1]
    return int(quantized), slots, sent, bf16
