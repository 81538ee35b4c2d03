"""``Communicator``: everything of one process group that outlives a call.

A communicator is made once per process group, collectively (every rank of the group makes
it, with the same settings: checked). It owns the routes and per-call plans of its
all-to-alls and all-reduces, the peer-to-peer buffers and flags inside a node, its side
streams, the hierarchy's stage layout and the cross-rank consistency state. ``close()``
frees its device memory and IPC mappings; a closed communicator raises when used.

``moe_flashcomm.all_to_all`` / ``all_reduce`` are thin functions over a default
communicator per (group, topology, gate), kept in :data:`PROCESS`. A process group that is
destroyed and created again is a new group object, so it gets a new communicator; the
default communicators of destroyed groups are closed when the next one is made.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import os
import weakref
from typing import Optional, Union

import torch
import torch.distributed as dist

from .. import env, kernels
from ..codec import CodecConfig
from ..codec.reference import check_tokens
from ..memo import keep
from . import hierarchical, p2p
from .autograd import (DEFAULT_GRAD_CODEC, AllToAllHandle, _AllToAll, _Call, auto_chunks,
                       split_key)
from .check import ConfigMismatchError, check_consistent, reject_check
from .exchange import ALGORITHMS, Route, SideStreams, exchange, raise_stamp_report
from . import direct, frame
from .frame import Framing
from .gate import SizeGate
from .plan import SplitSizes, check_chunks, resolve_splits
from .topology import LinkCodecs, Topology, intra_node_path, link_path

CodecArg = Union[LinkCodecs, CodecConfig, dict, int, str, None]


class CommunicatorClosedError(RuntimeError):
    """A closed Communicator was used, or a process group that was destroyed."""


class Communicator:
    """The quantized collectives of one process group.

    group:      a torch.distributed process group (None: the default group). Gloo for CPU
                tensors, NCCL for CUDA tensors; two processes on one GPU may use gloo (then
                CUDA tensors move through the peer-to-peer transport only).
    topology:   Topology or ranks per node; None: the launcher's LOCAL_WORLD_SIZE etc.
    gate:       size gate: True (defaults or $MOE_FLASHCOMM_GATE_FILE), False, a thresholds
                dict, a JSON path or a SizeGate.
    codec, grad_codec: the default codecs of ``all_to_all`` (forward, backward; ``codec``
                is ``all_reduce``'s too); None: int4 (g128, spikes) and int8.
    algorithm, chunks: the defaults of ``all_to_all`` (``all_reduce`` has its own).
    timeout:    seconds a call waits for peers that do not take part before it raises
                PeerTimeoutError naming them (an exchange over gloo at once; a peer-to-peer
                wait on the GPU gives up and raises at the next call), 0.001 to 1e9; None:
                $MOE_FLASHCOMM_TIMEOUT_S (300).

    Collective: every rank of ``group`` makes its communicator with the same settings, at
    the same point (a mismatch raises ``ConfigMismatchError`` on every rank). Use it as a
    context manager, or call ``close()``, to free its peer-to-peer memory.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *,
                 topology: Union[Topology, int, None] = None,
                 gate: Union[SizeGate, bool, dict, str, None] = True,
                 codec: CodecArg = None, grad_codec: CodecArg = None,
                 algorithm: str = "flat", chunks: Optional[int] = None,
                 timeout: Optional[float] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("moe_flashcomm.Communicator needs torch.distributed to be "
                               "initialised (torch.distributed.init_process_group)")
        if group is not None and not isinstance(group, dist.ProcessGroup) and (
                group is not dist.GroupMember.NON_GROUP_MEMBER):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(group).__name__} {group!r} (moe_flashcomm's all_reduce "
                            "takes (x, group, codec, op), not torch's (tensor, op, group))")
        # the group as it is now: a default group destroyed and made again is another group
        self.group = direct.process_group(group)
        # a destroyed group: the error a cached communicator's calls give (torch would say
        # "not registered"); a non-member is refused below
        if not direct.is_live(self.group) and self.group is not dist.GroupMember.NON_GROUP_MEMBER:
            raise CommunicatorClosedError(
                "moe_flashcomm: the process group passed as `group` was destroyed "
                "(torch.distributed.destroy_process_group); pass a live group")
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `group`")
        self.backend = str(dist.get_backend(self.group)).lower()
        # where the group's small agreement collectives run (NCCL needs CUDA tensors)
        self.agree_device = (torch.device("cuda", torch.cuda.current_device())
                             if "nccl" in self.backend else torch.device("cpu"))
        try:
            self._arguments(topology, gate, codec, grad_codec, algorithm, chunks, timeout)
        except (ValueError, TypeError):
            # the other ranks are in the consistency check below: they raise at once
            reject_check(self.group, self.agree_device,
                         Framing(frame.REJECT_WAIT_S, PROCESS.group_lines))
            raise
        PROCESS.forget_lines(direct.live_groups())
        self.streams = SideStreams()
        # exchanges over gloo carry headers: every call is checked (comm/frame.py)
        self.framing = Framing(self.timeout_s, PROCESS.group_lines, self._peer_check)
        self.calls = {"all_to_all": 0, "all_reduce": 0}  # counters, for users and tests
        self._verified: dict = {}     # consistency keys all ranks agreed on -> their words
        self._forgotten: set = set()  # words of checks forgotten since (_peer_check)
        self._routes: dict = {}       # (codecs, device type) -> Route
        self._plans: dict = {}        # all_to_all arguments -> _Call
        self._setups: dict = {}       # call configuration -> (forward, backward) Route
        self._peer_buffers: dict = {}  # device index -> PeerBuffers or None
        self._pages: dict = {}  # device index -> p2p.ErrorPage of the stamped exchanges
        self.all_reduce_plans: dict = {}  # comm/all_reduce.py's plans
        self.hierarchy_state = hierarchical.HierarchyState()
        self.closed = False
        # dropped without close(): its device memory, peer mappings and pinned pages are
        # freed as it goes (raw allocations, which nothing else frees); not at exit, where
        # peers may be gone and the process's end frees them anyway
        weakref.finalize(self, _free_dropped, self._peer_buffers, self._pages,
                         os.getpid()).atexit = False
        self._made = dict(world=self.world, nodes=self.nodes, gate=self.gate.digest,
                          codec=self.codec, grad_codec=self.grad_codec, algorithm=algorithm,
                          chunks=chunks, backend=self.backend,
                          p2p=(self.p2p_enabled, *self.p2p_limits), stamps=self.stamps,
                          nccl_paths=(self.nccl_intra_path,))
        self.check_made()

    def check_made(self) -> None:
        """The check that every rank made its communicator with the same settings: collective
        when it is made, and again at the next first use of a configuration where this rank
        forgot it (a peer that came late to it missed it: ``_peer_check``); free otherwise."""
        check_consistent(self._made, self.group, self.agree_device, self._verified,
                         what="moe_flashcomm.Communicator", framing=self.framing)

    def _arguments(self, topology, gate, codec, grad_codec, algorithm, chunks, timeout) -> None:
        """Check and keep the constructor's arguments (ValueError / TypeError naming them)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        check_chunks(chunks)
        if timeout is not None and not (isinstance(timeout, (int, float))
                                        and not isinstance(timeout, bool)
                                        and 1e-3 <= timeout <= env.MAX_TIMEOUT_S):
            raise ValueError(f"timeout must be a number of seconds from 0.001 to "
                             f"{env.MAX_TIMEOUT_S:g}, got {timeout!r}")
        self.topology = Topology.coerce(topology, dist.get_world_size(), dist.get_rank())
        self.global_ranks = tuple(dist.get_process_group_ranks(self.group))
        self.nodes = tuple(self.topology.node_of(g) for g in self.global_ranks)
        self.gate = SizeGate.coerce(gate)
        self.codec = LinkCodecs.coerce(codec, "codec")
        self.grad_codec = LinkCodecs.coerce(DEFAULT_GRAD_CODEC if grad_codec is None
                                            else grad_codec, "grad_codec")
        self.algorithm, self.chunks = algorithm, chunks
        # the environment's settings, read here (once) so that a bad value on one rank is
        # rejected on every rank, like a bad argument; the group checks them equal
        self.p2p_enabled, self.stamps = env.p2p_enabled(), env.stamps_enabled()
        self.p2p_limits = (env.p2p_max_bytes(), env.p2p_copy_bytes())  # (p2p.PeerBuffers)
        self.nccl_intra_path = intra_node_path("cuda")  # NCCL's switches: its link class
        self.timeout_s = env.timeout_s() if timeout is None else timeout

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the peer-to-peer memory and mappings (after this device is idle and the peers
        have taken this rank's last records, waiting at most the timeout) and forget every
        plan. Local: each rank closes its own; a closed communicator raises when used.
        A disagreement the kernels found in the last calls is raised here, once everything
        is freed (see ``check``)."""
        if self.closed:
            return
        self.closed = True
        try:
            found = _free_device(self._peer_buffers, self._pages, self)
        finally:
            self._forget()
        if found is not None:
            raise found

    def check(self) -> None:
        """Raise what the kernels of CUDA calls found after their call returned:
        ConfigMismatchError for a disagreement between ranks (a stamp that differed),
        PeerTimeoutError for a peer-to-peer wait for a peer that timed out (each call checks
        the earlier ones; this checks the latest, e.g. after a final
        ``torch.cuda.synchronize()``). Local, cheap: a read of pinned host memory per
        device."""
        for bufs in self._peer_buffers.values():
            if bufs is not None:
                bufs.check()
        for page in self._pages.values():
            raise_stamp_report(page, self)

    def _forget(self) -> None:
        """Drop every plan, route and buffer reference (and the process groups they hold)."""
        for d in (self._peer_buffers, self._pages, self._routes, self._plans, self._setups,
                  self.all_reduce_plans, self.hierarchy_state):
            d.clear()

    def _peer_check(self, words: tuple) -> Optional[str]:
        """A peer makes the first-use check ``words`` (comm/check.py) while this rank, which
        made its own before, exchanges: what to say of it. Where this rank made that very
        check with it: the peer missed it (it came to it late, or made it through another
        communicator of the group); forget it, and the plans that skip it, so that both
        check again at their next call instead of disagreeing at every call. Else, among the
        checks of that kind this rank made, the fields whose value is new to it."""
        made = [key for key, sent in self._verified.items() if sent == words]
        for key in made:
            del self._verified[key]
        if made:  # (the plans are made again without a collective, but for the checks)
            for plans in (self._plans, self._setups, self.all_reduce_plans):
                plans.clear()
            self._forgotten.add(words)
        if words in self._forgotten:  # (also for other peers making it, met at once)
            return ("it makes the first-use check of a configuration this rank checked with it "
                    "before, so it missed that check (it came to it late, or made it through "
                    "another communicator): this rank forgets it, and both check it again at "
                    "their next call")
        kind = [key for key, sent in self._verified.items() if sent[0] == words[0]]
        if not kind:
            return None
        new = [(i, name) for i, (name, _) in enumerate(kind[0][1:], start=1)
               if all(self._verified[key][i] != words[i] for key in kind)]
        if not new:
            return ("it makes the first-use check of a configuration new to it, though each "
                    "of its fields has a value this rank has used")

        def used(i: int) -> str:  # (the values this rank checked, a few)
            values = sorted({key[i][1] for key in kind})
            return ", ".join(values[:4]) + (", ..." if len(values) > 4 else "")
        return "it makes the first-use check of a configuration new to it: " + "; ".join(
            f"its {name} is none this rank has used ({used(i)})" for i, name in new)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, when: str = "") -> None:
        """(At a call's first use, where its plan is made.)"""
        self.check_live(when)
        if self.closed:
            raise CommunicatorClosedError(f"this moe_flashcomm.Communicator was closed{when}; "
                                          "make a new one for the group")

    def group_is_live(self) -> bool:
        """Whether torch.distributed still knows this communicator's group (every call asks:
        a planned call on a destroyed group would run on its old sockets on one rank and
        fail on another)."""
        return direct.is_live(self.group)

    def check_live(self, when: str = "") -> None:
        """Raise if the group was destroyed; ``when`` ends the sentence (" before ...")."""
        if not self.group_is_live():
            raise CommunicatorClosedError(
                f"the process group of this moe_flashcomm.Communicator was destroyed{when} "
                "(torch.distributed.destroy_process_group); make a new one for a live group")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"codec={self.codec}"
        return (f"Communicator(rank {self.rank} of {self.world}, "
                f"{len(set(self.nodes))} node(s), {state})")

    # ---- routes --------------------------------------------------------------------------------
    def route(self, codecs: LinkCodecs, device_type: str) -> Route:
        """The codec, size-gate threshold and link path towards every group rank (no p2p)."""
        key = (codecs, device_type)
        hit = self._routes.get(key)
        if hit is None:
            same = [n == self.nodes[self.rank] for n in self.nodes]
            codec = tuple(codecs.for_peer(s) for s in same)
            paths = tuple(link_path(s, device_type) if p != self.rank else "self"
                          for p, s in enumerate(same))
            thresholds = tuple(self.gate.threshold(path, c) for path, c in zip(paths, codec))
            hit = self._routes[key] = Route(
                self.group, self.rank, self.world, codec, thresholds, paths=paths,
                streams=self.streams, framing=self.framing if device_type == "cpu" else None,
                pages=self._pages if device_type == "cuda" and self.stamps else None)
        return hit

    def peer_buffers(self, device: torch.device) -> Optional[p2p.PeerBuffers]:
        """The peer-to-peer buffers on ``device`` when every peer is on this node over NVLink
        (collective the first time), else None."""
        index = kernels.index_of(device)
        if index not in self._peer_buffers:
            usable = self.p2p_enabled and len(set(self.nodes)) == 1 \
                and self.nccl_intra_path == "nvlink"
            self._peer_buffers[index] = p2p.peer_buffers(
                self.group, self.rank, self.world, torch.device("cuda", index),
                self.agree_device, self.timeout_s, self.p2p_limits,
                self.framing if self.agree_device.type == "cpu" else None) if usable else None
        return self._peer_buffers[index]

    def _call_routes(self, x: torch.Tensor, codecs: LinkCodecs, grad_codecs: LinkCodecs,
                     algorithm: str, chunks, grad: bool) -> tuple[Route, Route]:
        """Forward and backward routes of a call configuration, after checking (one
        collective, the first time) that every rank uses the same one."""
        key = (codecs, grad_codecs, x.device.type, x.shape[1:], x.dtype, algorithm, chunks, grad)
        hit = self._setups.get(key)
        if hit is not None:
            return hit
        device_type = x.device.type
        fwd, bwd = self.route(codecs, device_type), self.route(grad_codecs, device_type)
        self.check_made()
        check_consistent(dict(row_shape=tuple(x.shape[1:]), dtype=x.dtype, codec=codecs,
                              grad_codec=grad_codecs, algorithm=algorithm, chunks=chunks,
                              device_type=device_type, requires_grad=grad),
                         self.group, self.agree_device, self._verified, framing=self.framing)
        if device_type == "cuda":
            bufs = self.peer_buffers(x.device)
            if bufs is not None:
                fwd = dataclasses.replace(fwd, p2p=bufs, plans={})
                bwd = dataclasses.replace(bwd, p2p=bufs, plans={})
        hit = self._setups[key] = (fwd, bwd)
        return hit

    # ---- all-to-all ----------------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor, output_split_sizes: SplitSizes = None,
                   input_split_sizes: SplitSizes = None, *, codec: CodecArg = None,
                   grad_codec: CodecArg = None, async_op: bool = False,
                   chunks: Optional[int] = None, algorithm: Optional[str] = None
                   ) -> Union[torch.Tensor, AllToAllHandle]:
        """Quantized, differentiable ``all_to_all_single`` on rows of ``x`` [N, ..., H] over
        this group (``moe_flashcomm.all_to_all`` documents the arguments); ``codec``,
        ``grad_codec``, ``chunks`` and ``algorithm`` default to the communicator's."""
        if direct.compiling():  # (torch.compile: run outside the graph)
            return direct.untraced(self.all_to_all, x, output_split_sizes, input_split_sizes,
                                   codec=codec, grad_codec=grad_codec, async_op=async_op,
                                   chunks=chunks, algorithm=algorithm)
        try:  # repeated calls (MoE layers repeat their shapes) skip the preparation
            # (with the types: 4.0 equals 4 but is refused, and must not find 4's plan; with
            # the layout: a sparse x of a planned shape is refused too)
            key = (x.shape, x.dtype, x.device, x.layout,
                   x.requires_grad and torch.is_grad_enabled(),
                   codec, type(codec), grad_codec, type(grad_codec), chunks, type(chunks),
                   algorithm,
                   None if output_split_sizes is None else split_key(output_split_sizes),
                   None if input_split_sizes is None else split_key(input_split_sizes))
            call = self._plans.get(key)
        except Exception:  # unhashable arguments, x no tensor: _prepare says what is wrong
            key = call = None
        if call is None or not self.group_is_live():  # (destroyed: _check_open says so)
            try:
                self._check_open()
                call = self._prepare(x, output_split_sizes, input_split_sizes, codec,
                                     grad_codec, chunks, algorithm)
            except frame.EXCHANGE_ERRORS:
                raise
            except Exception:  # (whatever it is: peers that miss it pair with our next call)
                self._reject(x, "all_to_all")
                raise
            if key is not None and call.cacheable:
                keep(self._plans, key, call, 1024)
        self.calls["all_to_all"] += 1
        if x.is_cuda:  # (the hot path: answering would add a call)
            return _run_all_to_all(call, x, async_op)
        return self.answering(x, "all_to_all", _run_all_to_all, call, x, async_op)

    def _reject(self, x, operation: str) -> None:
        """This rank cannot make its ``operation`` (bad arguments, a closed communicator, any
        error before its first exchange). Over gloo (CPU tensors) every call's first step is
        a framed exchange on the whole group (the flat exchange, the hierarchical intra stage
        or count exchange, a consistency check): take part in it with a rejected frame, so
        that the peers raise now instead of waiting for the timeout, or pairing this call
        with our next one."""
        if ("gloo" in self.backend and self.framing is not None  # (None: unframed, tests)
                and not (torch.is_tensor(x) and x.is_cuda)
                and self.group_is_live()):  # (a destroyed group carries nothing)
            frame.reject(self.framing, self.group, self.rank, self.world, operation)

    def answering(self, x: torch.Tensor, operation: str, run, *args):
        """``run(*args)``. On CPU tensors (framed), an error of this rank's own before the
        call drew its number (out of memory copying or padding x, ...) is answered with a
        rejected frame (``_reject``): its peers wait in the call's first exchange, and would
        pair it with this rank's next call (silently wrong results from then on). Errors
        after the number are answered where they happen, with the steps they owe."""
        if x.is_cuda or self.framing is None:  # (None: unframed, as over NCCL; tests)
            return run(*args)
        line = self.framing.line(self.group)
        drawn = line.count
        try:
            return run(*args)
        except frame.EXCHANGE_ERRORS:
            raise
        except Exception:
            if line.count == drawn:
                self._reject(x, operation)
            raise

    def _prepare(self, x, output_split_sizes, input_split_sizes, codec, grad_codec, chunks,
                 algorithm) -> _Call:
        """Validate a call's arguments; the _Call that runs it."""
        check_tokens(x)  # a tensor with data, of a token dtype
        if x.dim() < 2:
            raise ValueError(f"x must be at least 2-D [tokens, ..., hidden], got shape "
                             f"{tuple(x.shape)}")
        if not 1 <= x.shape[-1] <= frame.MAX_HIDDEN:
            raise ValueError(f"x must have hidden size x.shape[-1] >= 1 and < 2**55 (what an "
                             f"exchange's header holds), got shape {tuple(x.shape)}")
        algorithm = self.algorithm if algorithm is None else algorithm
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        check_chunks(chunks)
        chunks = self.chunks if chunks is None else chunks
        codecs = self.codec if codec is None else LinkCodecs.coerce(codec, "codec")
        grad_codecs = (self.grad_codec if grad_codec is None
                       else LinkCodecs.coerce(grad_codec, "grad_codec"))
        grad = torch.is_grad_enabled() and x.requires_grad
        fwd, bwd = self._call_routes(x, codecs, grad_codecs, algorithm, chunks, grad)
        in_s, out_s = resolve_splits(x.shape[0], output_split_sizes, input_split_sizes,
                                     self.world, self.rank)
        per_row = math.prod(x.shape[1:-1])  # tokens per row of dim 0
        uniform = output_split_sizes is None and input_split_sizes is None
        if chunks is None:
            fwd_chunks = auto_chunks(x.numel() * 2, fwd) if x.is_cuda and uniform else 1
        else:
            fwd_chunks = chunks
        out_shape = (sum(out_s),) + tuple(x.shape[1:])
        if per_row != 1:
            in_s, out_s = [n * per_row for n in in_s], [n * per_row for n in out_s]
        run = exchange if algorithm == "flat" else hierarchical.select(
            self, algorithm, fwd, x, tuple(in_s), uniform=uniform)
        return _Call(fwd, bwd, tuple(in_s), tuple(out_s), fwd_chunks, tuple(x.shape), out_shape,
                     run, x.dtype, x.device, grad, uniform, cacheable=algorithm == "flat",
                     owner=self)

    def exchange_counts(self, mine: torch.Tensor) -> torch.Tensor:
        """Exact ``all_to_all_single`` of int64 counts, an equal part per rank (skip_padding:
        the filled slots per expert, to the ranks of the experts). Framed over gloo."""
        if direct.compiling():  # (torch.compile: run outside the graph)
            return direct.untraced(self.exchange_counts, mine)
        try:
            self._check_open()
        except CommunicatorClosedError:
            self._reject(mine, "skip_padding counts")
            raise
        # (a transposed view would send its memory order, and be written through a copy)
        mine = mine.contiguous()
        theirs = torch.empty_like(mine)
        if mine.is_cuda or self.framing is None:  # (None: unframed, as over NCCL; tests)
            dist.all_to_all_single(theirs, mine, group=self.group)
        else:
            if mine.numel() % self.world:  # (all_to_all_single refuses it; a slice would be lost)
                self._reject(mine, "skip_padding counts")
                raise ValueError(f"exchange_counts: {mine.numel()} counts do not split evenly "
                                 f"among the group's {self.world} ranks")
            part = [mine.numel() // self.world] * self.world
            frame.all_to_all_single(self.framing, self.group, self.rank, self.world,
                                    "skip_padding counts", theirs, mine, part, part)
        return theirs

    # ---- all-reduce ----------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, codec: CodecArg = None, op: object = "sum", *,
                   algorithm: str = "flat", chunks: Optional[int] = None) -> torch.Tensor:
        """Quantized sum of ``x`` over this group, in place (``moe_flashcomm.all_reduce``
        documents the arguments); ``codec`` None: the communicator's codec."""
        if direct.compiling():  # (torch.compile: run outside the graph)
            return direct.untraced(self.all_reduce, x, codec, op, algorithm=algorithm,
                                   chunks=chunks)
        from .all_reduce import run_all_reduce
        self.calls["all_reduce"] += 1
        return run_all_reduce(self, x, self.codec if codec is None else codec, op, algorithm,
                              chunks)


class _Process:
    """The process's default communicators (of the thin ``all_to_all`` / ``all_reduce``
    functions) and the hierarchy's stage process groups, which ``dist.new_group`` makes
    collectively for the whole job and every communicator of a group shares."""

    def __init__(self) -> None:
        self.communicators: dict = {}  # (id(group), topology, gate) -> (group, Communicator)
        self.stage_groups: dict = {}   # (global ranks, backend) -> process group, made in:
        self.stage_world = None        # the default group of the job that made them
        self.stage_version = 0         # bumped by create_stage_groups (stages_added)
        # process group -> its framed exchanges, by all of its communicators (frame.GroupLine):
        # a peer whose new communicator rejected its arguments meets this rank's cached one in
        # the same exchange, and both count it alike; two communicators' long messages
        # complete in one order. Weakly keyed: a group dropped by its user is freed
        self.group_lines = weakref.WeakKeyDictionary()
        self.exiting = False  # set at exit (release)

    def communicator(self, group, topology=None, gate=True) -> Communicator:
        pg = direct.process_group(group)
        try:
            key = (id(pg), topology, gate)
            hit = self.communicators.get(key)
        except TypeError:  # an unhashable gate (a dict): keyed by its table
            try:
                key = (id(pg), topology, SizeGate.coerce(gate).digest)
                hit = self.communicators.get(key)
            except (TypeError, ValueError):
                # a bad gate or topology: the constructor below rejects it on every rank
                # (raised here, the peers went on, and met this rank's next call)
                key = hit = None
        if hit is not None and hit[0] is pg and not hit[1].closed:
            return hit[1]
        self._forget_destroyed()
        comm = Communicator(group, topology=topology, gate=gate)
        self.communicators[key] = (pg, comm)  # (the group held: its id cannot be reused)
        return comm

    def stages(self) -> dict:
        """``stage_groups``, of the job now running: a default group destroyed and made again
        is another job (its ranks may be other processes), whose stage groups are made anew.
        Checked by identity, not by liveness: a non-member's entry is no process group."""
        world = dist.group.WORLD
        if self.stage_world is not world:
            self.stage_groups.clear()
            self.stage_world = world
        return self.stage_groups

    def stages_added(self) -> None:
        """create_stage_groups made stage groups: communicators rebuild their stages."""
        self.stage_version += 1

    def release(self) -> None:
        """At exit: drop the process groups we hold while the interpreter is whole (a gloo
        group destroyed during interpreter teardown aborts the process). Device memory goes
        with the process."""
        self.exiting = True  # (dropped communicators leave their memory to the exit too)
        for _, comm in self.communicators.values():
            comm._forget()
        self.communicators.clear()
        self.stage_groups.clear()
        self.stage_world = None
        self.group_lines.clear()
        gc.collect()

    def _forget_destroyed(self) -> None:
        """Close and drop the communicators of groups torch.distributed no longer knows."""
        live = direct.live_groups()
        for key, (pg, comm) in list(self.communicators.items()):
            if comm.closed or pg not in live:
                del self.communicators[key]
                if not comm.closed:
                    try:
                        comm.close()
                    except Exception:  # noqa: BLE001 - a dead group's device may be gone
                        comm.closed = True
        self.forget_lines(live)
        if not live:
            self.stage_groups.clear()
            self.stage_world = None

    def forget_lines(self, live: list) -> None:
        """Drop the lines of groups torch.distributed no longer knows: a frame left unfinished
        or late after a timeout holds its group, so its weak key would never go."""
        for pg in [pg for pg in self.group_lines.keys() if pg not in live]:
            del self.group_lines[pg]


def _free_device(peer_buffers: dict, pages: dict, report_to: Optional["Communicator"]):
    """Free the peer buffers (once the peers took this rank's last records, bounded by the
    timeout) and the error pages; return the first disagreement or timeout they report
    (``report_to``: the communicator whose ranks the report names; None: reports are not
    read). Both dicts are emptied whatever happens: what a failure leaves unfreed leaks
    rather than be freed twice by a second caller."""
    found = None
    try:
        for bufs in peer_buffers.values():
            if bufs is not None:
                try:
                    bufs.close()
                except (ConfigMismatchError, frame.PeerTimeoutError) as e:
                    found = found or e
        for page in pages.values():
            torch.cuda.synchronize(page.device)  # the last decodes have run
            if report_to is not None:
                try:
                    raise_stamp_report(page, report_to)
                except ConfigMismatchError as e:
                    found = found or e
            page.close()
    finally:
        peer_buffers.clear()
        pages.clear()
    return found


def _free_dropped(peer_buffers: dict, pages: dict, pid: int) -> None:
    """``close()``'s freeing for a communicator dropped without it; what it would report
    has no caller left to raise to. (Nothing to do after close(): it empties both dicts.)
    Left to the process's end where freeing could do harm: in a forked child (the memory is
    the parent's), once the process is exiting (peers may be gone: a wait would take the
    timeout), during a CUDA graph capture on this thread's stream (a synchronize or free
    would break it; the garbage collector can drop a communicator at any point), and where
    a captured graph may still replay into the buffers (``captured``, ``retired``)."""
    if (os.getpid() != pid or PROCESS.exiting or not (peer_buffers or pages)
            or torch.cuda.is_current_stream_capturing()
            or any(b is not None and (b.captured or b.retired) for b in peer_buffers.values())):
        return
    try:
        _free_device(peer_buffers, pages, None)
    except Exception:  # noqa: BLE001 - no caller to raise to (a CUDA error: the device's)
        pass


def _run_all_to_all(call: _Call, x: torch.Tensor, async_op: bool):
    """Run a prepared all-to-all: its output, or its handle (``async_op``)."""
    if not async_op:
        if call.grad:
            return _AllToAll.apply(x, call)
        return call.forward_out(x)
    return call.start(x)


PROCESS = _Process()
atexit.register(PROCESS.release)


def all_to_all(
    x: torch.Tensor,
    output_split_sizes: SplitSizes = None,
    input_split_sizes: SplitSizes = None,
    group: Optional[dist.ProcessGroup] = None,
    codec: Union[LinkCodecs, CodecConfig, dict, int, str, None] = None,
    async_op: bool = False,
    grad_codec: Union[LinkCodecs, CodecConfig, dict, int, str, None] = None,
    *,
    topology: Union[Topology, int, None] = None,
    gate: Union[SizeGate, bool, dict, str, None] = True,
    chunks: Optional[int] = None,
    algorithm: str = "flat",
) -> Union[torch.Tensor, AllToAllHandle]:
    """Quantized, differentiable ``torch.distributed.all_to_all_single`` on rows.

    x:                  [N, ..., H] float32, bfloat16 or float16; dim 0 is routed exactly
                        as ``all_to_all_single`` routes it; H is the quantized hidden size.
    output_split_sizes: rows (of dim 0) received from each group rank; None: even split of
                        N. input_split_sizes: rows sent to each group rank; None: even.
    group:              process group (None: the default group); gloo (CPU tensors) or
                        NCCL (CUDA tensors).
    codec:              CodecConfig / dict / bits value (every link), or LinkCodecs for a
                        codec per link (intra- vs inter-node). None: CodecConfig() (int4,
                        g128, spikes). Rows a rank sends to itself are copied exactly.
    async_op:           return an AllToAllHandle; its wait() decodes and gives the output.
    grad_codec:         codec of the backward (the reverse all-to-all of the gradient);
                        None: CodecConfig(bits=8).
    topology:           Topology or ranks per node; None: from LOCAL_WORLD_SIZE etc.
    gate:               size gate: True (default table or $MOE_FLASHCOMM_GATE_FILE), False
                        (never fall back to bf16), a thresholds dict, a JSON path or SizeGate.
    chunks:             pipeline chunks (CUDA). None: chosen by size (auto_chunks: on
                        network links only, where it was measured not to lose) when both
                        split sizes are None, so every rank has the same size; 1 otherwise.
                        Must be equal on every rank.
    algorithm:          "flat" (one all_to_all_single), "hierarchical" (intra-node, then
                        inter-node among ranks of equal local rank; quantized once, results
                        bit-identical to "flat"; moe_flashcomm.comm.hierarchical) or "auto"
                        (hierarchical for >= 2 nodes of >= 2 ranks and small per-pair
                        messages, by an alpha-beta model; flat otherwise).

    Returns [sum(output_split_sizes), ..., H] of x's dtype, or an AllToAllHandle.
    Every rank of the group must pass the same codecs, dtype, x.shape[1:], algorithm,
    chunks, topology and gate: checked collectively the first time a combination is used.
    The call runs on the default Communicator of (group, topology, gate), made at its first
    use; make a ``moe_flashcomm.Communicator`` yourself to own its lifetime.
    """
    if direct.compiling():  # (torch.compile: run outside the graph)
        return direct.untraced(all_to_all, x, output_split_sizes, input_split_sizes, group,
                               codec, async_op, grad_codec, topology=topology, gate=gate,
                               chunks=chunks, algorithm=algorithm)
    return PROCESS.communicator(group, topology, gate).all_to_all(
        x, output_split_sizes, input_split_sizes, codec=codec, grad_codec=grad_codec,
        async_op=async_op, chunks=chunks, algorithm=algorithm)


def communicator(group: Optional[dist.ProcessGroup] = None, topology=None,
                 gate=True) -> Communicator:
    """The default communicator of ``group`` (made, collectively, at its first use)."""
    return PROCESS.communicator(group, topology, gate)
