"""Two-step quantized all-reduce (Flash Communication), in place like
``torch.distributed.all_reduce``: a quantized reduce-scatter (every rank owns rows of ROW
values, sums the peers' decoded chunks with its own in fp32 in rank order, re-encodes), then a
quantized all-gather of the owners' records, decoded on every rank, so every rank ends with the
bit-identical tensor. The hierarchical form reduces inside groups of ranks first and across
groups second. ``reference_all_reduce`` is the executable specification of both; the layout,
the error bound, pipelining and process groups are described in docs/design.md, "All-reduce".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from .. import env, kernels
from ..codec import CodecConfig, record_bytes, record_layout
from ..codec import cuda as _cuda
from ..codec import reference as _reference
from ..codec.reference import check_tokens
from ..memo import keep, remember
from . import direct, frame, p2p
from .check import ConfigMismatchError, check_consistent
from .exchange import STAMPED_CALLS_KEPT, StampedCall, _Seg, error_page
from .exchange import decode as _decode
from .exchange import encode as _encode
from .gate import SizeGate
from .plan import check_chunks, chunk_range
from .topology import LinkCodecs, Topology, link_path

ROW = 1024  # values per record: a multiple of every group size (32..256)
OPS = ("sum",)
ALGORITHMS = ("flat", "hierarchical")
# Automatic pipelining (CUDA, flat): one range per CHUNK_BYTES of bf16 tensor, at most MAX_CHUNKS.
CHUNK_BYTES = 32 << 20
MAX_CHUNKS = 4

CodecLike = Union[LinkCodecs, CodecConfig, dict, int, str, None]


# ---- layout --------------------------------------------------------------------------------
def rows_per_rank(numel: int, world: int) -> int:
    """c: rows of ROW values each rank owns (the tensor is padded to world * c rows)."""
    rows = -(-numel // ROW)  # ceil
    return max(1, -(-rows // world))


def _padded(flat: torch.Tensor, world: int) -> torch.Tensor:
    """``flat`` itself when it fills world * c rows exactly, else a zero-padded copy."""
    total = world * rows_per_rank(flat.numel(), world) * ROW
    if total == flat.numel():
        return flat
    buf = flat.new_zeros(total)
    buf[:flat.numel()].copy_(flat)
    return buf


# ---- the reduction (torch; the fused CUDA kernel reproduces it bit for bit) -------------------
def check_codecs(codecs: LinkCodecs, intra_name: str, inter_name: str) -> None:
    """The all-reduce's rules for its codecs (``_make_plan`` and FlashCommConfig's
    ``all_reduce`` check them; the errors name the codecs as ``intra_name`` and
    ``inter_name``): integer codecs round to nearest, and "native" is on both links or on
    neither."""
    for cfg, name in ((codecs.intra_node, intra_name), (codecs.inter_node, inter_name)):
        if cfg.is_int and cfg.rounding != "nearest":
            raise ValueError(f"{name}: an all-reduce's integer codecs need rounding='nearest', "
                             f"got {cfg.rounding!r} (in {cfg})")
    if codecs.intra_node.is_native != codecs.inter_node.is_native:
        raise ValueError(f"{intra_name}: a 'native' all-reduce is torch.distributed.all_reduce "
                         f"itself; it cannot be mixed with another codec per link ({codecs}): "
                         "use 'native' for both intra_node and inter_node, or for neither")


@dataclass(frozen=True)
class StampCheck:
    """What the fused reduction checks and marks (csrc/allreduce.cu's ReduceArgs): ``page``,
    the address of the error page (p2p.ErrorPage) a differing stamp goes to; ``numel``, the
    call's, which the all-reduce's stamps carry in their hidden field (mod p2p.HIDDEN_MOD; its
    rows are always ROW long) and their slot's second word (whole), so that numels that pad
    to the same rows still differ; peer p of the
    reduction is rank ``peer_base + p * peer_step`` of the page's group; ``slot_stamp``
    (requant): the stamp written in the STAMP_BYTES before the output records (0: none), or
    in its place kernels.SAW_DISAGREEMENT where this call saw ranks disagree."""
    page: int
    numel: int
    peer_base: int = 0
    peer_step: int = 1
    slot_stamp: int = 0


def reduce_chunk(peers: torch.Tensor, own: torch.Tensor, rank: int, cfg: CodecConfig,
                 requant: bool = True, fused: Optional[bool] = None,
                 check: Optional[StampCheck] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reduction of one owned chunk.

    peers: uint8 [P - 1, m, rb] records of the other P - 1 ranks of the group, in rank
           order with ``rank`` left out (rb = record_bytes(ROW, cfg)); with ``check``, a
           view whose peers lie ``peers.stride(0)`` bytes apart, each behind its stamp.
    own:   [m, ROW] this rank's own values (fp32/bf16/fp16), exact.
    Sum in fp32, in rank order 0..P-1, of ``own`` and each peer's decoded records (decoded
    to own.dtype, as ``codec.decode`` does); the sum cast to own.dtype. Returns the records
    of that sum, uint8 [m, rb] (``requant``) or the sum itself, [m, ROW] of own.dtype.
    ``fused``: None (default) uses the fused CUDA kernel for CUDA tensors where it exists;
    False always runs this torch definition (codec kernels + torch adds on CUDA).
    check: the fused kernel also compares each peer's stamp with the one expected, reporting
           a difference on the error page, and marks its output (StampCheck).
    out:   the output (contiguous; with a slot stamp, STAMP_BYTES after its slot), else
           allocated.
    """
    if (fused is not False and own.is_cuda and own.numel()
            and (not cfg.is_passthrough or own.shape[1] % 8 == 0)):
        return _fused_reduce(peers, own, rank, cfg, requant, check, out)
    if check is not None:
        raise ValueError("check: stamps are compared by the fused CUDA kernel only")
    m, hidden, dtype = own.shape[0], own.shape[1], own.dtype
    acc = None
    for p in range(peers.shape[0] + 1):
        if p == rank:
            term = own.float()
        else:
            term = _decode(peers[p - (p > rank)], cfg, hidden, dtype).float()
        acc = term.clone() if acc is None else acc.add_(term)
    if acc is None:  # pragma: no cover - P >= 1 always
        acc = own.new_zeros((m, hidden), dtype=torch.float32)
    total = acc.to(dtype)  # NaNs canonical, as the fused kernel stores them
    result = _encode(total, cfg) if requant else _reference.canonical_nan(total)
    return result if out is None else out.copy_(result)


# ---- fused CUDA kernel (csrc/allreduce.cu) ---------------------------------------------------
REDUCE_V = 16  # values per thread (at most the group size)


def kernel_name(cfg: CodecConfig, dtype: torch.dtype, requant: bool = True) -> str:
    """The NVRTC name expression of the fused reduction for ``cfg`` (int, fp8 or the
    passthrough) and ``dtype``."""
    if cfg.is_passthrough:
        return f"mfc::reduce_cast<{_cuda.CTYPE[dtype]}, {str(requant).lower()}>"
    bits = 0 if cfg.is_fp8 else cfg.bits
    return (f"mfc::reduce_chunk<{_cuda.CTYPE[dtype]}, {bits}, {str(cfg.spikes).lower()}, "
            f"{min(REDUCE_V, cfg.group_size)}, {str(requant).lower()}>")


def precompile(configs, dtypes=_reference.INPUT_DTYPES,
               device: Optional[int] = None, workers: Optional[int] = None) -> int:
    """Compile the fused reductions of ``configs`` x ``dtypes`` and the codec kernels the
    all-reduce uses into the disk cache (NVRTC in parallel threads). Returns how many."""
    cfgs = [c for c in (CodecConfig.coerce(c) for c in configs)
            if c.is_quantized or c.is_passthrough]
    n = _cuda.precompile(cfgs, dtypes, device=device, workers=workers)
    names = [("allreduce.cu", kernel_name(c, d, r)) for c in cfgs for d in dtypes
             for r in (True, False)]
    return n + kernels.precompile_names(names, device, workers)


def reduce_launches(dev: int, m: int, H: int, cfg: CodecConfig, dtype: torch.dtype,
                    requant: bool, world: int, rank: int, vec: bool, stride: int,
                    check: Optional[StampCheck] = None) -> tuple:
    """The launches of the fused reduction of m rows (pointer bases: peers' records, own
    values, output records or sums; ``stride``: bytes from one peer's records to the next),
    made once per shape."""
    key = ("reduce", dev, m, H, cfg, dtype, requant, world, rank, vec, stride, check)
    return kernels.KERNELS.plan(key, lambda: _make_reduce(dev, m, H, cfg, dtype, requant, world,
                                                          rank, vec, stride, check))


def _make_reduce(dev, m, H, cfg, dtype, requant, world, rank, vec, stride, check) -> tuple:
    L = record_layout(H, cfg)
    if cfg.is_passthrough:
        geometry = _cuda.cast_geometry(m, H)
    else:
        geometry = _cuda._geometry(m, L, min(REDUCE_V, cfg.group_size))
    esize, rb = dtype.itemsize, L.record_bytes
    fields = {"rec_bytes": rb} if cfg.is_passthrough else _cuda._layout_fields(L)
    gaps = {} if cfg.is_passthrough else {"gap": _cuda._gaps(L)}
    fn = kernels.KERNELS.function(dev, "allreduce.cu", kernel_name(cfg, dtype, requant))
    launches = []
    for t0, items, log2L, ipt, mul, shift in geometry:
        geo = dict(H=H, log2L=log2L, ipt=ipt, div_mul=mul, div_shift=shift, total=items,
                   vec=int(vec))
        args = kernels.struct(kernels.REDUCE_ARGS, world=world, rank=rank)
        if check is not None and t0 == 0:  # (the first launch's first warp checks)
            args["stamp"], args["error_page"] = p2p.stamp(cfg, m, check.numel, dtype), check.page
            args["peer_base"], args["peer_step"] = check.peer_base, check.peer_step
            args["write_slot"] = int(requant and check.slot_stamp != 0)
            args["slot_stamp"], args["numel"] = check.slot_stamp, check.numel
        args["enc"] = kernels.struct(kernels.ENC_ARGS, padded=L.padded_hidden, **gaps, **geo,
                                     **fields)[0]
        args["dec"] = kernels.struct(kernels.DEC_ARGS, **geo, **fields)[0]
        out_off = t0 * rb if requant else t0 * H * esize
        launches.append(kernels.prepare_launch(dev, fn, kernels.blocks(items), (
            t0 * rb, kernels.Value(stride), t0 * H * esize,
            out_off if requant else 0, 0 if requant else out_off, args)))
    return tuple(launches)


def _fused_reduce(peers: torch.Tensor, own: torch.Tensor, rank: int, cfg: CodecConfig,
                  requant: bool, check: Optional[StampCheck],
                  out: Optional[torch.Tensor]) -> torch.Tensor:
    """reduce_chunk in one kernel (csrc/allreduce.cu), on torch's current stream."""
    m, H = own.shape
    L = record_layout(H, cfg)
    own = own.contiguous()
    if cfg.is_passthrough and own.data_ptr() % 16:
        own = own.clone()  # (reduce_cast loads 8 values at a time)
    if check is None:
        peers = peers.contiguous()
        if peers.numel() and peers.data_ptr() % 16:
            peers = peers.clone()  # 16-byte record loads
    if out is None and requant:
        out = torch.empty((m, L.record_bytes), dtype=torch.uint8, device=own.device)
    elif out is None:
        out = torch.empty((m, H), dtype=own.dtype, device=own.device)
    if m == 0:
        return out
    dev = kernels.device_index(own)
    launches = reduce_launches(dev, m, H, cfg, own.dtype, requant, peers.shape[0] + 1, rank,
                               H % 8 == 0 and own.data_ptr() % 16 == 0, peers.stride(0),
                               check if peers.numel() or (check and check.slot_stamp) else None)
    pp = peers.data_ptr() if peers.numel() else 0
    op = out.data_ptr()
    with kernels.on_device(dev):
        stream = kernels.raw_stream(dev)
        for launch in launches:
            launch(stream, pp, own.data_ptr(), op if requant else 0, 0 if requant else op)
    return out


# ---- plans -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """How one configuration and size runs on this rank."""

    backend_sum: bool              # gated, "native" or one rank: the backend's sum (NCCL's
                                   # all_reduce; over gloo, framed)
    world: int
    rank: int
    rows: int                      # c
    pieces: tuple                  # row ranges (a, b) of the chunk, pipelined (flat)
    intra: CodecConfig             # flat: the codec; hierarchical: stage 1's
    inter: CodecConfig             # hierarchical: stage 2's and the final records'
    hierarchical: bool = False     # the hierarchical algorithm (on the communicator's stages)
    call: bool = True              # backend_sum: a collective to issue (not one rank, or no
                                   # values on CUDA)
    numel: int = 0                 # the tensor's values (in the headers of framed exchanges)
    stamped: bool = False          # CUDA: the reduce-scatters' records carry stamps
    pair_gather: bool = False      # two ranks, flat: step 1 as an all-gather (the variable
                                   # read once, as the ranks agreed on it: not at every call)
    # (name, device index) -> the StampedCall of a reduce-scatter's encodes (one chunk a
    # piece), or of the hierarchical algorithm's last decode ("final")
    stamped_calls: dict = field(default_factory=dict, compare=False, repr=False)


def _make_plan(comm, x: torch.Tensor, codecs: LinkCodecs, algorithm: str,
               chunks: Optional[int]) -> _Plan:
    rank, world, gate = comm.rank, comm.world, comm.gate
    check_codecs(codecs, "codec.intra_node" if algorithm == "hierarchical" else "codec",
                 "codec.inter_node")
    intra, inter = codecs.intra_node, codecs.inter_node
    if algorithm == "flat" and intra != inter:
        raise ValueError(f"codec: per-link codecs ({codecs}) need algorithm='hierarchical'; "
                         "the flat all-reduce sends every chunk with one codec")
    path = link_path(len(set(comm.nodes)) == 1, x.device.type)
    pair = world == 2 and env.all_reduce_pair_gather()  # (flat only: decided below)
    comm.check_made()
    check_consistent(dict(dtype=x.dtype, codec=codecs, algorithm=algorithm, chunks=chunks,
                          path=path, pair_gather=pair),
                     comm.group, comm.agree_device, comm._verified, what="moe_flashcomm.all_reduce",
                     framing=comm.framing)
    cfg = inter if path == "network" else intra
    n = x.numel()
    if algorithm == "hierarchical" and world > 1:
        # creates the stage groups (dist.new_group: collective over the job) and checks the
        # layout before any decision by size: a rank whose numel differs (an empty tensor,
        # gated) must still make the same new_group calls, else the others wait in them
        # until the timeout instead of meeting it in the first framed step and raising
        _hierarchy(comm)
        if len(set(comm.nodes)) == 1:
            # one node: no byte crosses one, so the inter-node codec has no link to apply to,
            # and the hierarchy's one group is the flat algorithm: run it, with intra_node
            algorithm, inter = "flat", intra
    pair = pair and algorithm == "flat"
    if world == 1 or n == 0 or n * 2 < gate.all_reduce_threshold(path, cfg):
        # over gloo an empty tensor is exchanged too (headers only): a peer's numel is checked
        return _Plan(True, world, rank, 0, (), intra, inter,
                     call=world > 1 and (n > 0 or not x.is_cuda), numel=n)
    c = rows_per_rank(n, world)
    if algorithm == "hierarchical":
        k = 1  # (the stages were made above)
    elif chunks is None:
        # a pair exchanges by all-gathers: one piece measured fastest (2x H200, 64 and
        # 256 MiB, host and network paths: docs/notes.md, "All-reduce of two ranks: step 1
        # as an all-gather")
        k = min(MAX_CHUNKS, max(1, n * 2 // CHUNK_BYTES)) if x.is_cuda and not pair else 1
    else:
        k = chunks
    k = max(1, min(k, c))
    pieces = tuple(chunk_range(c, i, k) for i in range(k))
    # stamps: every pair exchanges records in the flat reduce-scatter, so every rank sees a
    # rank that disagrees; the hierarchical algorithm passes what its stages saw on to every
    # rank (_hierarchical)
    stamped = x.is_cuda and comm.stamps and world > 1
    return _Plan(False, world, rank, c, pieces, intra, inter, algorithm == "hierarchical",
                 numel=n, stamped=stamped, pair_gather=pair)


def _is_sum(op: object) -> bool:
    """``"sum"`` or torch.distributed.ReduceOp.SUM (not 0 or False, which compare equal to it)."""
    if isinstance(op, str):
        return op == "sum"
    return isinstance(op, dist.ReduceOp) and op == dist.ReduceOp.SUM


# ---- the public function -----------------------------------------------------------------------
def all_reduce(
    x: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    codec: CodecLike = None,
    op: object = "sum",
    *,
    algorithm: str = "flat",
    topology: Union[Topology, int, None] = None,
    gate: Union[SizeGate, bool, dict, str, None] = True,
    chunks: Optional[int] = None,
) -> torch.Tensor:
    """Quantized sum of ``x`` over ``group``, in place, like ``torch.distributed.all_reduce``.

    x:         any shape, float32, bfloat16 or float16; CUDA (NCCL) or CPU (gloo). Same
               numel and dtype on every rank. Overwritten with the result; returned.
    group:     process group (None: the default group).
    codec:     CodecConfig / dict / bits value (None: CodecConfig(), int4 g128 spikes;
               rounding must be "nearest"; "native": torch.distributed.all_reduce
               itself; over gloo, its framed equivalent: _native_framed). For
               ``algorithm="hierarchical"`` also a LinkCodecs: ``intra_node`` inside a
               group of ranks, ``inter_node`` across (a group on one node: the flat
               algorithm with ``intra_node``).
    op:        "sum" or ``torch.distributed.ReduceOp.SUM`` (the only reduction).
    algorithm: "flat" or "hierarchical" (reduce-scatter inside groups of ranks, all-reduce
               across groups, all-gather inside groups: see docs/design.md).
    topology:  Topology or ranks per group (node, PCIe switch, NUMA half); None: the
               launcher's LOCAL_WORLD_SIZE. Used by the hierarchical groups and the gate.
    gate:      size gate (SizeGate.coerce): below its all-reduce threshold (bf16 bytes of
               the tensor) the call is as with "native". False: never.
    chunks:    pipeline ranges (flat; CUDA): None: by size; any value gives the same bits.

    Every rank ends with the bit-identical tensor. Every rank must pass the same codec,
    dtype, algorithm, topology, gate and chunks: checked collectively the first time a
    combination is used. Over gloo every call's headers also carry the numel, so a rank
    whose numel differs raises on every rank. On CUDA the records (of a quantized codec or
    the ``"bf16"`` passthrough) carry stamps (codec, dtype, rows, numel) that the
    reductions check: a rank that switches to a codec, dtype or numel every rank has used
    before makes every rank raise at its next call (``MOE_FLASHCOMM_STAMPS=0``: off). With
    NCCL, where the numels give different byte counts, and on the gated and ``"native"``
    paths (torch.distributed.all_reduce itself), equal numel and dtype are the caller's
    duty, as with torch.
    The environment (LOCAL_WORLD_SIZE, NCCL_P2P_DISABLE, $MOE_FLASHCOMM_GATE_FILE) is read
    when a combination is first used. No autograd (like torch.distributed.all_reduce).
    """
    if direct.compiling():  # (torch.compile: run outside the graph)
        return direct.untraced(all_reduce, x, group, codec, op, algorithm=algorithm,
                               topology=topology, gate=gate, chunks=chunks)
    from .communicator import communicator
    return communicator(group, topology, gate).all_reduce(x, codec, op, algorithm=algorithm,
                                                          chunks=chunks)


def _plan(comm, x, codec, op, algorithm, chunks) -> _Plan:
    """Validate the arguments and return the plan of this call (the first use of a
    configuration checks it across ranks, collectively)."""
    check_tokens(x)  # a tensor with data, of a token dtype
    if not _is_sum(op):
        raise ValueError(f"op must be one of {OPS} (or torch.distributed.ReduceOp.SUM), "
                         f"got {op!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    check_chunks(chunks)
    return _make_plan(comm, x, LinkCodecs.coerce(codec, "codec"), algorithm, chunks)


def run_all_reduce(comm, x: torch.Tensor, codec, op, algorithm: str, chunks) -> torch.Tensor:
    """``all_reduce`` on a Communicator (its plans are kept per arguments and size)."""
    plans = comm.all_reduce_plans
    try:  # the hot path: these exact arguments were seen before
        # (with the types: 4.0 equals 4, and 0 ReduceOp.SUM, but they are refused, and must
        # not find the plans of what they equal)
        key = (codec, type(codec), op, type(op), algorithm, chunks, type(chunks), x.dtype,
               x.device.type, x.layout, x.numel())
        plan = plans.get(key)
    except Exception:  # an unhashable argument (a dict), x no tensor: _plan says what is wrong
        key, plan = None, None
    if plan is None or not comm.group_is_live():  # (destroyed: _check_open says so)
        try:
            comm._check_open()
            plan = _plan(comm, x, codec, op, algorithm, chunks)
        except frame.EXCHANGE_ERRORS:
            raise
        except Exception:  # (whatever it is: peers that miss it pair with our next call)
            comm._reject(x, "all_reduce reduce-scatter")
            raise
        if key is not None:
            keep(plans, key, plan, 1024)
    if x.requires_grad and torch.is_grad_enabled():
        # in place outside autograd, as torch.distributed.all_reduce (a leaf that requires
        # grad refuses in-place writes under autograd)
        with torch.no_grad():
            return comm.answering(x, "all_reduce reduce-scatter", _run, comm, x, plan)
    return comm.answering(x, "all_reduce reduce-scatter", _run, comm, x, plan)


def _run(comm, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``x`` summed in place by ``plan`` over the communicator's group."""
    if plan.backend_sum and not plan.call:  # one rank, or no values
        return x
    work = x if x.is_contiguous() else x.contiguous()  # (what backends and kernels take)
    _sum(comm, work.view(-1), plan)
    if work is not x:
        x.copy_(work)
    return x


def _sum(comm, flat: torch.Tensor, plan: _Plan) -> None:
    """The contiguous 1-D ``flat`` summed in place by ``plan``."""
    if plan.backend_sum:  # gated or "native": the backend's sum (over gloo, framed)
        if flat.is_cuda:
            direct.all_reduce(comm.group, flat)
        else:
            _native_framed(flat, plan, comm.group, comm.framing)
        return
    buf = _padded(flat, plan.world)
    if plan.hierarchical:  # (per call: create_stage_groups may replace the stages)
        h = _hierarchy(comm)
        if plan.stamped:
            buf = _final_call(comm, plan, h, buf).prepare(buf)
        _hierarchical(buf, plan, h, comm)
    elif flat.is_cuda:
        stamped = _stamped_call(comm, plan, buf, "flat", plan.world, plan.rank, plan.rows,
                                plan.pieces, plan.intra) if plan.stamped else None
        if stamped is not None:
            buf = stamped.prepare(buf)
        _flat(buf, plan, comm.group, stamped)
    else:
        _flat_framed(buf, plan, comm.group, comm.framing)
    if buf is not flat:
        flat.copy_(buf[:flat.numel()])


# ---- flat ----------------------------------------------------------------------------------------
def _gather_single(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _stamped_call(comm, plan: _Plan, buf: torch.Tensor, name: str, n: int, r: int, span: int,
                  pieces: tuple, cfg: CodecConfig) -> StampedCall:
    """The encodes of one of ``plan``'s reduce-scatters on ``buf``'s device (its ``name``:
    "flat", or a hierarchy stage), made at its first call there: per piece, every peer's rows
    in one launch, each pair's records behind its stamp (exchange.StampedCall; the fused
    reduction checks them). Its ``n`` ranks' rows lie in ``span`` rows each (rank ``r``
    keeps its own); piece (a, b) is rows [a, b) of each, coded with ``cfg``."""
    index = kernels.device_index(buf)

    def make() -> StampedCall:
        rb = record_bytes(ROW, cfg)
        sides = []
        for a, b in pieces:  # peer p's rows of the piece: rows p * span + [a, b)
            slot = kernels.STAMP_BYTES + (b - a) * rb
            segs = [_Seg(p * span + a, b - a, cfg, i * slot + kernels.STAMP_BYTES, (b - a) * rb,
                         p) for i, p in enumerate(q for q in range(n) if q != r)]
            sides.append((segs, []))
        return StampedCall(comm, sides, ROW, buf.dtype, index, error_page(comm._pages, index),
                           numel=plan.numel)
    return remember(plan.stamped_calls, (name, index), make, STAMPED_CALLS_KEPT)


def _final_call(comm, plan: _Plan, h, buf: torch.Tensor) -> StampedCall:
    """The hierarchical all-reduce's last decode on ``buf``'s device: the L x M blocks of
    final records (local chunk l, node n: rows (l * M + n) * c of ``buf``), each behind the
    slot its owner's second-stage reduction wrote, compared with the stamp expected: a rank
    that saw ranks disagree has marked its slot, so every rank learns of it."""
    index = kernels.device_index(buf)

    def make() -> StampedCall:
        L, M, c, cfg = h.local, h.nodes, plan.rows, plan.inter
        slot = kernels.STAMP_BYTES + c * record_bytes(ROW, cfg)
        segs = [_Seg((l * M + n) * c, c, cfg, (l * M + n) * slot + kernels.STAMP_BYTES,
                     slot - kernels.STAMP_BYTES, n * L + l) for l in range(L) for n in range(M)]
        return StampedCall(comm, [([], segs)], ROW, buf.dtype, index,
                           error_page(comm._pages, index), kind=kernels.P2P_ERROR_REDUCE_STAMP,
                           numel=plan.numel)
    return remember(plan.stamped_calls, ("final", index), make, STAMPED_CALLS_KEPT)


def _scatter_records(rows3: torch.Tensor, a: int, b: int, world: int, rank: int,
                     cfg: CodecConfig, stamped: Optional[tuple] = None) -> torch.Tensor:
    """The reduce-scatter's send buffer, uint8 [world - 1, slot]: rows [a, b) of every other
    rank's chunk of ``rows3`` [world, c, ROW] encoded, in rank order. ``stamped``:
    (StampedCall, its chunk): one launch, each peer's records behind a stamp (slot: stamp and
    records); else one encode per peer (slot: the records)."""
    m, rb = b - a, record_bytes(ROW, cfg)
    if stamped is not None:
        call, k = stamped
        slot = kernels.STAMP_BYTES + m * rb
        return call.pack(k, rows3.view(-1, ROW), (world - 1) * slot).view(world - 1, slot)
    send = torch.empty((world - 1, m * rb), dtype=torch.uint8, device=rows3.device)
    for p in range(world):
        if p != rank:
            _encode_into(rows3[p, a:b], cfg, send[p - (p > rank)].view(m, rb))
    return send


def _start_reduce_scatter(rows3: torch.Tensor, a: int, b: int, world: int, rank: int, group,
                          cfg: CodecConfig, a2a=None, stamped: Optional[tuple] = None,
                          pair_gather: bool = False):
    """Encode rows [a, b) of every other rank's chunk of ``rows3`` [world, c, ROW] and start
    their exchange (``a2a``: a hierarchy stage's all_to_all_single, else ``group``'s).
    ``stamped``: see _scatter_records; ``pair_gather``: _Plan's. Returns (the records
    received, uint8 [world - 1, b - a, rb], each peer's ``stride(0)`` bytes after the last's;
    work; send buffer)."""
    m, rb = b - a, record_bytes(ROW, cfg)
    stamp = kernels.STAMP_BYTES if stamped is not None else 0
    send = _scatter_records(rows3, a, b, world, rank, cfg, stamped)
    if a2a is None and pair_gather:
        # two ranks: the exchange is an all-gather of the one encoded chunk, the same bytes
        # over the wire; NCCL's ring collectives move them faster than its send/recv pairs
        # over sockets (docs/notes.md, "All-reduce of two ranks: step 1 as an all-gather")
        both = torch.empty((2, send.shape[1]), dtype=torch.uint8, device=rows3.device)
        work = _gather_single(both.view(-1), send.view(-1), group, async_op=True)
        return both[1 - rank:2 - rank, stamp:].view(1, m, rb), work, send
    recv = torch.empty_like(send)
    splits = [0 if p == rank else send.shape[1] for p in range(world)]
    if a2a is not None:
        work = a2a(recv.view(-1), send.view(-1), splits, splits, async_op=True)
    else:
        work = dist.all_to_all_single(recv.view(-1), send.view(-1), splits, splits, group=group,
                                      async_op=True)
    return recv[:, stamp:].view(world - 1, m, rb), work, send


def _direct(t: torch.Tensor) -> bool:
    """The CUDA kernels may write ``t`` in place (contiguous, 16-byte aligned)."""
    return t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0


def _encode_into(rows: torch.Tensor, cfg: CodecConfig, out: torch.Tensor) -> None:
    """Encode ``rows`` [m, ROW] into ``out`` uint8 [m, rb] (exchange.encode's kernels)."""
    if _direct(out):
        _encode(rows, cfg, out=out)
    else:
        out.copy_(_encode(rows, cfg))


def _decode_into(rec: torch.Tensor, cfg: CodecConfig, out: torch.Tensor) -> None:
    """Decode records uint8 [m, rb] into ``out`` [m, ROW] (its dtype)."""
    if _direct(out):
        _decode(rec, cfg, ROW, out.dtype, out=out)
    else:
        out.copy_(_decode(rec, cfg, ROW, out.dtype))


def _flat(buf: torch.Tensor, plan: _Plan, group, stamped: Optional[StampedCall] = None) -> None:
    """The flat all-reduce of ``buf`` (flat, world * c * ROW values) in place; ``stamped``:
    the reduce-scatter's encodes, its records behind stamps the reduction checks."""
    W, r, c, cfg = plan.world, plan.rank, plan.rows, plan.intra
    rows3 = buf.view(W, c, ROW)
    rb = record_bytes(ROW, cfg)
    K = len(plan.pieces)
    check = StampCheck(stamped.page.address, plan.numel) if stamped else None
    started: list = [None] * K    # (recv, work, send) of the reduce-scatter
    gathering: list = [None] * K  # (gathered, work, rec) of the all-gather
    for k in range(K + 2):
        if k < K:
            a, b = plan.pieces[k]
            started[k] = _start_reduce_scatter(rows3, a, b, W, r, group, cfg,
                                               stamped=None if stamped is None else (stamped, k),
                                               pair_gather=plan.pair_gather)
        j = k - 1
        if 0 <= j < K:
            a, b = plan.pieces[j]
            recv, work, _ = started[j]
            work.wait()
            rec = reduce_chunk(recv, rows3[r, a:b], r, cfg, check=check)
            gathered = torch.empty((W, b - a, rb), dtype=torch.uint8, device=buf.device)
            gathering[j] = (gathered, _gather_single(gathered.view(-1), rec.view(-1), group,
                                                     async_op=True), rec)
            started[j] = None
        j = k - 2
        if 0 <= j < K:
            a, b = plan.pieces[j]
            gathered, work, _ = gathering[j]
            work.wait()
            if K == 1:
                _decode_into(gathered.view(W * c, rb), cfg, buf.view(W * c, ROW))
            else:
                for p in range(W):
                    _decode_into(gathered[p], cfg, rows3[p, a:b])
            gathering[j] = None


def _flat_framed(buf: torch.Tensor, plan: _Plan, group, framing: frame.Framing) -> None:
    """``_flat`` over gloo: both exchanges framed, their headers naming the numel."""
    W, r, c, cfg = plan.world, plan.rank, plan.rows, plan.intra
    rows3 = buf.view(W, c, ROW)
    rb, code = record_bytes(ROW, cfg), frame.wire_code(cfg)

    def piece_legs(a: int, b: int) -> list:
        return [None if p == r else frame.Leg(b - a, (b - a) * rb, code) for p in range(W)]

    numbering = framing.numbering(group)  # one for the call
    with _OwedStep(framing, group, plan, numbering) as owed:
        for j, (a, b) in enumerate(plan.pieces):
            m, legs = b - a, piece_legs(a, b)
            scatter = frame.Frame(framing, group, r, W, "all_reduce reduce-scatter", buf.dtype, ROW,
                                  legs, legs, detail=plan.numel, **numbering)
            for p in scatter.peers:
                _encode_into(rows3[p, a:b], cfg, scatter.payload(p).view(m, rb))
            scatter.start()
            owed.step = None
            try:
                got = scatter.wait()
            except (ConfigMismatchError, frame.PeerTimeoutError) as e:
                if not e.elsewhere:  # (a rank in another call would never answer)
                    # the all-gather as headers only: ranks that agree with this one raise too
                    answered = frame.peers_answered(e)
                    gather = frame.Frame(framing, group, r, W, "all_reduce all-gather", buf.dtype,
                                         ROW, legs, legs, detail=plan.numel, aborted=True,
                                         gave_up=not answered, **numbering).start()
                    if answered:
                        gather.wait()
                        gather.release()
                raise
            owed.step = "all_reduce all-gather"
            rec = reduce_chunk(torch.stack([got[p].view(m, rb) for p in scatter.peers]),
                               rows3[r, a:b], r, cfg)
            scatter.release()
            gather = frame.Frame(framing, group, r, W, "all_reduce all-gather", buf.dtype, ROW,
                                 legs, legs, detail=plan.numel, **numbering)
            for p in gather.peers:
                gather.payload(p).copy_(rec.view(-1))
            gather.start()
            owed.step = None
            try:
                got = gather.wait()
            except frame.PeerTimeoutError as e:
                if j + 1 < len(plan.pieces) and not e.elsewhere:
                    # a rank slow between this piece's steps completes this all-gather with our
                    # frame and goes on to the next piece: it meets its steps as "gave up" frames
                    # and raises in this call (else they paired with our next call)
                    after = piece_legs(*plan.pieces[j + 1])
                    for operation in ("all_reduce reduce-scatter", "all_reduce all-gather"):
                        frame.Frame(framing, group, r, W, operation, buf.dtype, ROW, after, after,
                                    detail=plan.numel, gave_up=True, **numbering).start()
                raise
            if j + 1 < len(plan.pieces):
                owed.step = "all_reduce reduce-scatter"
            for p in range(W):
                _decode_into(rec if p == r else got[p].view(m, rb), cfg, rows3[p, a:b])
            gather.release()


class _OwedStep:
    """The step of a framed all-reduce that this rank's peers wait in next (``step``; None:
    none). Its block left with an error of this rank's own (x cannot be written, ...), not
    an exchange's, answers that step with a rejected frame of the call's ``numbering``, so
    the peers raise in this call and no rank pairs a later step with another call's (ranks
    summed one rank's call k + 1 with the others' call k)."""

    def __init__(self, framing: frame.Framing, group, plan: _Plan, numbering: dict) -> None:
        self.step: Optional[str] = "all_reduce reduce-scatter"
        self._framing, self._group, self._plan, self._numbering = framing, group, plan, numbering

    def __enter__(self) -> "_OwedStep":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if (self.step is not None and isinstance(error, Exception)
                and not isinstance(error, frame.EXCHANGE_ERRORS)):
            frame.reject(self._framing, self._group, self._plan.rank, self._plan.world,
                         self.step, number=self._numbering["number"],
                         counter=self._numbering["counter"])


def _native_framed(flat: torch.Tensor, plan: _Plan, group, framing: frame.Framing) -> None:
    """The backend's sum (gated, or "native") of ``flat`` (contiguous, 1-D, in place) over
    gloo, framed: a rank whose numel differs makes every rank raise where gloo itself would
    abort the process. A reduce-scatter of the values in their own dtype, each range summed
    in rank order straight from the received frame, then an all-gather; up to one frame of
    values, the reduce-scatter alone, sending every peer all of them (one round: where gloo's
    latency rules, twice as fast), the sum written in place. The first step carries the
    numel, so the choice is made only once every rank knows they agree; a disagreement ends
    the call as it ends the quantized path (``_flat_framed``: an aborted all-gather), so
    ranks that took different paths stay in step. On two ranks the result is
    torch.distributed.all_reduce's to the bit (a + b = b + a); on more, the same sum, whose
    rounding may differ from gloo's order."""
    W, r = plan.world, plan.rank
    n, unit = flat.numel(), flat.element_size()
    one_round = n * unit <= frame.FRAME_BYTES - frame.HEADER_BYTES
    # the values each rank sums: all of them, or its range
    starts = [0] * W if one_round else [n * p // W for p in range(W)]
    sizes = [n] * W if one_round else [n * (p + 1) // W - n * p // W for p in range(W)]
    mine = sizes[r]
    numbering = dict(framing.numbering(group), detail=n)

    def piece(p: int) -> torch.Tensor:  # the values of rank p's range
        return flat[starts[p]:starts[p] + sizes[p]]

    def framed(operation: str, send: list, receive: list) -> frame.Frame:
        return frame.Frame(framing, group, r, W, operation, flat.dtype, 0,
                           frame.item_legs(send, unit, r), frame.item_legs(receive, unit, r),
                           **numbering)
    with _OwedStep(framing, group, plan, numbering) as owed:
        scatter = framed("all_reduce reduce-scatter", sizes, [mine] * W)
        for p in scatter.peers:
            scatter.payload(p).copy_(piece(p).view(torch.uint8))
        scatter.start()
        owed.step = None
        try:
            got = scatter.wait()
        except (ConfigMismatchError, frame.PeerTimeoutError) as e:
            answered = frame.peers_answered(e)
            # (not for a rank in another call: it would never answer. In a call of one round
            # too: a late rank that disagrees ends it with an aborted all-gather; one that
            # agrees completes it, and its next call's first frame posts again past this one)
            if not e.elsewhere:
                empty = flat.new_empty(0)
                frame.all_to_all_single(framing, group, r, W, "all_reduce all-gather", empty,
                                        empty, [0] * W, [0] * W, aborted=True, wait=answered,
                                        **numbering)
            raise
        if not one_round:
            owed.step = "all_reduce all-gather"
        # in rank order, each step rounded in the dtype; written into the first received
        # range until this rank's term, then over this rank's own: no new tensor, no copy back
        terms = [piece(p) if p == r else got[p].view(flat.dtype) for p in range(W)]
        total = terms[0]
        for p in range(1, W):
            total = torch.add(total, terms[p], out=terms[0] if p < r else piece(r))
        scatter.release()  # (after the sum: the terms are views of its buffer)
        if one_round:
            return
        gather = framed("all_reduce all-gather", [mine] * W, sizes)
        for p in gather.peers:
            gather.payload(p).copy_(total.view(torch.uint8))
        gather.start()
        owed.step = None
        got = gather.wait()
        for p in gather.peers:
            piece(p).view(torch.uint8).copy_(got[p])
        gather.release()


# ---- hierarchical ------------------------------------------------------------------------------
def _records(dtype: torch.dtype, cfg: CodecConfig) -> tuple:
    """What the headers of a framed stage name its bytes as (Hierarchy.a2a's ``records``):
    records of ROW values of ``dtype`` encoded with ``cfg``."""
    return dtype, ROW, record_bytes(ROW, cfg), frame.wire_code(cfg)


def _stage_gather(h, stage: str, out: torch.Tensor, inp: torch.Tensor, named: dict) -> None:
    """All-gather of ``inp`` (uint8, equal sizes) among a hierarchy stage's ranks into
    ``out`` (stage rank order). A masked stage (no process group of its own), and any stage
    on CPU (framed, ``named``: the headers' fields), sends ``inp`` to every stage peer with
    one all_to_all_single."""
    pg, peers, masked = h.stages[stage]
    if not masked and out.is_cuda:
        _gather_single(out.view(-1), inp.reshape(-1), pg)
        return
    n, k = len(peers), inp.numel()
    h.a2a(stage, out.view(-1), inp.reshape(1, -1).expand(n, k).reshape(-1), [k] * n, [k] * n,
          **named)


def _hierarchy(comm):
    """The communicator's stages (comm.hierarchical.Hierarchy)."""
    from .hierarchical import hierarchy
    return hierarchy(comm)


def _hierarchical(buf: torch.Tensor, plan: _Plan, h, comm) -> None:
    """The hierarchical all-reduce of ``buf`` (flat, world * c * ROW values) in place, for
    the communicator ``comm``. Where ``plan.stamped`` (CUDA over NCCL), both reduce-scatters'
    records travel behind stamps their reductions check; the second reduction writes a slot
    before its output records (its stamp, or the mark of a disagreement this rank saw in
    either stage) that travels with them through both all-gathers, and the last decode
    checks every rank's slot, so a disagreement any rank saw reaches every rank
    (_final_call)."""
    L, M, lr, node, c = h.local, h.nodes, h.local_rank, h.node, plan.rows
    stamped = plan.stamped
    page = error_page(comm._pages, kernels.device_index(buf)).address if stamped else 0
    x3 = buf.view(L, M * c, ROW)  # local chunk l: rows of sub-chunks (l, 0..M-1)
    # on CPU (framed) every stage carries the call's number and the numel, and names its
    # records' dtype and codec (records of the same size may be of other codecs)
    named = dict(operation="hierarchical all-reduce stage", detail=plan.numel,
                 **h.numbering(buf.device))
    records, final = (None, None), named  # final: the second stage's and the gathers'
    if "number" in named:
        records = _records(buf.dtype, plan.intra), _records(buf.dtype, plan.inter)
        final = dict(named, records=records[1])
    intra = functools.partial(h.a2a, "intra", records=records[0], **named)
    inter = functools.partial(h.a2a, "inter", **final)
    # the stages whose exchange this rank completed (or skipped): a disagreement or an error
    # of its own after them owes the later stages (_abort_stages)
    made = 0
    try:
        # 1. reduce-scatter inside the group: this rank's part (local chunk lr), summed over
        #    the group, in x's dtype
        if L > 1:
            s1 = (_stamped_call(comm, plan, buf, "intra", L, lr, M * c, ((0, M * c),),
                                plan.intra), 0) if stamped else None
            recv, work, _ = _start_reduce_scatter(x3, 0, M * c, L, lr, None, plan.intra, intra,
                                                  stamped=s1)
            work.wait()
            made = 1
            part = reduce_chunk(recv, x3[lr], lr, plan.intra, requant=False,
                                check=StampCheck(page, plan.numel, node * L) if stamped else None)
        else:
            part, made = x3[lr], 1
        # 2. the flat reduce-scatter of the part across groups: sub-chunk `node` of it
        part3 = part.view(M, c, ROW)
        rb = record_bytes(ROW, plan.inter)
        if M > 1:
            s2 = (_stamped_call(comm, plan, buf, "inter", M, node, c, ((0, c),), plan.inter),
                  0) if stamped else None
            recv, work, _ = _start_reduce_scatter(part3, 0, c, M, node, None, plan.inter, inter,
                                                  stamped=s2)
            work.wait()
        else:
            recv = torch.empty((0, c, rb), dtype=torch.uint8, device=buf.device)
        made = 2
        if stamped:  # the final records behind their slot: [slot, c * rb records]
            rec = torch.empty(kernels.STAMP_BYTES + c * rb, dtype=torch.uint8,
                              device=buf.device)
            slot = p2p.stamp(plan.inter, c, plan.numel, buf.dtype)
            reduce_chunk(recv, part3[node], node, plan.inter,
                         check=StampCheck(page, plan.numel, lr, L, slot),
                         out=rec[kernels.STAMP_BYTES:].view(c, rb))
        else:
            rec = reduce_chunk(recv, part3[node], node, plan.inter)
        # 3. all-gather of the final records: across groups, then inside the group
        if M > 1:
            across = torch.empty((M, rec.numel()), dtype=torch.uint8, device=buf.device)
            _stage_gather(h, "inter", across, rec, final)
        else:
            across = rec.view(1, -1)
        made = 3
        if L > 1:
            inside = torch.empty((L, across.numel()), dtype=torch.uint8, device=buf.device)
            _stage_gather(h, "intra", inside, across, final)
        else:
            inside = across
    except (ConfigMismatchError, frame.PeerTimeoutError) as e:
        if named.get("number"):
            _abort_stages(h, plan, named, records, after=made, elsewhere=e.elsewhere,
                          wait=frame.peers_answered(e))
        raise
    except frame.EXCHANGE_ERRORS:
        raise
    except Exception:  # this rank's own (out of memory, ...): answer the stages owed
        if named.get("number"):
            if made < (1 if L > 1 else 2):  # no stage made: the first rejected
                frame.reject(h.framing, h.group, h.rank, h.world, named["operation"],
                             number=named["number"], counter=named["counter"])
            else:  # the rest as headers only, as after a disagreement
                _abort_stages(h, plan, named, records, after=made - 1, failed=True)
        raise
    if stamped:
        _final_call(comm, plan, h, buf).unpack(0, inside.view(-1), buf.view(L * M * c, ROW))
    else:
        _decode_into(inside.view(L * M * c, rb), plan.inter, buf.view(L * M * c, ROW))


def _abort_stages(h, plan: _Plan, named: dict, records: tuple, after: int,
                  elsewhere=frozenset(), wait: bool = True, failed: bool = False) -> None:
    """A framed call that found a disagreement in stage ``after + 1``, or a silent peer
    (``wait`` False: frame.peers_answered): the later stages as headers only, so the ranks
    that meet this one there raise in this call too; not those that would wait for a rank
    of ``elsewhere`` (seen in another call: it never comes). ``failed``: this rank failed
    on its own after stage ``after + 1`` (the headers say so).
    ``records``: the stages' (_records of the intra codec, of the inter codec)."""
    L, M, c = h.local, h.nodes, plan.rows
    rb1, rb2 = record_bytes(ROW, plan.intra), record_bytes(ROW, plan.inter)
    r1, r2 = records
    stages = [("intra", L, h.local_rank, M * c * rb1, False, r1),  # (stage, ranks, own,
              ("inter", M, h.node, c * rb2, False, r2),             #  bytes, an all-gather,
              ("inter", M, h.node, c * rb2, True, r2),              #  records)
              ("intra", L, h.local_rank, M * c * rb2, True, r2)]
    for stage, n, own, k, gather, rec in stages[after + 1:]:
        if n == 1 or h.meets(stage, elsewhere):
            continue
        splits = [k if gather or q != own else 0 for q in range(n)]
        h.a2a(stage, torch.empty(sum(splits), dtype=torch.uint8), torch.empty(0, dtype=torch.uint8),
              splits, [0] * n, aborted=True, failed=failed, records=rec, wait=wait, **named)


# ---- the specification ---------------------------------------------------------------------------
def _roundtrip(rows: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    return _reference.decode(_reference.encode(rows, cfg), cfg, rows.shape[1], rows.dtype)


def _spec_reduce(terms: Sequence[torch.Tensor], owner: int, cfg: CodecConfig) -> torch.Tensor:
    """Sum in fp32, rank order, of ``terms`` (each [m, ROW]): the owner's exact, the others
    through the codec; cast to the terms' dtype."""
    acc = None
    for p, t in enumerate(terms):
        v = (t if p == owner else _roundtrip(t, cfg)).float()
        acc = v.clone() if acc is None else acc + v
    return acc.to(terms[0].dtype)


def reference_all_reduce(inputs: Sequence[torch.Tensor], codec: CodecLike = None, *,
                         local_size: Optional[int] = None) -> torch.Tensor:
    """What every rank's tensor becomes after ``all_reduce`` of ``inputs`` (one per group
    rank, equal shapes and dtypes, CPU), computed in one process with the reference codec.

    local_size: None for the flat algorithm; L for the hierarchical one with groups of L
    consecutive ranks (``codec`` may then be a LinkCodecs; one group, L = W, is the flat
    algorithm with its intra_node codec, as in ``all_reduce``). Ignores the size gate.
    """
    W = len(inputs)
    # checked here: a local_size that does not divide W (or is 0) indexed past the inputs
    # (IndexError) or ran the flat algorithm under the hierarchical name, and inputs of
    # other numels were summed as if padded alike
    if local_size is not None and (isinstance(local_size, bool)
                                   or not isinstance(local_size, int)
                                   or local_size < 1 or W % local_size):
        raise ValueError(f"local_size must be None or an int >= 1 dividing the {W} inputs, "
                         f"got {local_size!r}")
    if W == 0 or any(x.shape != inputs[0].shape or x.dtype != inputs[0].dtype for x in inputs):
        raise ValueError("inputs: one tensor per rank, all of one shape and dtype, got "
                         f"{[(tuple(x.shape), x.dtype) for x in inputs]}")
    codecs = LinkCodecs.coerce(codec, "codec")
    # what all_reduce refuses, refused here too (a spec that ran it would vouch for it)
    check_codecs(codecs, "codec" if local_size is None else "codec.intra_node",
                 "codec.inter_node")
    intra, inter = codecs.intra_node, codecs.inter_node
    if local_size is None and intra != inter:
        raise ValueError(f"codec: per-link codecs ({codecs}) need local_size (the hierarchical "
                         "algorithm); the flat all-reduce sends every chunk with one codec")
    if intra.is_native or inter.is_native:
        raise ValueError("a 'native' all-reduce is torch.distributed.all_reduce: its result is "
                         "the backend's sum, not this specification's")
    if local_size == W:  # one group: no link across groups (_make_plan)
        local_size = None
    shape, dtype = inputs[0].shape, inputs[0].dtype
    c = rows_per_rank(inputs[0].numel(), W)
    xs = [_padded(x.reshape(-1), W).view(W * c, ROW) for x in inputs]
    L = local_size or W
    M = W // L
    if local_size is None:
        parts = xs  # flat: the reduce-scatter reduces every rank's whole input
    else:  # 1. inside each group: local rank l's part is the sum of the group's chunk l
        parts = []
        for g in range(W):
            node, lr = divmod(g, L)
            chunk = slice(lr * M * c, (lr + 1) * M * c)
            terms = [xs[node * L + q][chunk] for q in range(L)]
            parts.append(_spec_reduce(terms, lr, intra).view(-1))
    out = []
    for lr in range(L):           # 2. across groups (flat: L = 1 group of W), then decode
        for node in range(M):
            g = node * L + lr
            sub = slice(node * c, (node + 1) * c)
            if local_size is None:
                terms = [x[g * c:(g + 1) * c] for x in xs]
                owner, cfg = g, intra
            else:
                terms = [parts[m * L + lr].view(M * c, ROW)[sub] for m in range(M)]
                owner, cfg = node, inter
            out.append(_roundtrip(_spec_reduce(terms, owner, cfg), cfg))
    flat = torch.cat(out).view(-1)[:inputs[0].numel()]
    return flat.view(shape).to(dtype)


__all__ = ["ALGORITHMS", "OPS", "ROW", "all_reduce", "reduce_chunk", "reference_all_reduce",
           "rows_per_rank"]
