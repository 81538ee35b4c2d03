"""Two-level hierarchical all-to-all: an intra-node stage, then an inter-node stage.

A row from source (node n, local rank l) to destination (n', l') travels to the intermediate
rank (n, l') inside the node, then to (n', l') across nodes: every rank sends L - 1 intra-node
and N - 1 inter-node messages instead of (N - 1) L across nodes. The source encodes once with
its pair's wire (as the flat algorithm does), the intermediate forwards bytes untouched, the
destination decodes: results are bit-identical to ``algorithm="flat"`` (with stochastic
rounding, equal in distribution: the rows are encoded in other batches, so the noise
differs). With split sizes each
call starts with one small count exchange inside the node. Each stage runs on its own process
group, made by every process of the job together (``create_stage_groups``). The data path,
split sizes at the intermediate hop and the process-group rules are described in
docs/design.md, "Hierarchical all-to-all".
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..memo import remember
from . import frame
from .check import ConfigMismatchError, check_consistent, gather_table, hash63
from .exchange import (Pending, Route, _pack, _segments, _unpack, row_bytes, stamp_bytes,
                       stamped_call)
from .exchange import exchange as flat_exchange
from .frame import Framing
from .plan import offsets
from .topology import Topology

# ---- the alpha-beta model (tools/a2a_model.py prints it; "auto" decides with it) ---------
MIB = 1 << 20


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta costs per rank. Seconds, and bytes per second one rank moves.

    intra/inter_beta: NCCL bf16 ``all_to_all_single`` of 256 MiB per rank on 2 H200s (NVLink
    0.54 ms; the network emulation, sockets over loopback, 61 ms): each rank sends 128 MiB
    to its peer, so beta = 128 MiB / time. The alphas (per message) are assumptions.
    mem_beta: the H200's device copy; a gather reads and writes its bytes. codec_beta: bf16
    bytes per second through one encode or decode (a plain 4-bit encode's speed).
    """

    intra_alpha: float = 10e-6
    intra_beta: float = 128 * MIB / 0.54e-3
    inter_alpha: float = 50e-6
    inter_beta: float = 128 * MIB / 61e-3
    mem_beta: float = 4.2e12
    codec_beta: float = 256 * MIB / 0.17e-3


@dataclass(frozen=True)
class Traffic:
    """One rank's part of an all-to-all: messages and bytes per link kind (rows a rank
    keeps excluded), and bytes through the gathers (hierarchical only)."""

    intra_msgs: int
    intra_bytes: int
    inter_msgs: int
    inter_bytes: int
    gather_bytes: int = 0
    count_msgs: int = 0  # the intra-node count exchange (explicit split sizes)


def traffic(algorithm: str, nodes: int, local: int, intra_peer_bytes: int,
            inter_peer_bytes: int, count_exchange: bool = False) -> Traffic:
    """Traffic of one rank for ``nodes`` x ``local`` ranks when every pair carries
    ``intra_peer_bytes`` (same node) or ``inter_peer_bytes`` (other node) on the wire."""
    N, L, mi, me = nodes, local, intra_peer_bytes, inter_peer_bytes
    if algorithm == "flat":
        return Traffic(L - 1, (L - 1) * mi, (N - 1) * L, (N - 1) * L * me)
    if algorithm != "hierarchical":
        raise ValueError(f"algorithm must be 'flat' or 'hierarchical', got {algorithm!r}")
    # stage 1: to each of the L - 1 node-mates l', the pair to it and the N - 1 pairs to
    # the (n', l') on other nodes; stage 2: to each other node, L pairs (one per source).
    # The two gathers move the whole buffer; with one node or one rank per node the
    # layouts already agree and there is no gather.
    buffer = (L - 1) * mi + (N - 1) * L * me if N > 1 and L > 1 else 0
    return Traffic(L - 1, (L - 1) * (mi + (N - 1) * me), N - 1, (N - 1) * L * me,
                   gather_bytes=2 * buffer, count_msgs=(L - 1) if count_exchange and L > 1 else 0)


def predict(algorithm: str, t: Traffic, model: LinkModel = LinkModel()) -> dict:
    """Predicted seconds: ``intra``, ``inter``, ``gather`` and ``total``.

    flat: NCCL moves the intra- and inter-node messages of one ``all_to_all_single`` at
    the same time, total = max(intra, inter). hierarchical: the stages run one after the
    other, with a gather (read + write) before each: total = intra + inter + gather.
    """
    intra = (t.intra_msgs + t.count_msgs) * model.intra_alpha + t.intra_bytes / model.intra_beta
    inter = t.inter_msgs * model.inter_alpha + t.inter_bytes / model.inter_beta
    gather = 2 * t.gather_bytes / model.mem_beta
    total = max(intra, inter) if algorithm == "flat" else intra + inter + gather
    return dict(intra=intra, inter=inter, gather=gather, total=total)


def prefer_hierarchical(nodes: int, local: int, intra_peer_bytes: int, inter_peer_bytes: int,
                        count_exchange: bool = False, model: LinkModel = LinkModel()) -> bool:
    """The ``"auto"`` rule: hierarchical when there are >= 2 nodes of >= 2 ranks and the
    model predicts it faster. Both move the same inter-node bytes; hierarchical saves
    (N - 1)(L - 1) inter-node message latencies and pays a second, sequential intra-node
    stage carrying (L - 1) / L of the inter-node bytes again, plus two gathers, so it wins
    only while per-pair messages are small (docs/benchmarks.md, "## Hierarchical all-to-all").
    """
    if nodes < 2 or local < 2:
        return False
    args = (nodes, local, intra_peer_bytes, inter_peer_bytes)
    flat = predict("flat", traffic("flat", *args), model)["total"]
    hier = predict("hierarchical", traffic("hierarchical", *args, count_exchange), model)["total"]
    return hier < flat


# ---- layout and process groups -------------------------------------------------------------
class HierarchyError(ValueError):
    """The group's ranks are not nodes x ranks-per-node (same count on every node)."""


@dataclass(frozen=True)
class Layout:
    """``group`` as ``nodes`` x ``local`` (group rank g = node * local + local rank), with
    the global ranks of every group rank. ``regular`` False: not such a grid (``why``)."""

    granks: tuple
    nodes: int
    local: int
    regular: bool
    why: str = ""


def _grid(granks: tuple, topo: Topology) -> Layout:
    node = [topo.node_of(g) for g in granks]
    sizes: dict = {}
    for n in node:
        sizes[n] = sizes.get(n, 0) + 1
    regular = node == sorted(node) and len(set(sizes.values())) == 1
    why = "" if regular else (
        f"group ranks per node {dict(sorted(sizes.items()))} (global ranks {list(granks)}, "
        f"{topo.local_size} ranks per node): every node must hold the same number of the "
        "group's ranks")
    return Layout(granks, len(sizes), len(granks) // len(sizes), regular, why)


@dataclass
class HierarchyState:
    """What this module keeps per Communicator (its ``hierarchy_state``): the group's node
    ``layout``, its stages (``hierarchy``, made under ``stage_version`` of the process's
    stage groups), and the per-pair rows "auto" decided on per configuration."""
    layout: Optional[Layout] = None
    hierarchy: Optional[Hierarchy] = None
    stage_version: int = -1
    auto_sizes: dict = field(default_factory=dict)

    def clear(self) -> None:
        self.layout = self.hierarchy = None
        self.stage_version = -1
        self.auto_sizes.clear()


def layout(comm) -> Layout:
    """The node layout of a Communicator's group under its topology (no collective)."""
    state = comm.hierarchy_state
    if state.layout is None:
        state.layout = _grid(comm.global_ranks, comm.topology)
    return state.layout


def _stage_ranks(lay: Layout) -> list[tuple]:
    """Global ranks of every stage group of ``lay``: the N intra-node groups, then the L
    inter-node groups (none when a stage is a single rank or the whole group)."""
    N, L, g = lay.nodes, lay.local, lay.granks
    if N == 1 or L == 1:
        return []
    return [g[n * L:(n + 1) * L] for n in range(N)] + [g[l::L] for l in range(L)]


def _stage_groups() -> dict:
    """(global ranks, backend) -> the group from dist.new_group (a non-member's: whatever it
    returned): the process's, shared by every communicator, of the job now running. The same
    keys on every process: every entry is made by every process."""
    from .communicator import PROCESS
    return PROCESS.stages()


def _create(lay: Layout, backend: str) -> None:
    """Create the missing stage groups of ``lay``. Collective over EVERY process of the job
    (``dist.new_group``): all of them call it with the same layouts in the same order."""
    groups = _stage_groups()
    for ranks in _stage_ranks(lay):
        if (ranks, backend) not in groups:
            groups[ranks, backend] = dist.new_group(list(ranks), backend=backend)


def create_stage_groups(groups: Sequence[Sequence[int]], topology=None,
                        backend: Optional[str] = None) -> None:
    """Create the stage groups of the hierarchical all-to-all over each group in ``groups``
    (lists of global ranks, e.g. every expert-parallel group of the job) under ``topology``.

    Collective over every process of the job: all call it with the same arguments, in the
    same order relative to other ``dist.new_group`` calls (as ``dist.new_group`` requires;
    DeepSpeed creates its expert-parallel groups this way). Needed only for groups smaller
    than the job: a group of every process creates its stage groups itself on first use.
    ``backend``: that of the groups (None: the default group's). Irregular
    groups (not the same number of ranks on every node) are skipped.
    """
    world = dist.get_world_size()
    topo = Topology.coerce(topology, world, dist.get_rank())
    backend = backend or dist.get_backend()
    grids = [_grid(ranks, topo) for ranks in _check_groups(groups, world)]  # (all, then create)
    for lay in grids:
        if lay.regular:
            _create(lay, backend)
    from .communicator import PROCESS
    PROCESS.stages_added()


def _check_groups(groups, world: int) -> list:
    """``groups`` as sorted tuples of global ranks, or an error saying what is wrong with it
    (before any group is made: every process raises the same, and none is left waiting)."""
    form = "a list of groups, each a list of distinct global ranks (ints)"
    try:
        if isinstance(groups, (str, bytes)):
            raise TypeError
        groups = list(groups)
    except TypeError:
        raise TypeError(f"create_stage_groups: groups must be {form}, got {groups!r}") from None
    out = []
    for group in groups:
        try:  # (integers of any type: numpy's, a tensor's items; not bools)
            if isinstance(group, (str, bytes)):
                raise TypeError
            group = list(group)
            if any(isinstance(r, bool) for r in group):
                raise TypeError
            ranks = [operator.index(r) for r in group]
        except TypeError:
            raise TypeError(f"create_stage_groups: groups must be {form}; got the group "
                            f"{group!r}") from None
        bad = sorted({r for r in ranks if not 0 <= r < world})
        if bad or len(set(ranks)) != len(ranks) or not ranks:
            raise ValueError(f"create_stage_groups: the group {list(ranks)} must hold distinct "
                             f"global ranks in 0..{world - 1} (the job's world size is "
                             f"{world})" + (f"; {bad} are not" if bad else ""))
        out.append(tuple(sorted(ranks)))
    return out


class Hierarchy:
    """The two stages of one rank of ``group`` (group rank = node * local + local rank).

    Stage "intra": this node's ``local`` ranks; stage "inter": the ``nodes`` ranks with this
    local rank. A stage runs on, in order of preference: nothing (one rank: skipped),
    ``group`` itself (the stage is the whole group), its own cached stage group, or
    ``group`` with zero split sizes for the ranks outside the stage ("masked": correct, but
    torch posts zero-byte NCCL send/recv to them). Over gloo the intra stage is always run
    masked on ``group``, so that a rank running the flat algorithm meets it (``a2a``).
    Per-split plans are cached here.
    """

    def __init__(self, group, lay: Layout, rank: int, backend: str,
                 framing: Optional[Framing] = None) -> None:
        self.group, self.nodes, self.local, self.rank = group, lay.nodes, lay.local, rank
        self.framing = framing  # CPU stages carry headers (comm/frame.py)
        self.backend = backend
        self.node, self.local_rank = divmod(rank, lay.local)
        self.world = len(lay.granks)
        L, n, l = lay.local, self.node, self.local_rank
        self.stages = {}  # name -> (process group, group ranks of the stage, masked)
        for name, peers in (("intra", list(range(n * L, (n + 1) * L))),
                            ("inter", list(range(l, self.world, L)))):
            own = _stage_groups().get((tuple(lay.granks[p] for p in peers), backend))
            if len(peers) in (1, self.world) or own is None:
                self.stages[name] = (group, peers, len(peers) not in (1, self.world))
            else:
                self.stages[name] = (own, peers, False)
        self._plans: dict = {}

    def numbering(self, device: torch.device) -> dict:
        """For a call on CPU (framed stages): one number for all its stages, from the count
        of the whole group, so a stage never pairs with another call's."""
        if self.framing is None or device.type == "cuda":
            return {}
        return self.framing.numbering(self.group)

    def kind(self, stage: str) -> str:
        """How a stage runs on CUDA tensors: "skipped", "group", "own group" or "masked" (on
        CPU tensors, framed, the intra stage runs on the group: ``a2a``)."""
        pg, peers, masked = self.stages[stage]
        if len(peers) == 1:
            return "skipped"
        if masked:
            return "masked"
        return "group" if len(peers) == self.world else "own group"

    def __repr__(self) -> str:
        return (f"Hierarchy({self.nodes} nodes x {self.local} ranks, rank {self.rank} = "
                f"node {self.node} local {self.local_rank}; intra: {self.kind('intra')}, "
                f"inter: {self.kind('inter')}"
                + ("; CPU tensors: intra on the group, framed" if "gloo" in self.backend
                   else "") + ")")

    def a2a(self, stage: str, out: torch.Tensor, inp: torch.Tensor, out_splits: list,
            in_splits: list, async_op: bool = False, operation: str = "hierarchical stage",
            detail: int = 0, rows: Optional[tuple] = None, records: Optional[tuple] = None,
            label: Optional[tuple] = None, **numbering):
        """``all_to_all_single`` of a stage; splits are per stage rank (index = position
        among the stage's ranks, in group rank order). On CPU it is framed (synchronous;
        ``detail`` and ``numbering`` go to frame.all_to_all_single), and the call's first
        step, on the whole group (stage 1, or stage 2 with one rank per node), puts the call's
        ``rows`` (sent, received: per group rank) in the headers, so that a source and a
        destination that disagree meet there. ``records``
        (the all-reduce's stages): the bytes are records, named in the headers; ``label``
        (the all-to-all's): (dtype, hidden) of the rows they carry (frame.all_to_all_single)."""
        pg, peers, masked = self.stages[stage]
        framed = self.framing is not None and not out.is_cuda
        if framed and stage == "intra":
            # a call's first step: on the whole group, so that a rank running the flat
            # algorithm meets this one there and both raise at once (headers only to the
            # ranks outside the node) instead of waiting for each other until the timeout
            pg, masked = self.group, len(peers) < self.world
        if masked:
            o, i = [0] * self.world, [0] * self.world
            for k, p in enumerate(peers):
                o[p], i[p] = out_splits[k], in_splits[k]
            out_splits, in_splits = o, i
        if framed:
            if pg is self.group:
                return frame.all_to_all_single(self.framing, pg, self.rank, self.world,
                                               operation, out, inp, out_splits, in_splits,
                                               detail, rows, records, label=label,
                                               **numbering)
            # on a stage group: its errors name (and report elsewhere) ranks of the group
            return frame.all_to_all_single(self.framing, pg, peers.index(self.rank),
                                           len(peers), operation, out, inp, out_splits,
                                           in_splits, detail, None, records, label=label,
                                           names=(self.group, peers), **numbering)
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=pg,
                                      async_op=async_op)

    def meets(self, stage: str, ranks) -> bool:
        """Whether ``stage``'s exchange on CPU (framed) would wait for any of the group ranks
        ``ranks``: a step that does must not be sent once they are known to be in another
        call (they would never answer)."""
        _, peers, masked = self.stages[stage]
        awaited = range(self.world) if stage == "intra" or masked else peers  # (on the group)
        return len(peers) > 1 and any(p in ranks for p in awaited)

    # a pair's wire bytes seen from this rank: codecs and gate depend only on whether the
    # two ranks share a node, so a peer of this rank with the same relation stands in
    def pair_bytes(self, route: Route, src: int, dst: int, rows: int, hidden: int,
                   dtype: torch.dtype) -> int:
        if src == dst or rows == 0:
            return 0
        L, N = self.local, self.nodes
        if src // L == dst // L:
            peer = self.node * L + (self.local_rank + 1) % L
        else:
            peer = ((self.node + 1) % N) * L + self.local_rank
        wire = route.wire(peer, rows, hidden, dtype)
        stamp = stamp_bytes(route.pages is not None, wire, rows)  # as at the pair's source
        return stamp + rows * row_bytes(wire, hidden, dtype)

    def _cached(self, key, make):
        return remember(self._plans, key, make, 512)


def hierarchy(comm) -> Hierarchy:
    """This rank's two stages of the hierarchical all-to-all over a Communicator's group.

    If the group holds every process of the job, its stage groups (N intra-node, then L
    inter-node) are created here with ``dist.new_group``, which is collective over every
    process: every rank calls this at its first hierarchical call on the group, in the
    same order relative to its other process-group creations (as for any collective). For
    a smaller group, stage groups made beforehand by ``create_stage_groups`` (on every
    process) are used; without them the stages run masked on the group. Raises
    HierarchyError if the group is not the same number of ranks on every node.
    """
    from .communicator import PROCESS
    state = comm.hierarchy_state
    if state.hierarchy is None or state.stage_version != PROCESS.stage_version:
        lay = layout(comm)
        if not lay.regular:
            raise HierarchyError(f"the hierarchical algorithm (all-to-all, all-reduce): {lay.why}")
        if len(lay.granks) == dist.get_world_size():
            _create(lay, comm.backend)  # every process is in this call
        state.hierarchy = Hierarchy(comm.group, lay, comm.rank, comm.backend, comm.framing)
        state.stage_version = PROCESS.stage_version
    return state.hierarchy


def hierarchical_groups(group: Optional[dist.ProcessGroup] = None,
                        topology=None) -> Hierarchy:
    """The stages of the default Communicator of ``group`` with ``topology`` (see
    :func:`hierarchy`): call it up front to create stage groups early (e.g. before CUDA
    graph capture)."""
    from .communicator import communicator
    return hierarchy(communicator(group, topology))


# ---- the exchange -------------------------------------------------------------------------
def block_order(sizes: Sequence[int], order: Sequence[int]) -> tuple[int, Optional[torch.Tensor]]:
    """A flat uint8 buffer holds blocks of ``sizes[b]`` bytes, block 0 first. Returns
    (unit, index) with ``buf.view(-1, unit).index_select(0, index)`` the blocks in
    ``order`` (a permutation of the blocks): unit is the gcd of the block sizes, index an
    int64 [total / unit] tensor (CPU). index is None when the buffer already is in order."""
    kept = [b for b in order if sizes[b]]
    if kept == sorted(kept):
        return 1, None
    starts = offsets(sizes)
    unit = functools.reduce(math.gcd, (sizes[b] for b in kept))
    start = torch.tensor([starts[b] // unit for b in kept], dtype=torch.int64)
    length = torch.tensor([sizes[b] // unit for b in kept], dtype=torch.int64)
    shift = start - (torch.cumsum(length, 0) - length)  # source unit - destination unit
    total = int(length.sum())
    return unit, torch.repeat_interleave(shift, length, output_size=total) + torch.arange(total)


def _gather(buf: torch.Tensor, unit: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The one fused layout change between the stages: flat uint8 -> flat uint8."""
    if index is None:
        return buf
    return buf.view(-1, unit).index_select(0, index).view(-1)


@dataclass
class _SourcePlan:
    """The encode, first gather and stage-1 send, and the stage-2 receive and decode, of
    one rank for given row splits."""
    send_segs: list
    recv_segs: list
    unit: int
    index: Optional[torch.Tensor]  # on the device
    send1: list   # bytes to each intra-node peer
    recv2: list   # bytes from each node
    own: tuple    # (input row, output row, rows) this rank keeps
    stamped: bool = False  # CUDA: each pair's records behind its stamp (exchange.StampedCall)
    stamped_calls: dict = field(default_factory=dict)  # device index -> StampedCall

    def sides(self) -> list:
        """The one (send segments, receive segments) a StampedCall launches: the source's
        encode and the destination's decode, checked end to end across both stages."""
        return [(self.send_segs, self.recv_segs)]


@dataclass
class _HopPlan:
    """What this rank forwards: the stage-1 receive, the second gather, the stage-2 send."""
    recv1: list
    unit: int
    index: Optional[torch.Tensor]
    send2: list


def _source_plan(h: Hierarchy, route: Route, in_rows: tuple, out_rows: tuple, hidden: int,
                 dtype: torch.dtype, device: torch.device) -> _SourcePlan:
    r, N, L = route.rank, h.nodes, h.local
    send_w = [None if p == r else route.wire(p, n, hidden, dtype) for p, n in enumerate(in_rows)]
    recv_w = [None if p == r else route.wire(p, n, hidden, dtype) for p, n in enumerate(out_rows)]
    stamped = route.pages is not None  # (CUDA routes, as exchange.make_plan)
    send_segs, send_bytes = _segments(offsets(in_rows), in_rows, send_w, 0, 1, hidden, dtype,
                                      stamped)
    recv_segs, recv_bytes = _segments(offsets(out_rows), out_rows, recv_w, 0, 1, hidden, dtype,
                                      stamped)
    # destination blocks (n', l') -> (l', n'): what goes to intra-node peer l', by node
    unit, index = block_order(send_bytes, [n * L + l for l in range(L) for n in range(N)])
    return _SourcePlan(
        send_segs, recv_segs, unit, None if index is None else index.to(device),
        send1=[sum(send_bytes[n * L + l] for n in range(N)) for l in range(L)],
        recv2=[sum(recv_bytes[n * L:(n + 1) * L]) for n in range(N)],
        own=(sum(in_rows[:r]), sum(out_rows[:r]), in_rows[r]), stamped=stamped)


def _hop_plan(h: Hierarchy, route: Route, counts: tuple, hidden: int, dtype: torch.dtype,
              device: torch.device) -> _HopPlan:
    """``counts[l][n']``: rows from (this node, l) to (n', this local rank)."""
    N, L, n, lr = h.nodes, h.local, h.node, h.local_rank
    hop = [[h.pair_bytes(route, n * L + l, m * L + lr, counts[l][m], hidden, dtype)
            for m in range(N)] for l in range(L)]
    flat = [b for row in hop for b in row]  # stage-1 receive order: block l * N + n'
    unit, index = block_order(flat, [l * N + m for m in range(N) for l in range(L)])
    return _HopPlan(recv1=[sum(row) for row in hop], unit=unit,
                    index=None if index is None else index.to(device),
                    send2=[sum(hop[l][m] for l in range(L)) for m in range(N)])


def hop_counts(h: Hierarchy, in_rows: tuple, uniform: bool, device: torch.device,
               digest: int = 0, numbering: Optional[dict] = None,
               operation: str = "hierarchical stage") -> tuple:
    """``counts[l][n']`` = rows (this node, l) sends to (n', this local rank): derived
    (L == 1, or ``uniform``: every pair has the same rows) or one int64 all_to_all_single
    of N ints per peer in the intra-node group."""
    N, L = h.nodes, h.local
    if L == 1:
        return (tuple(in_rows),)
    if uniform:
        return ((in_rows[0],) * N,) * L
    mine = torch.tensor(in_rows, dtype=torch.int64).view(N, L).t().reshape(-1).to(device)
    theirs = torch.empty_like(mine)
    h.a2a("intra", theirs, mine, [N] * L, [N] * L, operation=operation, detail=digest,
          **(numbering or {}))
    return tuple(map(tuple, theirs.view(L, N).tolist()))


# the stages' operation in the headers, per direction: a rank running a forward where its
# peers run a backward raises, as in the flat algorithm, though the bytes may match
STAGE_OPERATIONS = {"all_to_all": "hierarchical stage",
                    "all_to_all backward": "hierarchical backward stage"}


def _digest(route: Route, local: int, detail: int) -> int:
    """The route's link path, codec and gate threshold per link class, same node or not (the
    same on every rank of a regular layout of ``local`` ranks per node, though each rank's
    per-peer tables differ; the class is named, not read from the path: on CPU both classes'
    path is "cpu", and a rank swapping its intra- and inter-node codecs would go unseen),
    and the caller's ``detail`` (its row shape: _Call.detail). The rows' dtype and hidden
    size travel in the headers themselves (``label``), so that a difference is named."""
    node = route.rank // local
    links = sorted({(p // local == node, path, repr(c), t) for p, (path, c, t) in
                    enumerate(zip(route.paths, route.codecs, route.thresholds)) if p != route.rank})
    return hash63((links, detail))


def exchange(x: torch.Tensor, in_rows: tuple, out_rows: tuple, route: Route, chunks: int = 1,
             *, hierarchy: Hierarchy, uniform: bool = False,
             operation: str = "all_to_all", detail: int = 0) -> Pending:
    """Start the hierarchical all-to-all of ``x`` [T, H]: ``in_rows[p]`` rows go to group
    rank p, ``out_rows[p]`` come from it, as ``exchange.exchange`` (``chunks`` is ignored).
    ``uniform``: every pair of the group has ``in_rows[0]`` rows (no split sizes given:
    the count exchange is skipped). ``operation``: "all_to_all" or "all_to_all backward",
    which the stages' headers tell apart (STAGE_OPERATIONS); ``detail``: a word more in
    their digest (the caller's row shape: _Call.detail). Stage 1 completes before this
    returns; ``wait()`` of the result completes stage 2 (on CPU, framed, it completed too:
    a disagreement raises here, not at ``wait()``) and decodes, giving [sum(out_rows), H]
    of ``x.dtype``."""
    h = hierarchy
    op = STAGE_OPERATIONS[operation]
    x = x.contiguous()
    H, dtype, dev = x.shape[1], x.dtype, x.device
    src = h._cached(("src", in_rows, out_rows, H, dtype, dev, route.codecs, route.thresholds),
                    lambda: _source_plan(h, route, in_rows, out_rows, H, dtype, dev))
    # in the stages' headers on CPU: the stages move bytes, these name what they carry
    label = (dtype, H)
    digest = h._cached(("digest", route.codecs, route.thresholds, detail),
                       lambda: _digest(route, h.local, detail))
    numbering = h.numbering(dev)
    stamped = stamped_call(route, src, H, dtype, dev) if src.stamped else None
    if stamped is not None:
        x = stamped.prepare(x)
    made = set()  # the steps of this call this rank made (CPU): an error of its own owes the rest
    try:
        return _stages(x, in_rows, out_rows, route, h, src, uniform, op, label, digest, numbering,
                       stamped, made)
    except frame.EXCHANGE_ERRORS:
        raise
    except Exception:
        if numbering:
            _answer_own_error(h, made, op, digest, label, numbering)
        raise


def _stages(x, in_rows, out_rows, route, h, src, uniform, op, label, digest, numbering,
            stamped, made: set) -> Pending:
    """``exchange``'s steps, from the count exchange to the start of stage 2, noting in
    ``made`` each exchange made ("counts", "intra", "inter")."""
    H, dtype, dev = x.shape[1], x.dtype, x.device
    counted = False  # the count exchange (where one is made) is this call's first step
    try:
        counts = hop_counts(h, in_rows, uniform, dev, digest, numbering, op)
        counted = True
        if not uniform and h.local > 1:
            made.add("counts")
        hop = h._cached(("hop", counts, H, dtype, dev, route.codecs, route.thresholds),
                        lambda: _hop_plan(h, route, counts, H, dtype, dev))
        packed = (_pack(x, src.send_segs) if stamped is None
                  else stamped.pack(0, x, sum(src.send1)))
        send1 = _gather(packed, src.unit, src.index)
        if h.local == 1:
            recv1 = send1
        else:
            recv1 = torch.empty(sum(hop.recv1), dtype=torch.uint8, device=dev)
            h.a2a("intra", recv1, send1, hop.recv1, src.send1, operation=op, detail=digest,
                  rows=(in_rows, out_rows), label=label, **numbering)
            made.add("intra")
    except (ConfigMismatchError, frame.PeerTimeoutError) as e:
        none, answered = torch.empty(0, dtype=torch.uint8), frame.peers_answered(e)
        if numbering and not answered and not counted and not h.meets("intra", e.elsewhere):
            # a silent peer in the count exchange: stage 1 too, which it reaches if it comes
            h.a2a("intra", none, none, [0] * h.local, [0] * h.local, operation=op,
                  detail=digest, aborted=True, wait=False, label=label, **numbering)
        if numbering and h.nodes > 1 and not h.meets("inter", e.elsewhere):
            # stage 2 as headers only: its peers raise too (what they send is drained: no
            # receive buffer, which this rank's own sizes, perhaps the error, would size)
            h.a2a("inter", none, none, [0] * h.nodes, [0] * h.nodes, operation=op,
                  detail=digest, aborted=True, wait=answered, label=label, **numbering)
        raise
    send2 = _gather(recv1, hop.unit, hop.index)
    if h.nodes == 1:
        recv2, works = send2, []
    else:
        recv2 = torch.empty(sum(src.recv2), dtype=torch.uint8, device=dev)
        # with one rank per node this is the call's first step, on the whole group: its
        # headers carry the call's rows, as stage 1's do (Hierarchy.a2a)
        works = [h.a2a("inter", recv2, send2, src.recv2, hop.send2, async_op=True,
                       operation=op, detail=digest, label=label,
                       rows=(in_rows, out_rows) if h.local == 1 else None, **numbering)]
        made.add("inter")
    out = x.new_empty((sum(out_rows), H))
    a, b, n = src.own
    if n:  # own rows: exact copy, overlapping stage 2
        out[b:b + n].copy_(x[a:a + n])

    def finish() -> torch.Tensor:
        nonlocal send2
        for w in works:
            w.wait()
        if stamped is None:
            _unpack(recv2, src.recv_segs, out)
        else:
            stamped.unpack(0, recv2, out)
        send2 = None  # held until stage 2 is waited for
        return out

    return Pending(works, finish)


def _answer_own_error(h: Hierarchy, made: set, op: str, digest: int, label: tuple,
                      numbering: dict) -> None:
    """A framed call failed on this rank on its own (out of memory, ...) after it drew its
    number: answer the steps its peers wait in, so that every rank raises in this call and
    the next calls pair up (else the peers paired them with this rank's next call). Before
    any step, its first step rejected (the peers take no later step with this rank); after
    one, the rest as headers only, as a rank that found a disagreement sends them
    (``exchange``'s except clause: the peers that meet them raise and send theirs)."""
    if not made:
        frame.reject(h.framing, h.group, h.rank, h.world, op, **numbering)
        return
    none = torch.empty(0, dtype=torch.uint8)
    for stage, n, owed in (("intra", h.local, "intra" not in made),
                           ("inter", h.nodes, "inter" not in made)):
        if owed and n > 1:
            h.a2a(stage, none, none, [0] * n, [0] * n, operation=op, detail=digest,
                  failed=True, label=label, **numbering)


# ---- choosing the algorithm ---------------------------------------------------------------
def _mean_pair_rows(comm, route: Route, in_rows: tuple, uniform: bool, key: tuple) -> int:
    """Rows per (source, destination) pair that ``"auto"`` decides on, equal on every rank:
    ``in_rows[0]`` for even splits; with split sizes, the group's mean at the first call of
    a configuration (one word per rank gathered then, remembered: MoE layers keep their
    sizes; framed over gloo, so a rank in another call raises instead of hanging it)."""
    if uniform:
        return in_rows[0]
    sizes = comm.hierarchy_state.auto_sizes
    if key not in sizes:
        table = gather_table([sum(in_rows)], comm.group, comm.agree_device, comm.framing)
        sizes[key] = int(table.sum()) // (route.world * route.world)
    return sizes[key]


def select(comm, algorithm: str, route: Route, x: torch.Tensor, in_rows: tuple,
           uniform: bool) -> Callable[..., Pending]:
    """The exchange function (``exchange.exchange``'s signature) of ``algorithm`` for a
    call of ``all_to_all`` of ``x`` [..., H] sending token rows ``in_rows``; ``uniform``: no
    split sizes were given; ``algorithm`` "hierarchical" or "auto" (the caller runs "flat"
    itself). ``"auto"`` is decided identically on every rank (by topology and a per-pair
    size all ranks agree on) with ``prefer_hierarchical``."""
    # hierarchical derives the intermediate counts when no rank passes split sizes: all
    # ranks must agree on that. Checked collectively the first time a combination is used
    # (as all_to_all's other fields): a rank that passes split sizes where the others do
    # not, in a combination all have used before, raises over gloo (its count exchange
    # meets the others' first stage, both framed on the whole group) but is not detected
    # over NCCL (and hangs).
    lay = layout(comm)
    check_consistent(dict(algorithm=algorithm, row_shape=tuple(x.shape[1:]), dtype=x.dtype,
                          layout=(lay.nodes, lay.local), split_sizes_given=not uniform),
                     comm.group, comm.agree_device, comm._verified,
                     what=f"moe_flashcomm.all_to_all(algorithm={algorithm!r})",
                     framing=comm.framing)
    if algorithm == "auto":
        if not lay.regular or lay.nodes < 2 or lay.local < 2:
            return flat_exchange
        # the stage groups first, whatever this rank decides: dist.new_group is collective
        # over the job, and a rank whose rows differ (a caller's error the exchange's headers
        # report) may decide otherwise; the ranks making groups would wait in new_group
        # for it until the timeout instead of meeting it in the first framed step
        hierarchy(comm)
        H, dtype = x.shape[-1], x.dtype
        key = (route.codecs, route.thresholds, H, dtype)
        rows = _mean_pair_rows(comm, route, in_rows, uniform, key)
        L, r = lay.local, route.rank
        mate = (r // L) * L + (r + 1) % L
        other = (r + L) % route.world
        per_pair = [rows * row_bytes(route.wire(p, rows, H, dtype), H, dtype)
                    for p in (mate, other)]
        if not prefer_hierarchical(lay.nodes, lay.local, *per_pair, count_exchange=not uniform):
            return flat_exchange
    return functools.partial(exchange, hierarchy=hierarchy(comm))  # (the caller passes uniform)
