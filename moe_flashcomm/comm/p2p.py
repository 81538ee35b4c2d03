"""Peer-to-peer transport for the all-to-all of GPUs on one node (NVLink).

Inside a node the encode kernel writes the records straight into the receiving GPU's memory
through CUDA IPC: quantization and transfer are one pass, with no NCCL launch or staging.
Every rank's receive buffer holds one region per sender at a fixed address; its flag words
(per peer: "landed" and "freed" call numbers, and its own call counter) are mapped by every
peer. One call (``exchange.P2PCall``, csrc/p2p.cu) is one launch: per peer, its encode blocks
wait until the peer has decoded our previous records and publish "landed" when ours are in,
and its decode blocks wait for "landed" and publish "freed". The call numbers live on the
device and the buffers do not move, so a call captured in a CUDA graph replays correctly
any number of times.

Ranks that disagree: with "landed" each sender stores its stamp of the pair (codec, rows,
dtype, hidden: ``stamp``) in the receiver's flags, and the receiver's kernel compares it with
the stamp it expects, writing a difference to a pinned error page that the host reads at its
next call (``PeerBuffers.check``): both ranks of the pair raise ConfigMismatchError there,
with no synchronisation in the call. A wait for a peer that lasts the communicator's timeout
(the peer died or made another call) gives up and is reported on the same page: that rank
raises PeerTimeoutError at its next call, and at every call after it, since the flags are out
of step; its peers' own waits then time out in turn. Sizes must agree when the buffers grow
(collective).

Every rank of the group must take this path for the same calls, so the decision uses only
what every rank knows: the route (all peers on this node over NVLink, decided once,
collectively) and the call's sizes (even splits, or a group of two ranks whose one pair both
sides know). Buffers grow collectively, when such a call needs more room; they belong to a
Communicator and are freed by its ``close()``.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import kernels
from ..memo import remember
from ..codec import cuda as _cuda
from .check import ConfigMismatchError
from . import frame
from .frame import DTYPES, Framing, PeerTimeoutError, dtype_code, wire_code, wire_text

MAX_PEERS = kernels.MAX_PEERS
ALIGN = 1 << 20  # per-sender regions: whole MiB where the limit allows (stores need 16)
COPY_CHUNKS = 2  # pipelined parts of a copy-engine transfer
FLAG_BYTES = 8 * kernels.P2P_FLAG_WORDS  # csrc/p2p.cu: landed and freed per peer, counters
MAPPED = 2  # cudaHostAllocMapped: the error page is written by kernels, read by the host
HANDLE_WORDS = 8  # a CUDA IPC memory handle: 64 bytes
NO_STREAM = (1 << 64) - 1  # PeerBuffers' stream cell before the first call (0 is a stream)
HIDDEN_MOD = 1 << 14  # a stamp keeps the hidden size (an all-reduce: its numel) modulo this


def stamp(wire, rows: int, hidden: int, dtype: torch.dtype) -> int:
    """One direction of a pair in a u64 both of its ranks compute alike: the wire (codec),
    the rows, the dtype and the hidden size (mod HIDDEN_MOD); bit 0 set (0: nothing stored)."""
    code = wire_code(wire) if rows else 0
    return (1 | code << 1 | dtype_code(dtype) << 23 | min(rows, (1 << 24) - 1) << 26
            | (hidden % HIDDEN_MOD) << 50)


def describe(value: int, numel: bool = False) -> str:
    """A stamp in words; ``numel``: an all-reduce's, whose hidden field holds its numel."""
    if value == kernels.SAW_DISAGREEMENT:
        return "a mark that it saw ranks of the group disagree earlier in this call"
    if not value & 1:
        return "nothing (no stamp)"
    code, dt = value >> 1 & 0x3FFFFF, value >> 23 & 7
    rows, hidden = value >> 26 & 0xFFFFFF, value >> 50
    if rows == 0:
        return "no rows"
    dtype = DTYPES[dt - 1] if 1 <= dt <= len(DTYPES) else "another dtype"
    size = f"numel {hidden} mod {HIDDEN_MOD}" if numel else f"hidden {hidden}"
    return f"{rows} rows of {wire_text(code)} ({dtype}, {size})"


def _runtime():
    import cupy
    return cupy.cuda.runtime


class ErrorPage:
    """Pinned host memory, mapped into the device, where csrc/p2p.cu's kernels report the
    first problem they meet (the kErr* words: claimed, peer, word seen, word expected, call,
    kind, reported); the host reads it with no synchronisation. One per communicator and
    device for each transport that stamps its pairs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            # unified addressing: the same address on the GPU
            self.address = _runtime().hostAlloc(8 * kernels.P2P_ERROR_WORDS, MAPPED)
        self.words = np.ctypeslib.as_array(
            (ctypes.c_uint64 * kernels.P2P_ERROR_WORDS).from_address(self.address))
        self.words[:] = 0

    @property
    def set_word(self) -> int:
        """Host address of the "reported" word (the compiled launcher reads it per call)."""
        return self.address + 8 * kernels.P2P_ERROR_SET

    def report(self) -> Optional[list]:
        """The page's words where a kernel has reported, else None."""
        words = self.words
        return [int(w) for w in words] if words[kernels.P2P_ERROR_SET] else None

    def clear(self) -> None:
        # "reported" first, "claimed" last: a kernel that claims the page meanwhile finds it
        # still claimed and drops its report, as any second one; cleared the other way round,
        # its report was wiped after its claim, and no report could ever be made again
        words = self.words
        words[kernels.P2P_ERROR_SET] = 0
        words[1:kernels.P2P_ERROR_SET] = 0
        words[0] = 0

    def close(self) -> None:
        if self.address:
            self.words = np.zeros(kernels.P2P_ERROR_WORDS, dtype=np.uint64)
            with torch.cuda.device(self.device):
                _runtime().freeHost(self.address)
            self.address = 0


class PeerBuffers:
    """Receive buffer and flags of one process group on one device, mapped by every peer.

    Create with :func:`peer_buffers` (collective). ``cap`` is the bytes one sender may write
    per call into another rank's buffer; ``generation`` changes whenever the buffers move
    (plans holding their addresses are then made again).
    """

    def __init__(self, group, rank: int, world: int, device: torch.device,
                 timeout_s: float, limits: tuple[int, int],
                 framing: Optional[Framing] = None) -> None:
        self.group, self.rank, self.world, self.device = group, rank, world, device
        self.timeout_s = timeout_s  # a kernel's wait for a peer gives up after this
        self.framing = framing  # the group's agreement runs on gloo: handles travel framed
        self.failed: Optional[str] = None  # a wait timed out: the flags are out of step
        self.cap = 0
        # a call on the current buffers was captured in a CUDA graph (begin), whose replays
        # use their addresses: when they grow they are kept (``retired``) until close()
        self.captured = False
        self.retired: list[list[int]] = []
        # the communicator's (every rank's are checked equal when it is made): the most device
        # memory our receive buffer may take, the records per peer the copy engine moves
        self.max_bytes, self.copy_bytes = limits
        self.generation = 0
        # the stream of the last call, in a cell the compiled launcher reads (``cells``)
        self._stream = ctypes.c_uint64(NO_STREAM)
        self.data_ptrs: list[int] = []
        self.flag_ptrs = self._exchange(FLAG_BYTES)[0]
        self._syncs: dict = {}  # (mode, advance, bytes copied meanwhile, stamps) -> launch
        self.page = ErrorPage(device)  # the kernels report a peer's unexpected stamp here

    def args(self, stamps: tuple, **fields):
        """csrc/p2p.cu's P2PArgs of this rank with ``fields`` set; ``stamps``: the call's
        (send, receive) stamps per group rank."""
        return kernels.p2p_args(self.flag_ptrs, self.rank, self.world,
                                int(self.timeout_s * 10**9),
                                send_stamp=padded(stamps[0]), recv_stamp=padded(stamps[1]),
                                error_page=self.page.address, **fields)

    def check(self) -> None:
        """Raise what a kernel of an earlier call reported: ConfigMismatchError for a peer's
        stamp that differed from the one this rank expected (the report is then cleared),
        PeerTimeoutError for a wait that timed out (kept: every later call raises it too)."""
        if self.failed is not None:
            raise PeerTimeoutError(self.failed)
        words = self.page.report()
        if words is None:
            return
        kind, message = page_report(words, self.group, self.rank, self.world, self.timeout_s)
        if kind is ConfigMismatchError:
            self.page.clear()
            raise ConfigMismatchError(message)
        # the page stays set: the kernels still queued give up their waits within a millisecond
        self.failed = message
        raise PeerTimeoutError(message)

    def sync(self, mode: int, stamps: tuple, advance: bool = False,
             copy_bytes: int = 0) -> kernels.PreparedLaunch:
        """p2p_sync's launch: wait for / publish to every peer as ``mode`` says (its other
        blocks copy ``copy_bytes`` meanwhile: pointer bases source, destination)."""
        return remember(self._syncs, (mode, advance, copy_bytes, stamps), lambda: kernels.sync_launch(
            self.device.index, self.args(stamps, mode=mode, advance=int(advance),
                                         copy_n16=copy_bytes // 16), copy_bytes), 256)

    def exchange_launch(self, sends: list, recvs: list, hidden: int, cfg, dtype: torch.dtype,
                        keep: tuple, stamps: tuple, stage: bool = False
                        ) -> Optional[kernels.PreparedLaunch]:
        """p2p_exchange: the whole call in one launch (pointer bases: tokens, output), its
        tasks as ``exchange_table`` makes them; None where it makes none. ``stage``: the
        encodes of ``sends`` only, into a staging buffer (pointer bases: tokens, staging;
        their ``remote`` an offset in it), publishing nothing: the copy engine moves the
        records, and the call's last launch publishes "landed" for them."""
        args = self.args(stamps, copy_n16=keep[2] // 16, advance=int(not stage),
                         mode=kernels.EXCHANGE_STAGE if stage else 0)
        return exchange_kernel(self.device.index, sends, recvs, hidden, cfg, dtype, keep, args)

    # -- collective setup ------------------------------------------------------------------
    def _exchange(self, nbytes: int, captured: bool = False) -> tuple[list[int], bool]:
        """Allocate ``nbytes`` of zeroed device memory; every rank's allocation as mapped in
        this process (ours as is), and whether any rank passed ``captured``. Collective: every
        rank takes part in both votes even when its own allocation, export or mapping failed
        (then every rank raises, having freed the new memory), so none is left waiting or
        moves on alone."""
        rt = _runtime()
        ptr = handle = None
        try:
            ptr = _cudamalloc_zeroed(nbytes, self.device)
            with torch.cuda.device(self.device):
                handle = bytes(rt.ipcGetMemHandle(ptr))
        except Exception:
            handle = None
        try:
            handles, flags = self._gather(handle, captured)
            if any(h is None for h in handles):
                raise RuntimeError(f"ranks {[p for p, h in enumerate(handles) if h is None]} could "
                                   f"not allocate {nbytes} bytes or export them through CUDA IPC")
        except BaseException:  # (a peer's failure, or the gather's): ours is freed
            if ptr is not None:
                with torch.cuda.device(self.device):
                    rt.free(ptr)
            raise
        ptrs, error = [], ""
        with torch.cuda.device(self.device):
            for p, h in enumerate(handles):
                try:
                    ptrs.append(ptr if p == self.rank else
                                rt.ipcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess))
                except Exception as e:
                    error = f" (here: mapping rank {p}'s: {type(e).__name__}: {e})"
                    break
        # a second vote: a rank that cannot map a peer's memory must not stay behind alone
        # while the others move on (every rank raises and keeps what it had)
        _, unmapped = self._gather(None, bool(error))
        if any(unmapped):
            ptrs += [None] * (self.world - len(ptrs))
            ptrs[self.rank] = ptr
            self._release(ptrs)
            raise RuntimeError(
                f"ranks {[p for p, f in enumerate(unmapped) if f]} could not map their peers' "
                f"new {nbytes}-byte buffers through CUDA IPC{error}")
        return ptrs, any(flags)

    def _gather(self, handle: Optional[bytes], flag: bool) -> tuple[list, list]:
        """Every rank's IPC handle (None where its allocation failed) and ``flag``. Over gloo
        a framed exchange, so a rank that grows its buffers while a peer does not (sizes that
        disagree) raises PeerTimeoutError after the timeout instead of waiting for good."""
        if self.framing is None:
            table: list = [None] * self.world
            dist.all_gather_object(table, (handle, flag), group=self.group)
            return [h for h, _ in table], [bool(f) for _, f in table]
        # word 0: the handle's length (0: none), word 1: the flag, then the handle's bytes
        words = torch.zeros(2 + HANDLE_WORDS, dtype=torch.int64)
        words[1] = int(flag)
        if handle is not None:
            assert len(handle) <= 8 * HANDLE_WORDS, len(handle)
            words[0] = len(handle)
            words[2:].view(torch.uint8)[:len(handle)] = torch.frombuffer(bytearray(handle),
                                                                         dtype=torch.uint8)
        table = frame.gather_words(self.framing, self.group, self.rank, self.world,
                                   "peer-to-peer buffers", words)
        return ([bytes(row[2:].view(torch.uint8)[:int(row[0])].tolist()) if row[0] else None
                 for row in table], [bool(f) for f in table[:, 1]])

    def _release(self, ptrs: list) -> None:
        """Unmap the peers' entries of ``ptrs`` and free ours (None: not mapped)."""
        rt = _runtime()
        with torch.cuda.device(self.device):
            for p, q in enumerate(ptrs):
                if q is None:
                    continue
                if p == self.rank:
                    rt.free(q)
                else:
                    rt.ipcCloseMemHandle(q)

    def reserve(self, nbytes: int) -> None:
        """Make every sender region hold ``nbytes``. Collective when it grows: call only
        with a size every rank of the group computes identically. (Where sizes disagree and
        only some ranks grow, those raise PeerTimeoutError after the timeout when the
        handles travel framed; the others' kernels time out waiting for them.)"""
        if nbytes <= self.cap:
            return
        if self.failed is not None:
            raise PeerTimeoutError(self.failed)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("moe_flashcomm: the peer-to-peer buffers must grow for this call, "
                               "which cannot happen during CUDA graph capture; run the same "
                               "call once before capturing it")
        # whole MiB, doubled to grow rarely, within the memory limit (which need not be a
        # whole MiB per sender); the plan checked nbytes against it
        limit = self.max_bytes // self.world // 16 * 16
        cap = max(-(-nbytes // 16) * 16,
                  min(max(-(-nbytes // ALIGN) * ALIGN, 2 * self.cap), limit))
        torch.cuda.synchronize(self.device)  # our writes into the old buffers are done
        # the gather inside _exchange is a barrier: every rank has synchronised, so nobody
        # still reads or writes the old buffers when they go
        try:
            ptrs, captured = self._exchange(self.world * cap, self.captured)
        except PeerTimeoutError as e:  # a peer did not grow with us: out of step from here
            self.failed = str(e)
            raise
        if self.data_ptrs:
            if captured:  # a rank's CUDA graph holds their addresses: every rank keeps them
                self.retired.append(self.data_ptrs)
            else:
                self._release(self.data_ptrs)
        self.data_ptrs, self.cap, self.captured = ptrs, cap, False
        self.generation += 1

    # -- per call --------------------------------------------------------------------------
    @property
    def stream(self) -> Optional[int]:
        """The stream of the group's last call (None before the first)."""
        value = self._stream.value
        return None if value == NO_STREAM else value

    @property
    def cells(self) -> tuple[int, int]:
        """Host addresses the compiled launcher reads per call (csrc/launcher.cpp Exchange):
        the error page's "set" word (``check`` raises where it is nonzero) and the last
        call's stream (``begin`` writes it)."""
        return (self.page.set_word, ctypes.addressof(self._stream))

    def begin(self, stream: int) -> None:
        """Order a call on ``stream`` after the previous one (the flag protocol needs every
        call of the group in one stream order)."""
        last = self.stream
        if stream != last:
            # (a capture orders its replays itself: waiting on work outside it is not allowed)
            if torch.cuda.is_current_stream_capturing():
                self.captured = True  # a graph holds these buffers: reserve keeps them
            elif last is not None:
                torch.cuda.current_stream(self.device).wait_stream(
                    torch.cuda.ExternalStream(last, device=self.device))
            self._stream.value = stream

    def region(self, owner: int, sender: int) -> int:
        """Device address (in this process) where ``sender`` writes into ``owner``'s buffer."""
        return self.data_ptrs[owner] + sender * self.cap

    def _await_peers(self) -> None:
        """Wait, on the GPU and for at most the timeout, until every peer has decoded the
        records of our last call: its "freed" for them is its last write into our memory, and
        a slower peer's kernel may still be on its way to it (close() is local)."""
        if self.stream is None or not self.flag_ptrs:
            return  # no call made: no peer writes into our memory for one of ours
        launch = kernels.sync_launch(self.device.index,
                                     self.args(((), ()), mode=kernels.WAIT_FREED))
        launch(kernels.raw_stream(self.device.index), 0, 0)
        torch.cuda.synchronize(self.device)
        words = self.page.report()
        if words is not None:  # (only a timeout: the wait compares no stamps)
            _, peer, got, want = words[:4]
            raise PeerTimeoutError(
                f"moe_flashcomm: closing its communicator, group rank {self.rank} of "
                f"{self.world}{frame.global_note(self.group, self.rank)} waited "
                f"{self.timeout_s:g} s on the GPU for rank {peer}"
                f"{frame.global_note(self.group, peer)} to take the records of its last "
                f"peer-to-peer call (#{want}); the last it took were of call #{got}. It died, "
                "or it did not make that call. The memory is freed regardless.")

    def close(self) -> None:
        """Unmap the peers' memory and free ours, once this device is idle and every peer
        has taken our last records (bounded by the timeout). Raises, once everything is
        freed, what the kernels of the last calls reported and no call has raised yet
        (``check``), or that a peer did not take our last records in time."""
        torch.cuda.synchronize(self.device)
        found = None
        for step in (self.check, self._await_peers):
            if self.failed is None:  # (a timeout already raised is not raised again)
                try:
                    step()
                except (ConfigMismatchError, PeerTimeoutError) as e:
                    found = found or e
        held = [ptrs for ptrs in (self.data_ptrs, self.flag_ptrs, *self.retired) if ptrs]
        # forgotten before they are freed: a release that fails part-way leaks the rest
        # rather than free them twice on a second close (an address may be reused by then)
        self.data_ptrs, self.flag_ptrs, self.cap, self.retired = [], [], 0, []
        self.generation += 1
        try:
            for ptrs in held:
                self._release(ptrs)
        finally:
            self.page.close()
        if found is not None:
            raise found


def exchange_kernel(device: int, sends: list, recvs: list, hidden: int, cfg,
                    dtype: torch.dtype, keep: tuple, args: np.ndarray, local: bool = False
                    ) -> Optional[kernels.PreparedLaunch]:
    """p2p_exchange with ``args`` (a P2PArgs) for the tasks ``exchange_table`` makes of
    ``sends``, ``recvs`` and ``keep``; None where it makes none. ``local``: its variant for
    exchanges another transport carries (tasks in local buffers, behind stamps)."""
    made = exchange_table(sends, recvs, hidden, cfg, dtype, keep)
    if made is None:
        return None
    table, blocks = made
    vec = hidden % 8 == 0
    # the codec's arguments of one row: each task sets its own item count
    enc = _cuda.encode_pieces(1, hidden, cfg, dtype, vec)[1][0][3]
    dec = _cuda.decode_pieces(1, hidden, cfg, dtype)[1][0][3]
    return kernels.exchange_launch(device, _cuda.exchange_name(hidden, cfg, dtype, vec, local),
                                   enc, dec, table, args, blocks)


def exchange_table(sends: list, recvs: list, hidden: int, cfg, dtype: torch.dtype,
                   keep: tuple) -> Optional[tuple[np.ndarray, int]]:
    """(csrc/p2p.cu's ExchangeArgs, the launch's blocks) of one call: ``sends`` / ``recvs``
    give (peer, first row, rows, address of the records) of every peer in the order their
    tasks take tickets, ``keep`` (token byte offset, output byte offset, bytes) the rows this
    rank keeps. Tickets run over the encodes, the copy, the decodes; a task without rows takes
    one block (its flags still move). None where a pair's encode or decode would take more
    than one launch (past 2^31 items)."""
    row, vec = hidden * dtype.itemsize, hidden % 8 == 0
    table = kernels.struct(kernels.EXCHANGE_ARGS)
    t = table[0]
    ticket = 0

    def add(i: int, peer: int, offset: int, remote: int, pieces: list) -> bool:
        nonlocal ticket
        if len(pieces) > 1:
            return False
        blocks, items = (pieces[0][0], int(pieces[0][3]["total"][0])) if pieces else (1, 0)
        t["task"][i] = (offset, remote, items, ticket, blocks, peer)
        ticket += blocks
        return True

    for i, (p, first, rows, remote) in enumerate(sends):
        if not add(i, p, first * row, remote, _cuda.encode_pieces(rows, hidden, cfg, dtype, vec)[1]):
            return None
    x_off, y_off, nbytes = keep
    t["keep_src"], t["keep_dst"], t["keep_first"] = x_off, y_off, ticket
    t["keep_blocks"] = kernels.copy_blocks(nbytes)
    ticket += int(t["keep_blocks"])
    for i, (p, first, rows, remote) in enumerate(recvs, len(sends)):
        if not add(i, p, first * row, remote, _cuda.decode_pieces(rows, hidden, cfg, dtype)[1]):
            return None
    t["sends"], t["tasks"] = len(sends), len(sends) + len(recvs)
    return table, ticket


def page_report(words: list, group, rank: int, world: int,
                timeout_s: float) -> tuple[type, str]:
    """The error class and message of an error page's ``words`` (csrc/p2p.cu's kErr* words)
    as group rank ``rank`` of ``world`` in ``group`` reads them."""
    _, peer, got, want, call, kind, _ = words
    me = f"group rank {rank} of {world}{frame.global_note(group, rank)}"
    them = f"rank {peer}{frame.global_note(group, peer) if 0 <= peer < world else ''}"
    if kind == kernels.P2P_ERROR_STAMP:
        return ConfigMismatchError, stamp_mismatch(words, group, rank, world,
                                                   f"peer-to-peer call #{call}")
    flag = {kernels.P2P_ERROR_FREED_TIMEOUT: "to take new records (\"freed\")",
            kernels.P2P_ERROR_LANDED_TIMEOUT: "for its records (\"landed\")"}.get(kind, "")
    return PeerTimeoutError, (
        f"moe_flashcomm.all_to_all (peer-to-peer): {me} waited {timeout_s:g} s on the GPU, at "
        f"its peer-to-peer call #{call}, for {them} {flag}: its last call seen here is #{got} "
        f"and this one needed #{want}. It died, or it did not make this call: every rank must "
        "make the same moe_flashcomm calls in the same order. The outputs from that call on are "
        "not valid and this communicator's peer-to-peer state is out of step: every later "
        "call raises this error; close() it. (Communicator(timeout=...) or "
        "$MOE_FLASHCOMM_TIMEOUT_S sets the wait.)")


def stamp_mismatch(words: list, group, rank: int, world: int, call: str) -> str:
    """The message of an error page's stamp report (``words``) as group rank ``rank`` of
    ``world`` in ``group`` reads it; ``call``: the call it was found in, in words."""
    _, peer, got, want, _, kind = words[:6]
    me = f"group rank {rank} of {world}{frame.global_note(group, rank)}"
    them = f"rank {peer}{frame.global_note(group, peer) if 0 <= peer < world else ''}"
    reduce = kind in (kernels.P2P_ERROR_REDUCE_STAMP, kernels.P2P_ERROR_REDUCE_NUMEL)
    if reduce:
        operation, same = "all_reduce", "codec, dtype and number of values"
    else:
        operation, same = "all_to_all", "codecs, dtype, hidden size and split sizes"
    if kind == kernels.P2P_ERROR_REDUCE_NUMEL:  # (the same stamp: numels 2^14 apart)
        sent, expected = f"the records of a tensor of {got} values", f"{want} values"
    else:
        sent, expected = describe(got, reduce), describe(want, reduce)
    return (f"moe_flashcomm.{operation}: ranks of the group disagree (seen by {me} at its "
            f"{call}):\n  {them} sent {sent}; this rank expected {expected}\n"
            f"Every rank must make the same moe_flashcomm calls in the same order, with the same "
            f"{same}. (Found on the device after that call returned: its output is not valid.)")


def padded(stamps: tuple) -> list:
    """Up to MAX_PEERS stamps -> P2PArgs' MAX_PEERS slots (numpy u64)."""
    return [s & (1 << 64) - 1 for s in stamps] + [0] * (MAX_PEERS - len(stamps))


def _cudamalloc_zeroed(nbytes: int, device: torch.device) -> int:
    """Device memory outside torch's caching allocator (its blocks are not IPC-safe
    one by one)."""
    rt = _runtime()
    with torch.cuda.device(device):
        ptr = rt.malloc(nbytes)
        rt.memset(ptr, 0, nbytes)
        # cudaMemset returns before it is done, and no stream orders it before the peers'
        # writes once the handle is shared: done before (buffers grow rarely)
        rt.deviceSynchronize()
    return ptr


def peer_buffers(group, rank: int, world: int, device: torch.device,
                 agree_device: torch.device, timeout_s: float, limits: tuple[int, int],
                 framing: Optional[Framing] = None) -> Optional[PeerBuffers]:
    """PeerBuffers for ``group`` on ``device``, or None where the transport cannot run on
    every rank (CuPy missing, more than MAX_PEERS ranks, memory not mappable). Collective:
    every rank of the group calls it; ``agree_device`` carries the group's small votes;
    ``timeout_s``: how long a kernel waits for a peer; ``limits``: MOE_FLASHCOMM_P2P_MAX_MB
    and _COPY_MB in bytes, as the communicator read them; ``framing``: the communicator's,
    where the group's agreement runs on gloo."""
    ok = 2 <= world <= MAX_PEERS
    try:
        _runtime()
    except ImportError:
        ok = False
    bufs, err = None, ""
    if _all(ok, group, agree_device):
        try:
            bufs = PeerBuffers(group, rank, world, device, timeout_s, limits, framing)
        except Exception as e:  # e.g. the IPC mapping is refused: every rank falls back
            err = f"{type(e).__name__}: {e}"
        if not _all(not err, group, agree_device):
            import warnings
            warnings.warn(f"moe_flashcomm: peer-to-peer all-to-all unavailable "
                          f"({err or 'on a peer'}); NCCL carries the intra-node traffic",
                          stacklevel=3)
            if bufs is not None:
                bufs.close()
            bufs = None
    return bufs


def _all(ok: bool, group, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of ``group`` (one small all-reduce)."""
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
