"""The differentiable all-to-all: one call's plan (``_Call``), its autograd Function and the
handle of an asynchronous call. ``Communicator.all_to_all`` makes the calls."""
from __future__ import annotations

import math
import operator
import sys
import warnings
import weakref
from typing import Optional

import torch

from .. import kernels
from ..codec import CodecConfig
from .check import hash63
from .exchange import Pending, Route, cached_plan, exchange, p2p_call
from .plan import NOT_SPLIT_SIZES, integer_dtype
from . import direct

DEFAULT_GRAD_CODEC = CodecConfig(bits=8)
# Automatic chunking (CUDA, even splits, a group with a network link): one chunk per
# CHUNK_BYTES of bf16 payload per rank, at most MAX_CHUNKS. On NVLink and host-memory
# links chunking was measured slower at every size (each chunk adds the host cost of an
# encode, a decode and a collective): one chunk there. docs/notes.md, "NVLink: from NCCL to
# the peer-to-peer transport".
CHUNK_BYTES = 128 << 20
MAX_CHUNKS = 2
CHUNKED_PATHS = ("network",)


def auto_chunks(bf16_bytes: int, route: Route) -> int:
    """Chunks for a per-rank message of ``bf16_bytes`` bytes (as bf16) on ``route``."""
    if not any(p in CHUNKED_PATHS for p in route.paths):
        return 1
    return max(1, min(MAX_CHUNKS, bf16_bytes // CHUNK_BYTES))


class _Fast:
    """One direction of a flat all-to-all whose plan is ``exchange.Plan.fast`` (bf16 on
    every pair: the passthrough codec, or every pair size-gated): exactly the one
    ``all_to_all_single`` that ``exchange.exchange`` issues, with everything precomputed,
    on the caller's tensor [N, ..., H] itself (split sizes in rows of dim 0), issued on the
    process group directly (comm/direct.py), so a repeated call costs the host little
    more than ``torch.distributed.all_to_all_single``."""
    __slots__ = ("group", "out_shape", "dtype", "device", "out_splits", "in_splits")

    def __init__(self, route: Route, plan, in_rows: tuple, out_rows: tuple, out_shape: tuple,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.group, self.out_shape = route.group, out_shape
        self.dtype, self.device = dtype, device
        # uniform: all_to_all_single's own even split (as exchange passes no lists)
        self.out_splits = [] if plan.uniform else list(out_rows)
        self.in_splits = [] if plan.uniform else list(in_rows)

    def start(self, x: torch.Tensor, async_op: bool):
        """(output [out_shape], the collective's work or None): ``x`` contiguous, of
        ``dtype`` on ``device``."""
        out = torch.empty(*self.out_shape, dtype=self.dtype, device=self.device)  # (*: faster)
        work = direct.all_to_all_single(self.group, out, x, self.out_splits, self.in_splits,
                                        async_op)
        return out, work


def _fast(route: Route, in_rows: tuple, out_rows: tuple, hidden: int, per_row: int,
          dtype: torch.dtype, chunks: int, uniform: bool, out_shape: tuple,
          device) -> Optional[_Fast]:
    """The _Fast of a flat exchange of token rows ``in_rows`` -> ``out_rows`` (its plan
    cached in ``route.plans`` under exchange.exchange's key), or None when it is not one
    plain all_to_all_single."""
    plan = cached_plan(route, in_rows, out_rows, hidden, dtype, chunks, uniform)
    if not plan.fast or per_row == 0:  # (x [N, 0, H]: exchange's zero rows)
        return None
    if per_row != 1:  # split sizes in rows of dim 0 of the caller's tensor
        in_rows = tuple(n // per_row for n in in_rows)
        out_rows = tuple(n // per_row for n in out_rows)
    return _Fast(route, plan, in_rows, out_rows, out_shape, dtype, device)


class _Call:
    """Everything one all-to-all and its backward need (rows are token rows [*, H])."""
    __slots__ = ("fwd", "bwd", "in_rows", "out_rows", "chunks", "in_shape", "out_shape", "run",
                 "fast_fwd", "fast_bwd", "p2p_fwd", "p2p_bwd", "dtype", "device", "grad",
                 "uniform", "cacheable", "_owner", "detail")

    def __init__(self, fwd: Route, bwd: Route, in_rows: tuple, out_rows: tuple, chunks: int,
                 in_shape: tuple, out_shape: tuple, run, dtype: torch.dtype,
                 device: torch.device, grad: bool, uniform: bool, cacheable: bool,
                 owner) -> None:
        self.fwd, self.bwd, self.in_rows, self.out_rows = fwd, bwd, in_rows, out_rows
        self.chunks, self.in_shape, self.out_shape = chunks, in_shape, out_shape
        self.run = run  # the algorithm's exchange (flat: exchange.exchange)
        self.dtype, self.device, self.grad = dtype, device, grad
        self.uniform = uniform  # no split sizes given (by any rank: all_to_all's contract)
        self.cacheable = cacheable  # the same arguments always take this call's path
        # the shape of a row of dim 0 (x [N, ..., H]), in the headers of framed exchanges:
        # ranks that group the same tokens into rows differently move the same bytes
        self.detail = 0 if len(in_shape) <= 2 else hash63(tuple(in_shape[1:-1]))
        # the Communicator: no backward after its close(), or its group's end. Weakly: it
        # caches this call, and a cycle would keep it (and its device memory) until the
        # cyclic garbage collector ran; who may still use the call holds it (owner())
        self._owner = weakref.ref(owner)
        self.fast_fwd = self.fast_bwd = self.p2p_fwd = self.p2p_bwd = None
        if run is exchange:  # flat: one all_to_all_single when bf16
            hidden = in_shape[-1]
            per_row = math.prod(in_shape[1:-1])
            self.fast_fwd = _fast(fwd, in_rows, out_rows, hidden, per_row, dtype, chunks,
                                  uniform, tuple(out_shape), device)
            self.p2p_fwd = _p2p(fwd, in_rows, out_rows, hidden, dtype, chunks, uniform)
            if grad:
                self.fast_bwd = _fast(bwd, out_rows, in_rows, hidden, per_row, dtype, chunks,
                                      uniform, tuple(in_shape), device)
                self.p2p_bwd = _p2p(bwd, out_rows, in_rows, hidden, dtype, chunks, uniform)

    def forward(self, x2: torch.Tensor) -> Pending:
        return self.run(x2, self.in_rows, self.out_rows, self.fwd, self.chunks,
                        uniform=self.uniform, detail=self.detail)

    def backward(self, g2: torch.Tensor) -> Pending:
        return self.run(g2, self.out_rows, self.in_rows, self.bwd, self.chunks,
                        uniform=self.uniform, operation="all_to_all backward",
                        detail=self.detail)

    def forward_out(self, x: torch.Tensor) -> torch.Tensor:
        """The output [out_shape] of the all-to-all of ``x`` [in_shape] (synchronous)."""
        fast = self.fast_fwd
        if fast is not None:
            return fast.start(x if x.is_contiguous() else x.contiguous(), False)[0]
        p2p_plan = self.p2p_fwd
        if p2p_plan is not None:
            return p2p_call(self.fwd, p2p_plan, self.in_shape[-1], self.dtype, self.device).run(
                x if x.is_contiguous() else x.contiguous(), self.out_shape)
        out = self.forward(x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).wait()
        return out if len(self.out_shape) == 2 else out.view(self.out_shape)

    def owner(self):
        """The Communicator, alive while the autograd context or handle holding it is."""
        return self._owner()

    def backward_out(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient [in_shape] of x from the gradient ``g`` [out_shape] of the output (an
        error of this rank's own answered to its peers: Communicator.answering)."""
        return self.owner().answering(g, "all_to_all backward", self._backward_out, g)

    def _backward_out(self, g: torch.Tensor) -> torch.Tensor:
        owner = self.owner()
        owner.check_live(" before the backward of its all_to_all ran")
        if owner.closed:  # (its buffers and pages are freed)
            owner._check_open(" before the backward of its all_to_all ran (under "
                              "DeepSpeed: disable_deepspeed closes the layers' "
                              "communicators, and enable_deepspeed a layer's when it "
                              "gives it another gate; call them after the backward)")
        fast = self.fast_bwd
        if fast is not None and g.dtype == fast.dtype and g.device == fast.device:
            return fast.start(g if g.is_contiguous() else g.contiguous(), False)[0]
        p2p_plan = self.p2p_bwd
        if p2p_plan is not None and g.dtype == self.dtype and g.device == self.device:
            return p2p_call(self.bwd, p2p_plan, self.in_shape[-1], self.dtype, self.device).run(
                g if g.is_contiguous() else g.contiguous(), self.in_shape)
        g2 = g.contiguous().view(-1, g.shape[-1])
        return self.backward(g2).wait().view(self.in_shape)

    def start(self, x: torch.Tensor) -> "AllToAllHandle":
        """Start the forward (async_op): its handle."""
        fast = self.fast_fwd
        if fast is not None:
            out, work = fast.start(x if x.is_contiguous() else x.contiguous(), True)
            return AllToAllHandle(None, x, self, self.grad, work, out)
        return AllToAllHandle(self.forward(x if x.dim() == 2 else x.reshape(-1, x.shape[-1])),
                              x, self, self.grad)


def _p2p(route: Route, in_rows: tuple, out_rows: tuple, hidden: int, dtype: torch.dtype,
         chunks: int, uniform: bool):
    """The exchange plan of a flat call that runs on the peer-to-peer transport, or None."""
    if route.p2p is None:
        return None
    plan = cached_plan(route, in_rows, out_rows, hidden, dtype, chunks, uniform)
    return plan if plan.p2p is not None else None


class _Ready:
    """A _Call whose forward already ran (async_op): its output, then the _Call's backward."""
    __slots__ = ("call", "out")

    def __init__(self, call: _Call, out: torch.Tensor) -> None:
        self.call, self.out = call, out

    def forward_out(self, x: torch.Tensor) -> torch.Tensor:
        # handed over, not kept: autograd's context holds this object, and the output would
        # hold the context (its grad_fn), a cycle that kept both until the garbage collector
        out, self.out = self.out, None
        return out

    def backward_out(self, g: torch.Tensor) -> torch.Tensor:
        return self.call.backward_out(g)

    def owner(self):
        return self.call.owner()


class _Reverse:
    """The backward of a _Call (or _Ready) as a call of its own, for a backward that is
    differentiated again (``create_graph``): forward, the reverse exchange; backward, the
    forward exchange again (with the forward codec)."""
    __slots__ = ("call",)

    def __init__(self, call) -> None:
        self.call = call

    def owner(self):
        return self.call.owner()

    def forward_out(self, g: torch.Tensor) -> torch.Tensor:
        return self.call.backward_out(g)

    def backward_out(self, h: torch.Tensor) -> torch.Tensor:
        call = self.call
        return (call.call if isinstance(call, _Ready) else call).forward_out(h)


class _AllToAll(torch.autograd.Function):
    """Forward: the all-to-all with the forward codec (a _Call, or a _Ready's result).
    Backward: the reverse all-to-all of the gradient with the gradient codec (itself
    differentiable, for create_graph: see _Reverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, call) -> torch.Tensor:
        ctx.call, ctx.owner = call, call.owner()  # (the call holds its communicator weakly)
        return call.forward_out(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if direct.compiling():  # (compiled autograd traces backwards: outside the graph)
            return direct.untraced(_AllToAll.backward, ctx, grad)
        if torch.is_grad_enabled() and grad.requires_grad:
            # create_graph: the exchange's own ops would record only the rows a rank keeps
            return _AllToAll.apply(grad, _Reverse(ctx.call)), None
        return ctx.call.backward_out(grad), None


class AllToAllHandle:
    """Returned by ``all_to_all(..., async_op=True)``: ``wait()`` finishes the transfer,
    decodes and returns the output (on CUDA, ordered before later work on the current
    stream)."""
    __slots__ = ("_pending", "_work", "_x", "_call", "_owner", "_grad", "_out", "_stream",
                 "_waited")

    def __init__(self, pending: Optional[Pending], x: torch.Tensor, call: _Call, grad: bool,
                 work=None, out: Optional[torch.Tensor] = None) -> None:
        # pending: the exchange, its wait() gives the output rows [*, H]; or None, and
        # work / out: the plain all_to_all_single (_Fast) and its output [out_shape]
        self._pending, self._work, self._out = pending, work, out
        self._x, self._call, self._grad = x, call, grad
        self._owner = call.owner()  # (the call holds its communicator weakly)
        # CUDA: the stream the call was issued on (its kernels, the copy of the rows a rank
        # keeps), which a wait() on another stream must order before that stream's work
        self._stream = kernels.raw_stream(kernels.device_index(x)) if x.is_cuda else None
        self._waited = False

    def __del__(self) -> None:
        # a handle never waited for drops its call's checks: say so (an error of the
        # exchange, such as a rank that disagreed, would otherwise go unseen)
        if not getattr(self, "_waited", True) and not sys.is_finalizing():
            warnings.warn("moe_flashcomm: an all_to_all handle (async_op=True) was dropped "
                          "without wait(): its output and whatever its exchange would have "
                          "raised (a rank that disagreed) are lost; wait for every handle",
                          RuntimeWarning, stacklevel=2)

    def is_completed(self) -> bool:
        if self._pending is not None:
            return self._pending.is_completed()
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if direct.compiling():  # (torch.compile: run outside the graph)
            return direct.untraced(self.wait)
        self._waited = True  # (what wait() raises is the call's error: nothing dropped)
        if self._x is not None:  # not waited for yet
            call = self._call
            self._owner.check_live(" before this all_to_all's handle was waited for")
            if self._stream is not None:
                _order_after(self._stream, self._x)
            if self._pending is not None:
                out = self._pending.wait()
                if out.dim() != len(call.out_shape):
                    out = out.view(call.out_shape)
            else:
                if self._work is not None:
                    self._work.wait()
                out = self._out
            if self._grad:
                with torch.enable_grad():
                    out = _AllToAll.apply(self._x, _Ready(call, out))
            # (the communicator is held while the call may run: autograd's context has it)
            self._out, self._x, self._owner = out, None, None
        return self._out


def _order_after(stream: int, x: torch.Tensor) -> None:
    """Order the current stream of ``x``'s device after ``stream`` (a raw handle) when they
    differ."""
    dev = kernels.device_index(x)
    if kernels.raw_stream(dev) != stream:
        torch.cuda.current_stream(dev).wait_stream(torch.cuda.ExternalStream(stream, device=dev))


def split_key(sizes) -> tuple:
    """Split sizes (not None) as a hashable key of ints; TypeError for what cannot be one,
    floats included (2.0 equals 2 but is refused: it takes the checking path). Integers of
    other types (numpy) count as theirs, as the check takes them (bools too, as 0 and 1)."""
    if isinstance(sizes, torch.Tensor):
        if not integer_dtype(sizes.dtype):  # (refused by the check)
            raise TypeError("not a key")
        return tuple(sizes.tolist())
    if type(sizes) is not list and type(sizes) is not tuple and (
            iter(sizes) is sizes or isinstance(sizes, NOT_SPLIT_SIZES)):
        # an iterator (a generator) has one pass, which the check needs: no key (else the
        # check found it empty at a call's first use, and refused it as "got 0"); a dict's
        # keys would find the plan of other sizes: the check refuses it
        raise TypeError("not a key")
    key = tuple(sizes)
    if type(sum(key)) is int:  # (the hot path: Python ints)
        return key
    return tuple(map(operator.index, key))
