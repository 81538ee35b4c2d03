"""Framed exchanges: on gloo every message between two ranks starts with a header that the
receiver checks before it decodes a byte.

Ranks that disagree (a codec changed on one rank, a shape, split sizes, a skipped call)
would otherwise hang, abort inside gloo (a message longer than the receive) or decode
garbage. The first-use check of ``comm/check.py`` cannot see a rank that switches to a
configuration it used before; the header sees every call, at no extra collective. (A rank
that skips a call whose next call is the same as the skipped one, the same sizes and
configuration, sends the headers that call would have: the ranks go on one call apart,
unseen, for as long as their calls' headers match; the error comes at the first call whose
headers differ, or where the peers' last call waits for it in vain.)

Header (HEADER_BYTES, int64 words): magic, operation, exchange number in this group, the
sender's (rank, world), (dtype, hidden), the sender's wire, rows it sends to this peer,
rows it expects from this peer, payload bytes it sends, an operation's detail (the
all-reduce's numel), the flags (ABORTED, REJECTED, GAVE_UP, FAILED: the sender sends headers
only) and a reserved word (0). Both ends of a pair send one, so both ends of a disagreeing pair see
the disagreement and raise.

Round 1 is one ``all_to_all_single``: to each peer its header and the first
FRAME_BYTES - HEADER_BYTES bytes of its payload; every rank receives into at least
FRAME_BYTES per peer, so no peer can overflow the receive and a short one is noticed.
Round 2, only for payloads longer than that, moves the rest point to point, sized from the
header on both ends, so the transport stays in step even when the sizes disagree; then the
disagreement raises. A peer that sends nothing within the timeout is named.
"""
from __future__ import annotations

import datetime
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..codec import CodecConfig
from ..codec.config import BITS_NAMED
from ..codec.format import align
from ..memo import remember
from . import direct
from .check import ConfigMismatchError
from .plan import offsets

MAGIC = 0x4D4F45464C415331  # "MOEFLAS1": the format's version is its last byte
WORDS = 12
HEADER_BYTES = 8 * WORDS
FRAME_BYTES = 4 << 20
MAX_HIDDEN = (1 << 55) - 1  # the header's (dtype, hidden) word holds hidden << 8
# Framing's buffer pool: smallest size class, buffers kept per class, bytes kept in all
POOL_MIN, POOL_DEPTH, POOL_BYTES = 64 << 10, 4, 256 << 20
OPERATIONS = ("all_to_all", "all_to_all backward", "all_reduce reduce-scatter",
              "all_reduce all-gather", "hierarchical stage", "hierarchical all-reduce stage",
              "consistency check", "skip_padding counts", "peer-to-peer buffers",
              "hierarchical backward stage")
HIERARCHICAL_STAGE = "hierarchical all-reduce stage"
NUMEL_OPERATIONS = ("all_reduce reduce-scatter", "all_reduce all-gather",
                    HIERARCHICAL_STAGE)  # whose detail word is the numel
ROW_SHAPE_OPERATIONS = ("all_to_all", "all_to_all backward")  # and a hash of x.shape[1:-1]
# the steps that a hierarchical all-to-all's exchange of row counts (int64) may meet
ROW_COUNT_MEETS = ("hierarchical stage", "hierarchical backward stage")
# codes (index + 1) of the dtypes headers and stamps name; appended only (a stamp holds 3
# bits: the token dtypes); the integers that counts may come in, so that a peer's is named
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.int32,
          torch.int16, torch.int8)
RAW_WIRE = 1  # the rows' own bytes
# the flags word: the sender found a disagreement earlier in this call; the sender rejected
# its own arguments for this call. Either way it sends headers only.
ABORTED, REJECTED = 1, 2
GAVE_UP = 4  # with ABORTED: the sender stopped waiting for a silent peer earlier in this call
FAILED = 8  # with ABORTED: the sender failed on its own earlier in this call (out of memory)
REJECT_WAIT_S = 5  # how long a rank with bad arguments waits for the peers of its call
ROUND_TWO_TAGS = 0x4D46 << 16  # ("MF") the base of the second round's tags: round_two_tag
STALE_KEPT = 8  # "gave up" frames of earlier calls a frame posts again past (_met_stale)
# a group's late-frame thread looks for late peers that came after these pauses, doubled
# from the first to the last while none comes (a peer may stay away until the group's timeout)
SERVE_POLL_S = (1e-3, 20e-3)


class PeerError(RuntimeError):
    """A framed exchange lost a peer (its connection failed: it exited or crashed)."""


class PeerTimeoutError(PeerError):
    """Peers did not take part in a call within the communicator's timeout: they sent
    nothing to a framed exchange (gloo), or a peer-to-peer kernel's wait for them gave up."""
    # as ConfigMismatchError's: the ranks whose header came and was of another call
    elsewhere: frozenset = frozenset()


# what a call's exchanges raise: every rank in them raises its own (a call that fails with
# anything else before a step its peers wait in must tell them: ``reject``)
EXCHANGE_ERRORS = (ConfigMismatchError, PeerError)


def peers_answered(error: Exception) -> bool:
    """Whether every peer of a call's failed step answered it (``error`` a disagreement, not
    a timeout). A call ends its later steps as aborted frames either way, but waits for them
    only then. After a timeout they are started and left: a peer that comes late completes
    the abandoned step with this rank's frame and meets them at its next step, so it raises
    in that same call and the ranks stay in step (else its later steps would pair with this
    rank's next call); a later wait settles them (``GroupLine.unfinished``)."""
    return not isinstance(error, PeerTimeoutError)


class Leg(NamedTuple):
    """One direction between this rank and a peer: ``rows`` rows of ``wire`` in ``nbytes``.
    (A tuple: layouts are looked up by their legs at every exchange, and tuples hash in C.)"""
    rows: int
    nbytes: int
    wire: int = RAW_WIRE


def item_legs(splits: list, unit: int, rank: int) -> list:
    """Per group rank p, a Leg of ``splits[p]`` raw items of ``unit`` bytes (None at
    ``rank``: the rows a rank keeps do not travel)."""
    return [None if p == rank else Leg(n, n * unit) for p, n in enumerate(splits)]


def _copied(error: BaseException) -> BaseException:
    """A new ``error`` of the same kind, message and attributes (``elsewhere``), with no
    traceback."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # noqa: BLE001 - a kind made with other arguments
        copy = RuntimeError(str(error))
    copy.__dict__.update(error.__dict__)
    return copy


def wire_code(wire) -> int:
    """A codec (or RAW / None) as one header word, readable back by ``wire_text``."""
    if not isinstance(wire, CodecConfig):
        return RAW_WIRE
    bits = wire.bits if isinstance(wire.bits, int) else 9 + BITS_NAMED.index(wire.bits)
    return (2 | bits << 4 | wire.group_size << 8 | int(wire.spikes) << 20
            | int(wire.rounding == "stochastic") << 21)


def wire_text(code: int) -> str:
    if code == RAW_WIRE:
        return "the rows' own bytes"
    bits = (code >> 4) & 15
    names = dict(enumerate(BITS_NAMED, 9))
    cfg = CodecConfig(bits=names.get(bits, bits), group_size=(code >> 8) & 0xFFF,
                      spikes=bool(code >> 20 & 1),
                      rounding="stochastic" if code >> 21 & 1 else "nearest")
    return f"{cfg} records"


def _reduced(dtype, row: int) -> str:
    """What an all-reduce's exchange carries, in words (its header's dtype and hidden size)."""
    if row == 0:
        return f"the {dtype} values themselves (codec \"native\", or a codec gated off)"
    return f"{dtype} values as records of {row}-value rows (a quantized codec or \"bf16\")"


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) + 1 if dtype in DTYPES else 0


def round_two_tag(number: int) -> int:
    """The point-to-point tag of the second round of exchange ``number``: above the small tags
    a user's own sends on the same group take (gloo matches messages by sender and tag)."""
    return ROUND_TWO_TAGS | number & 0xFFFF


def global_note(pg, ranks) -> str:
    """For a message naming group rank(s) ``ranks`` (an int or a list) of ``pg``: their global
    ranks in brackets where ``pg`` is a subgroup, else nothing (also where torch no longer
    knows ``pg``: destroyed)."""
    try:
        members = dist.get_process_group_ranks(direct.process_group(pg))
    except (KeyError, ValueError, RuntimeError):
        return ""
    if members == list(range(dist.get_world_size())):
        return ""
    if isinstance(ranks, int):
        return f" (global rank {members[ranks]})"
    return f" (global ranks {[members[r] for r in ranks]})"


class GroupLine:
    """The framed exchanges of one process group in this process, whichever communicator
    started them: how many were started (a rank that skips or repeats a call is out of step,
    caught at the first call whose headers differ, or by the wait for the call it skipped;
    a check made while a communicator was being made, and failed, still counts alike on
    every rank), and those not yet waited for, in start order. The rest of a long message moves at
    wait(), point to point, so frames complete in the order they started on every rank,
    whatever order their callers wait in (else two ranks waiting for different frames, of
    one communicator or of two, each wait for the other's rest). And the ``late`` frames
    of the calls on this group (their steps on stage groups too): their first round timed
    out; a peer that comes late completes that round with our frame and, where its payloads
    or ours are past one frame, then waits for our second round. A thread serves it as soon
    as the peer has come, whenever this rank's next call comes (``serve_late``); the group's
    next call serves late frames too while it waits, and alone those whose completion
    changes this rank's state (``Frame.thread_may_serve``, ``Frame._wait_first_round``)."""

    def __init__(self) -> None:
        self.count = 0
        self.unfinished: list = []
        self.late: list = []
        self.lock = threading.Lock()  # over ``late``: the serving thread and a call's wait
        self._server: Optional[threading.Thread] = None

    def next_number(self) -> int:
        self.count += 1
        return self.count

    def add_late(self, frame: "Frame") -> None:
        """Keep ``frame`` for its late peers (until they come, or gloo fails its exchange:
        every one a peer may still complete must be served, and gloo holds its buffers
        meanwhile anyway); serve them from a thread while any is kept."""
        with self.lock:
            self.late.append(frame)
            if self._server is None:
                self._server = threading.Thread(target=self._serve_late, daemon=True,
                                                name="moe_flashcomm late frames")
                self._server.start()

    def take_arrived(self, by_thread: bool) -> list:
        """The late frames whose peers have come (their first round completed), taken off
        ``late``; ``by_thread``: leave those the thread may not serve, marked for the
        caller's thread (``Frame.caller_serves``)."""
        with self.lock:
            came = [f for f in self.late if f.work.is_completed()]
            if by_thread:
                for frame in came:
                    frame.caller_serves = frame.caller_serves or not frame.thread_may_serve()
                came = [f for f in came if not f.caller_serves]
            for frame in came:
                self.late.remove(frame)
        return came

    def _serve_late(self) -> None:
        """The thread: the second round of each late frame whose peers came, until none is
        left to it. Only point to point, which gloo matches by tag: a collective posted here
        could pair, on another rank, with one its caller posted in the meantime."""
        pause = SERVE_POLL_S[0]
        while True:
            came = self.take_arrived(by_thread=True)
            for frame in came:
                frame.serve_late()
            with self.lock:
                if all(f.caller_serves for f in self.late):
                    self._server = None
                    return
            pause = SERVE_POLL_S[0] if came else min(2 * pause, SERVE_POLL_S[1])
            time.sleep(pause)


class Framing:
    """A communicator's framed exchanges: their lines per process group (``GroupLine``) and
    how long to wait for silent peers."""

    def __init__(self, timeout_s: float, lines: Optional[weakref.WeakKeyDictionary] = None,
                 on_peer_check: Optional[Callable[[tuple], Optional[str]]] = None) -> None:
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # the communicator's: a peer makes a first-use check (its words) while this rank
        # exchanges; what to say of it, if anything (it may forget a check it made). Held
        # weakly: the communicator holds this Framing, and a cycle would keep both (and the
        # communicator's device memory) until the cyclic garbage collector ran
        self._on_peer_check = None if on_peer_check is None else weakref.WeakMethod(
            on_peer_check)
        # process group -> its GroupLine, shared by the process's communicators (``lines``);
        # weakly: a group destroyed and dropped by its user takes its line (and sockets) along
        self.lines = weakref.WeakKeyDictionary() if lines is None else lines
        # released frame buffers by size class: a fresh multi-MiB buffer per call costs its
        # page faults every time (measured: tools/bench_frame.py)
        self._free: dict = {}
        self._pooled = 0  # bytes in self._free
        self._layouts: dict = {}  # Frame arguments -> Layout
        # the latest exchange's gloo work, held until the next one starts: left to gloo's
        # worker thread, a finished exchange's last reference can fall while the interpreter
        # exits, when that thread cannot take the GIL to free the tensors it holds and the
        # process aborts (std::terminate; seen in a core dump of a spawned test)
        self.last_work = None

    @property
    def on_peer_check(self) -> Optional[Callable[[tuple], Optional[str]]]:
        return None if self._on_peer_check is None else self._on_peer_check()

    def layout(self, *args) -> "Layout":
        """``layout(*args)``, made once per arguments (the calls of a model repeat them)."""
        return remember(self._layouts, args, lambda: layout(*args), 1024)

    def line(self, pg) -> GroupLine:
        line = self.lines.get(pg)
        if line is None:
            line = self.lines[pg] = GroupLine()
        return line

    def next_number(self, pg) -> int:
        return self.line(pg).next_number()

    def numbering(self, group) -> dict:
        """Frame's ``number`` and ``counter`` for every step of one call on ``group`` (None:
        the default group): one number from the group's count, so a step never pairs with
        another call's."""
        key = direct.process_group(group)
        return dict(number=self.next_number(key), counter=key)

    def buffer(self, nbytes: int) -> "Buffer":
        """A Buffer of at least ``nbytes``, from the pool where one is free."""
        size = max(POOL_MIN, 1 << (nbytes - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._pooled -= size
            return free.pop()
        return Buffer(size)

    def give_back(self, buf: "Buffer") -> None:
        """Return a buffer of ``buffer`` once nothing reads or writes it."""
        size = buf.array.size
        free = self._free.setdefault(size, [])
        if len(free) < POOL_DEPTH and self._pooled + size <= POOL_BYTES:
            free.append(buf)
            self._pooled += size


class Buffer:
    """A pooled uint8 CPU buffer with its views made once (each costs the host about as much
    as checking a header): numpy's bytes (``array``) and int64 words (``words``), and the
    tensor of its first bytes (``head(n)``, kept for the next call of the same size)."""
    __slots__ = ("tensor", "array", "words", "_head")

    def __init__(self, size: int) -> None:
        self.tensor = torch.empty(size, dtype=torch.uint8)
        self.array = self.tensor.numpy()
        self.words = self.array.view(np.int64)
        self._head = self.tensor

    def head(self, nbytes: int) -> torch.Tensor:
        if self._head.numel() != nbytes:
            self._head = self.tensor[:nbytes]
        return self._head


@dataclass(frozen=True)
class Layout:
    """What a Frame's buffers look like, a function of its arguments other than the call's
    number and the group: offsets, splits and the header words."""
    peers: tuple
    sends: tuple
    recvs: tuple
    send_at: dict
    recv_at: dict
    send_bytes: int
    recv_bytes: int
    in_splits: list
    out_splits: list
    fits: bool            # every payload sent fits its frame (round 1 sends the buffer as it is)
    one_round: bool       # and every payload received: no round 2 where the peers agree
    magic_words: list     # int64 index of each peer's slot in the receive buffer
    header_index: np.ndarray  # [peers, WORDS] int64 indices of the received headers
    template: np.ndarray  # [peers, WORDS] int64 we send, the number column 0 (read only)
    expected: np.ndarray  # [peers, WORDS] int64 we should receive, likewise


def layout(rank: int, world: int, operation: str, dtype: torch.dtype, hidden: int,
           sends: tuple, recvs: tuple, detail: int, flags: int) -> Layout:
    """The Layout of a Frame: a pure function of its arguments (Framing.layout keeps them)."""
    if flags:
        sends = tuple(None if leg is None else Leg(0, 0) for leg in sends)
    peers = tuple(p for p in range(world) if p != rank)
    room = FRAME_BYTES - HEADER_BYTES
    send_at, recv_at, at, back = {}, {}, 0, 0
    in_splits, out_splits = [0] * world, [0] * world
    for p in peers:  # send: per peer [header][payload]; receive: room for both and a frame
        send_at[p], recv_at[p] = at, back
        at += HEADER_BYTES + sends[p].nbytes
        in_splits[p] = HEADER_BYTES + min(sends[p].nbytes, room)
        out_splits[p] = align(max(FRAME_BYTES, HEADER_BYTES + recvs[p].nbytes))
        back += out_splits[p]
    template = np.array([[MAGIC, OPERATIONS.index(operation) + 1, 0, rank | world << 32,
                          dtype_code(dtype) | hidden << 8, sends[p].wire, sends[p].rows,
                          recvs[p].rows, sends[p].nbytes, detail, flags, 0]
                         for p in peers], dtype=np.int64).reshape(len(peers), WORDS)
    # what an agreeing peer p sends us: its view of the pair mirrors ours
    expected = np.array([[MAGIC, OPERATIONS.index(operation) + 1, 0, p | world << 32,
                          dtype_code(dtype) | hidden << 8, recvs[p].wire, recvs[p].rows,
                          sends[p].rows, recvs[p].nbytes, detail, 0, 0]
                         for p in peers], dtype=np.int64).reshape(len(peers), WORDS)
    template.flags.writeable = expected.flags.writeable = False
    magic = [recv_at[p] // 8 for p in peers]
    index = (np.array(magic, dtype=np.int64).reshape(-1, 1) + np.arange(WORDS)).reshape(-1, WORDS)
    fits = sum(in_splits) == at
    one_round = fits and all(recvs[p].nbytes <= room for p in peers)
    return Layout(peers, sends, recvs, send_at, recv_at, at, back, in_splits, out_splits,
                  fits, one_round, magic, index, template, expected)


class Frame:
    """One framed all-to-all over ``pg`` (group rank ``rank`` of ``world``).

    sends[p] / recvs[p]: the Leg this rank sends to / expects from group rank p (None at
    ``rank``). Write each payload into ``payload(p)``, call ``start()``, then ``wait()``
    for the received payloads (uint8 views, None at ``rank``); ``wait`` raises
    ConfigMismatchError naming every disagreement this rank sees, after the transport is
    done, or PeerError / PeerTimeoutError naming the peers that sent nothing.

    A call of several exchanges (hierarchical stages, the all-reduce's two steps) numbers
    them all with the call's number (``number``, drawn from ``counter``'s count: the
    call's group); a rank that found a disagreement in one step sends the later ones as
    ``aborted`` frames (headers only), so ranks that only meet it there raise too. A rank
    whose own arguments are bad sends a ``rejected`` frame in their place (``reject``).
    ``names`` (a step on a stage group of a call's group): (that group, the group rank of
    each rank of ``pg``), so that errors name ranks as the call's other steps do."""

    def __init__(self, framing: Framing, pg, rank: int, world: int, operation: str,
                 dtype: torch.dtype, hidden: int, sends: Sequence[Optional[Leg]],
                 recvs: Sequence[Optional[Leg]], detail: int = 0, *,
                 number: Optional[int] = None, counter=None, aborted: bool = False,
                 rejected: bool = False, gave_up: bool = False, failed: bool = False,
                 names: Optional[tuple] = None) -> None:
        pg = direct.process_group(pg)  # (one key for the default group)
        self.flags = (ABORTED * (aborted or gave_up or failed) | REJECTED * rejected
                      | GAVE_UP * gave_up | FAILED * failed)
        lay = framing.layout(rank, world, operation, dtype, hidden, tuple(sends), tuple(recvs),
                             detail, self.flags)
        self.framing, self.pg, self.rank, self.world, self.layout = framing, pg, rank, world, lay
        self.operation, self.dtype, self.hidden, self.detail = operation, dtype, hidden, detail
        self.names = names
        self.sends, self.recvs, self.peers = lay.sends, lay.recvs, lay.peers
        self.send_at, self.recv_at = lay.send_at, lay.recv_at
        self.counter = counter if counter is not None else pg
        self.line = framing.line(pg)  # (looked up once: a weak dictionary's lookup costs)
        # the call's group's: its count, and its late frames (a stage's too: the call's next
        # step, or its next call, may wait on the whole group, and must serve them)
        self.call_line = self.line if self.counter is pg else framing.line(self.counter)
        # the buffers before the number: a rank that cannot allocate them (sizes no memory
        # holds) must not count an exchange it never made, or it is out of step with its peers
        self._buffers = sent, got = framing.buffer(lay.send_bytes), framing.buffer(lay.recv_bytes)
        if number is None:
            # the first-use checks (comm/check.py) run on every rank at once and compare
            # more than a number could: they are not counted
            if operation == "consistency check":
                number = 0
            else:
                number = self.call_line.next_number()
        self.number = number
        self.send, self.recv = sent.head(lay.send_bytes), got.head(lay.recv_bytes)
        send, self._recv_words = sent.array, got.words
        words = lay.template.copy()
        words[:, 2] = number
        head = words.view(np.uint8)
        for i, p in enumerate(lay.peers):
            send[lay.send_at[p]:lay.send_at[p] + HEADER_BYTES] = head[i]
        self.work, self.timeout = None, framing.timeout
        self.stalled = False  # a headers-only frame whose peers never answered
        self._first_round_done = False
        self._outcome = None  # (payloads, error) once completed
        self.caller_serves = False  # a late frame the serving thread leaves to the caller
        # (number, silent ranks) of an earlier frame of the same wait that waited out its
        # timeout: this one was then not waited for (its peers' frames queue behind it)
        self.queued_behind: Optional[tuple] = None

    def release(self) -> None:
        """Give the buffers back to the Framing: call once the payloads of ``wait`` are
        consumed (not needed for correctness: unreleased buffers are simply collected)."""
        if self.stalled or self._buffers is None:  # (the pending transfer still holds them)
            return
        for buf in self._buffers:
            self.framing.give_back(buf)
        self._buffers = self.send = self.recv = None

    def payload(self, p: int) -> torch.Tensor:
        """Where the payload for group rank ``p`` goes (uint8, sends[p].nbytes bytes)."""
        a = self.send_at[p] + HEADER_BYTES
        return self.send[a:a + self.sends[p].nbytes]

    def start(self) -> "Frame":
        self._post()
        self.line.unfinished.append(self)
        return self

    def _post(self) -> None:
        """Post the first round (again, after stale frames took the last one: _met_stale)."""
        lay = self.layout
        for m in lay.magic_words:  # (slots are 16-byte aligned)
            self._recv_words[m] = 0  # a slot left with no magic names a silent peer
        if lay.fits:  # every payload fits its frame: the buffer as it is
            send = self.send
        else:  # round 1 takes the first frame of each
            send = torch.cat([self.send[self.send_at[p]:self.send_at[p] + lay.in_splits[p]]
                              for p in self.peers])
        # on the group itself: its sizes and dtypes hold by construction (comm/direct.py)
        try:
            self.work = direct.all_to_all_single(self.pg, self.recv, send, lay.out_splits,
                                                 lay.in_splits, True)
        except RuntimeError as e:  # gloo refuses to post on a connection it closed
            raise self._lost(e, "", self.peers) from e
        self.framing.last_work = self.work

    def is_completed(self) -> bool:
        return self.work is None or self.work.is_completed()

    def wait(self) -> Optional[list]:
        """The received payloads (uint8, recvs[p].nbytes each; None at this rank). A
        headers-only frame (aborted, rejected) only drains what its peers send and returns
        None: the error to report is this rank's own, raised by its caller. Frames started
        before this one on its group complete first (``GroupLine.unfinished``). Where one of
        them waited out its timeout, the rest wait no longer: a silent peer costs the wait
        one timeout (an all-reduce after a timed-out one waited two: the "gave up" step of
        the call before, then its own), and a peer that comes within it leaves this frame
        its whole timeout."""
        deadline = behind = None
        while self._outcome is None:
            first = self.line.unfinished[0]
            first.queued_behind = behind
            first._settle(deadline)
            if deadline is None and first is not self and (
                    first.stalled or isinstance(first._outcome[1], PeerTimeoutError)):
                deadline = time.monotonic()
                behind = (first.number, first.silent_peers())
        if self._outcome[1] is not None:
            raise self._hand_out_error()
        return self._outcome[0]

    def _hand_out_error(self) -> BaseException:
        """This frame's error, to raise, leaving a copy without traceback for a later wait.
        An error raised holds, through its traceback, the frames it passed and their
        locals (this frame, its callers'); kept here, or in a local of a frame it passed,
        it would close a cycle that holds this frame's buffers (MiB per peer) until the
        garbage collector runs, which counts objects, not bytes: a loop of calls failing
        on a lost peer grew by one frame's buffers per call (helper 51)."""
        error = self._outcome[1]
        self._outcome = (None, _copied(error))
        return error

    def _settle(self, deadline: Optional[float]) -> None:
        """Complete this frame (its group's oldest unfinished one) and keep what its wait
        returns; its first round waits until ``deadline`` at most (``_wait_first_round``). A
        frame with payloads past one frame whose peers did not come in time joins its
        group's ``late`` frames."""
        self.line.unfinished.pop(0)
        try:
            self._outcome = (self._finish(deadline), None)
        except PeerTimeoutError as e:
            self._outcome = (None, e)
            # (one round too: a late peer whose payloads are longer sends us the rest)
            if not (self.flags or self._first_round_done):
                self.call_line.add_late(self)
        except Exception as e:  # noqa: BLE001 - raised by this frame's own wait()
            self._outcome = (None, e)

    def _finish(self, deadline: Optional[float]) -> Optional[list]:
        if not self.flags:
            return self._complete(deadline=deadline)
        try:
            self._complete(deadline=deadline)
        except ConfigMismatchError:
            pass
        except PeerError:
            self.stalled = True
        return None

    def _wait_first_round(self, deadline: Optional[float] = None) -> None:
        """Wait for the first round, this frame's timeout from now at most, and ``deadline``
        (``time.monotonic()``: set where a frame before this one waited out its timeout in
        the same ``wait``), completing meanwhile the late frames whose peers came (as the
        serving thread does, whichever takes one first, and those it leaves: they change
        this rank's state). Polls only while the group has late frames."""
        line = self.call_line
        own = time.monotonic() + self.timeout.total_seconds()
        deadline = own if deadline is None else min(deadline, own)
        if line.late:
            while line.late and not self.work.is_completed() and time.monotonic() < deadline:
                for frame in line.take_arrived(by_thread=False):
                    try:  # (its call raised already: what it receives is dropped)
                        frame._complete(late=True)
                    except (ConfigMismatchError, PeerError):
                        pass
                time.sleep(1e-3)
        self._wait(self.work, "", datetime.timedelta(
            seconds=max(deadline - time.monotonic(), 1e-3)))

    def thread_may_serve(self) -> bool:
        """Whether the serving thread may complete this late frame, its first round done:
        what came asks only for the second round, as ``_complete`` would make it. Not where
        a peer sent a first-use check (this rank may forget one: the communicator's state), a
        number past the group's count (it would be counted again), or nothing (gloo failed
        the round: the caller reports it)."""
        got = self._recv_words[self.layout.header_index]
        if self._agrees(got):
            return True
        check = OPERATIONS.index("consistency check") + 1
        return bool((got[:, 0] == MAGIC).all() and not (got[:, 1] == check).any()
                    and not (got[:, 2] > self.call_line.count).any())

    def serve_late(self) -> None:
        """On the serving thread: the second round of a late frame whose peers came (its
        call raised already: what it receives is dropped; what disagrees too)."""
        try:
            self._round_two(self._recv_words[self.layout.header_index])
        except Exception:  # noqa: BLE001 - nobody waits for this call any more; a lost
            pass           # connection shows at the group's next call

    def _complete(self, late: bool = False, deadline: Optional[float] = None) -> list:
        """The first round, checked, and the second; ``late``: a late frame's, never posted
        again (this rank posted later frames since: a frame posted now would pair with the
        peers' next ones, not with what this one should have met); ``deadline``: see
        ``_wait_first_round``."""
        self._wait_first_round(deadline)
        got = self._recv_words[self.layout.header_index]  # [peers, WORDS], a copy
        problems, posts = self.problems(got), 1
        while (problems and not late and posts <= STALE_KEPT
               and self._met_stale(got, problems)):
            self._post()
            self._wait_first_round()
            got = self._recv_words[self.layout.header_index]
            problems, posts = self.problems(got), posts + 1
        self._first_round_done = True
        if problems:  # counted alike again from here, whatever each rank was running
            seen = got[got[:, 0] == MAGIC, 2].tolist()
            self.call_line.count = max(seen + [self.call_line.count])
        if problems or not self.layout.one_round:
            self._round_two(got)
        if problems:  # (raised as made: held in a local here, it would close a cycle)
            raise self._mismatch(got, problems)
        out: list = [None] * self.world
        for p in self.peers:
            a = self.recv_at[p] + HEADER_BYTES
            out[p] = self.recv[a:a + self.recvs[p].nbytes]
        return out

    def _mismatch(self, got: np.ndarray, problems: dict) -> ConfigMismatchError:
        """The error for the disagreements ``problems`` seen in the headers ``got``."""
        lines = [f"rank {self._name(p)}: {m}" for p, msgs in problems.items() for m in msgs]
        error = ConfigMismatchError(
            f"moe_flashcomm.{self.operation}: ranks of the group disagree at "
            f"{self._where()} (seen by {self._me()}):\n  "
            + "\n  ".join(lines)
            + "\nEvery rank must make the same moe_flashcomm calls in the same order, with "
              "the same codecs, dtype, hidden size and sizes: the rows rank a sends to "
              "rank b (input_split_sizes[b] on a) must be the rows b expects from a "
              "(output_split_sizes[a] on b).")
        error.elsewhere = self._ranks_elsewhere(got)
        return error

    def _round_two(self, got: np.ndarray) -> None:
        """The rest of payloads longer than a frame, point to point, sized from the headers
        ``got`` on both ends (what a disagreeing peer sends is drained). Nothing moves to or
        from a headers-only frame (rejected, aborted): both ends know it from its header, and
        such a frame may have stopped waiting long ago (a rank that rejected its arguments
        waits 5 s), when a late peer's rest would wait for it until the timeout and gloo
        closed the connection."""
        if self.flags:
            return
        room = FRAME_BYTES - HEADER_BYTES
        what = " (the rest of a long message)"
        works = []  # (work, the peer it waits for)
        valid = (got[:, 0] == MAGIC) & ((got[:, 10] & (ABORTED | REJECTED)) == 0)
        ranks = None if self.layout.fits and not (valid & (got[:, 8] > room)).any() \
            else dist.get_process_group_ranks(self.pg)  # (point to point: global ranks)
        try:
            for i, p in enumerate(self.peers):
                if self.sends[p].nbytes > room and valid[i]:
                    a = self.send_at[p] + FRAME_BYTES
                    works.append((dist.isend(self.send[a:a + self.sends[p].nbytes - room],
                                             ranks[p], group=self.pg,
                                             tag=round_two_tag(self.number)), p))
                sent = int(got[i, 8])
                if valid[i] and sent > room:
                    rest = sent - room
                    if sent == self.recvs[p].nbytes:
                        a = self.recv_at[p] + FRAME_BYTES
                        dst = self.recv[a:a + rest]
                    else:  # drained, to keep the transport in step, then reported
                        dst = torch.empty(rest, dtype=torch.uint8)
                    # tagged with the sender's number: a first-use check (number 0) can meet
                    # another call's long message
                    works.append((dist.irecv(dst, ranks[p], group=self.pg,
                                             tag=round_two_tag(int(got[i, 2]))), p))
        except RuntimeError as e:  # gloo refuses to post on a connection it closed
            raise self._lost(e, what, [p]) from e
        for w, p in works:
            self._wait(w, what, peers=[p])

    def _met_stale(self, got: np.ndarray, problems: dict) -> bool:
        """Whether this frame's first round met, among the peers with ``problems``, "gave up"
        frames of an earlier call: peers that gave up on a call this rank completed late (or
        skipped: it rejected its arguments) left frames this rank never matched, and this
        frame met them in their place. Posted again, it meets the peers' frames of this call.
        A "gave up" frame goes to every peer alike, so every rank at this point meets the same
        ones and posts again, whatever else it sees (a disagreement shows again in the next
        round): the ranks stay paired. Before, they stayed one call apart, and once their
        numbers were counted alike again, every call mixed two calls' values with no error.
        A rejected or aborted frame posts again too (it is waited for as soon as it starts);
        a "gave up" one does not (it is settled later, after this rank's next frames went)."""
        if self.flags & GAVE_UP:
            return False
        for i, p in enumerate(self.peers):
            h = got[i]
            # (a first-use check, number 0, comes before every step of its call)
            if p in problems and h[0] == MAGIC and h[10] & GAVE_UP and (
                    h[2] < self.number or not self.number):
                return True
        return False

    def problems(self, got: np.ndarray) -> dict:
        """Peer -> what its header (a row of ``got``) says that this rank's view of the pair
        does not; empty when every header is the expected one (the steady state: one
        comparison)."""
        if self._agrees(got):
            return {}
        return {p: msgs for p, h in zip(self.peers, got.tolist())
                if (msgs := self._disagreements(p, h))}

    def _agrees(self, got: np.ndarray) -> bool:
        """Whether every header (a row of ``got``) is the one an agreeing peer sends."""
        want = self.layout.expected.copy()  # (its number column is 0)
        want[:, 2] = self.number
        return got.tobytes() == want.tobytes()  # (a third of the time of numpy's comparison)

    def _wait(self, work, what: str, timeout: Optional[datetime.timedelta] = None,
              peers: Optional[list] = None) -> None:
        """Wait for gloo's ``work``; ``peers``: those it waits for (by default, the peers
        whose header has not come)."""
        try:
            work.wait(timeout=self.timeout if timeout is None else timeout)
        except RuntimeError as e:
            raise self._lost(e, what, peers)  # (as made: see _hand_out_error)

    def _lost(self, e: RuntimeError, what: str, peers: Optional[list]) -> PeerError:
        """The error for gloo's ``e``: a PeerTimeoutError after a timeout, else a PeerError (a
        connection failed, ``e`` its cause), naming ``peers`` (or the silent ones). A
        timeout's ``elsewhere`` holds the peers whose header came and says they are in
        another call (a rejected one): a call's later steps must not wait for them, as after
        a ConfigMismatchError."""
        got = self._recv_words[self.layout.header_index]
        silent = self.silent_peers() if peers is None else peers
        named = self._name(silent) if silent else "none (a long message stalled)"
        where = (f"moe_flashcomm.{self.operation}: {self._me()}, at {self._where()}{what}: "
                 f"nothing came from ranks {named}")
        if "timed out" not in str(e).lower():
            error = PeerError(f"{where}; the connection failed ({e})")
            error.__cause__ = e  # (as ``raise ... from e``)
            return error
        why = ("They did not make this call, made another collective, or are held in a call "
               "on another group (a first use of a configuration is checked before the call "
               "returns, async_op=True too); every rank must make the same calls in the same "
               "order." if not what else  # (else the second round)
               "Their headers came in this call: they stopped waiting for it (their own "
               "timeout), and did not make their next call on the group within this one "
               "(or destroyed the group).")
        if self.queued_behind is not None and silent and not what:  # not waited for
            number, before = self.queued_behind
            if set(silent) <= set(before):
                where += (f" (silent since exchange #{number} of this group, which waited out "
                          "its timeout on them)")
            else:
                # gloo runs a group's exchanges in order: what the others sent may wait
                # behind the earlier exchange's (they need not be silent)
                where += (f", not waited for: exchange #{number} of this group, started "
                          f"before this one, waited out its timeout"
                          + (f" on ranks {self._name(before)}" if before else ""))
                why = ("Only the ranks named there are known to be silent: what the others "
                       "sent may wait behind that exchange (gloo runs a group's exchanges in "
                       "order).")
        else:
            where += f" within {self.timeout.total_seconds():g} s"
        error = PeerTimeoutError(
            f"{where}. {why} "
            "(Communicator(timeout=...) or $MOE_FLASHCOMM_TIMEOUT_S sets the wait.)")
        error.elsewhere = self._ranks_elsewhere(got)
        error.__suppress_context__ = True  # (as ``raise ... from None``: gloo's text adds nothing)
        return error

    def silent_peers(self) -> list:
        """The peers (ranks of ``pg``) whose header has not come."""
        got = self._recv_words[self.layout.header_index]
        return [p for p, magic in zip(self.peers, got[:, 0]) if magic != MAGIC]

    def _group_rank(self, p: int) -> int:
        """Rank p of ``pg`` as the call's group numbers it (``names``)."""
        return p if self.names is None else self.names[1][p]

    def _name(self, ranks) -> str:
        """Rank(s) p of ``pg`` (an int or a list) as messages name them: group rank(s) of the
        call's group, with their global ranks where it is a subgroup."""
        group = self.pg if self.names is None else self.names[0]
        ranks = (self._group_rank(ranks) if isinstance(ranks, int)
                 else [self._group_rank(p) for p in ranks])
        return f"{ranks}{global_note(group, ranks)}"

    def _me(self) -> str:
        group, world = (self.pg, self.world) if self.names is None else (
            self.names[0], dist.get_world_size(self.names[0]))
        me = self._group_rank(self.rank)
        return f"group rank {me} of {world}{global_note(group, me)}"

    def _where(self) -> str:
        return f"exchange #{self.number} of this group" if self.number else "a first-use check"

    def _ranks_elsewhere(self, got: np.ndarray) -> frozenset:
        """The call's group ranks whose headers (rows of ``got``) are of another call."""
        return frozenset(self._group_rank(p) for p, h in zip(self.peers, got.tolist())
                         if self._elsewhere(h))

    def _elsewhere(self, h: list) -> bool:
        """Header ``h`` is of a rank in another call: another operation, or its arguments
        rejected (it takes no part in this call's later steps)."""
        return h[0] == MAGIC and (h[1] != OPERATIONS.index(self.operation) + 1
                                  or bool(h[10] & REJECTED))

    def _peer_check(self, p: int, h: list) -> Optional[str]:
        """What the communicator says of the first-use check that group rank p makes (its
        header ``h``) while this rank exchanges (``Framing.on_peer_check``)."""
        n, hook = h[8], self.framing.on_peer_check
        if hook is None or h[10] or n % 8 or not 0 < n <= FRAME_BYTES - HEADER_BYTES:
            return None
        a = self.recv_at[p] + HEADER_BYTES
        return hook(tuple(self.recv[a:a + n].view(torch.int64).tolist()))

    def _disagreements(self, p: int, h: list) -> list:
        """What group rank p's header ``h`` says that this rank's view of the pair does not."""
        if h[0] != MAGIC:
            return ["its message carries no moe_flashcomm header: it ran another collective "
                    "here, or another version of moe_flashcomm"]
        mine = self.recvs[p]
        out = []
        op = OPERATIONS[h[1] - 1] if 1 <= h[1] <= len(OPERATIONS) else f"operation {h[1]}"
        if h[10] & REJECTED:
            return [f"it rejected its {op} (its own error says why: its arguments, an error "
                    "of its own during the call, or its "
                    "communicator was closed)"]
        if h[10] & GAVE_UP and (h[2] < self.number or not self.number):
            return [f"it left this frame (exchange #{h[2]}, its {op}) for a rank that came late "
                    "to that earlier call, and this rank's frame met it in place of that "
                    "rank's frame of this call (a frame started asynchronously meets such "
                    f"frames only at its wait; more than {STALE_KEPT} in a row are not passed)"]
        if (op != self.operation and h[9] != self.detail and op in NUMEL_OPERATIONS
                and self.operation in NUMEL_OPERATIONS
                and HIERARCHICAL_STAGE in (op, self.operation)):
            # two all-reduces that took different paths for their sizes (an empty tensor,
            # one the gate sends to the backend): the numel is what differs
            return [f"it reduces {h[9]} values; this rank reduces {self.detail} (so it runs "
                    f"{op} while this rank runs {self.operation})"]
        if op != self.operation:
            said = f"it runs {op} while this rank runs {self.operation}"
            note = self._peer_check(p, h) if op == "consistency check" else None
            return [said if note is None else f"{said}: {note}"]
        if h[10] & GAVE_UP:
            return [f"it stopped waiting for a silent rank earlier in this call (exchange "
                    f"#{h[2]}) and ended it: a rank (this one, or one whose error names it) "
                    "came to the call after that rank's timeout (MOE_FLASHCOMM_TIMEOUT_S)"]
        if h[10] & FAILED:
            return [f"it failed on its own earlier in this call (exchange #{h[2]}; out of "
                    "memory, ...): its own error says why"]
        if h[10] & ABORTED:
            return [f"it found ranks disagreeing earlier in this call (exchange #{h[2]}); "
                    "its error names them"]
        if h[3] != (p | self.world << 32):  # (ranks of pg: a stage group's own numbers)
            unit = "group" if self.names is None else "stage"
            return [f"it is {unit} rank {h[3] & 0xFFFFFFFF} of {h[3] >> 32}, not {unit} rank "
                    f"{p} of {self.world}: the groups differ"]
        if h[2] != self.number:
            out.append(f"it is at exchange #{h[2]} of this group, this rank at #{self.number}: "
                       "a rank skipped or repeated a call")
        if h[4] != (dtype_code(self.dtype) | self.hidden << 8):
            code = h[4] & 0xFF
            dt = DTYPES[code - 1] if 1 <= code <= len(DTYPES) else "another dtype"
            row_counts = (dt == torch.int64, self.dtype == torch.int64)
            if self.operation in ROW_COUNT_MEETS and row_counts[0] != row_counts[1]:
                # (a hierarchical call given split sizes begins with an exchange of its row
                # counts, int64; the first stage names the rows' dtype, a token dtype)
                who = ("it passed split sizes and this rank did not" if row_counts[0]
                       else "this rank passed split sizes and it did not")
                return out + [f"{who} (a hierarchical all_to_all given them begins with an "
                              "exchange of row counts): pass them on every rank or on none"]
            if self.operation in NUMEL_OPERATIONS:
                if h[9] == self.detail:  # (else the numel, below; the rest follows from it)
                    return out + [f"it sends {_reduced(dt, h[4] >> 8)}; this rank sends "
                                  f"{_reduced(self.dtype, self.hidden)}"]
            else:
                out.append(f"it sends {dt} rows of hidden size {h[4] >> 8}; this rank has "
                           f"{self.dtype} rows of hidden size {self.hidden}")
        if h[9] != self.detail:
            if self.operation in NUMEL_OPERATIONS:  # (the sizes that differ follow from it)
                return out + [f"it reduces {h[9]} values; this rank reduces {self.detail}"]
            if self.operation in ROW_SHAPE_OPERATIONS:
                out.append("its rows of dim 0 have another shape (x.shape[1:-1]) than this "
                           "rank's")
            else:  # (a digest of them: the hierarchical stages)
                out.append("its codecs, size gate or row shape (x.shape[1:-1]) differ from "
                           "this rank's")
        if h[6] != mine.rows:
            out.append(f"it sends {h[6]} rows to this rank; this rank expects {mine.rows} "
                       f"from it")
        if h[7] != self.sends[p].rows:
            out.append(f"it expects {h[7]} rows from this rank; this rank sends "
                       f"{self.sends[p].rows} to it")
        if not out and h[5] != mine.wire:
            out.append(f"it sends {wire_text(h[5])}; this rank expects {wire_text(mine.wire)} "
                       "(the codecs differ)")
        if not out and h[8] != mine.nbytes:
            out.append(f"it sends {h[8]} bytes; this rank expects {mine.nbytes}")
        return out


def all_to_all_single(framing: Framing, pg, rank: int, world: int, operation: str,
                      out: torch.Tensor, inp: torch.Tensor, out_splits: list,
                      in_splits: list, detail: int = 0, rows: Optional[tuple] = None,
                      records: Optional[tuple] = None, wait: bool = True,
                      names: Optional[tuple] = None, label: Optional[tuple] = None,
                      **frame_args) -> direct.Done:
    """``dist.all_to_all_single(out, inp, out_splits, in_splits, group=pg)`` for CPU tensors,
    framed (splits in items of the tensors' dtype, rows in the header); synchronous, its
    result stands in for the work of an asynchronous call. ``rows``: (sent, received) per
    group rank, the rows in the headers in place of the splits (a stage of a larger
    exchange checks that exchange's rows, pair by pair). ``records``: the uint8 items are
    records, (dtype, hidden, record bytes, wire_code) named in the headers, so that ranks
    whose dtypes or codecs differ raise even where their records have the same size.
    ``frame_args``: Frame's ``number``, ``counter`` (Framing.numbering), ``aborted`` and
    ``failed``. ``wait=False``: an aborted frame after a timeout, only started
    (``peers_answered``). ``names``: Frame's.
    ``label``: (dtype, hidden) of the rows the bytes carry, named in the headers in place of
    the items' dtype (a hierarchical all-to-all's stages: ranks whose rows differ are told
    how)."""
    unit = inp.element_size()
    isrc, osrc = inp.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
    ioff = [i * unit for i in offsets(in_splits)]
    ooff = [i * unit for i in offsets(out_splits)]
    sends, recvs = item_legs(in_splits, unit, rank), item_legs(out_splits, unit, rank)
    dtype, hidden = label if label is not None else (inp.dtype, 0)
    if records is not None:
        dtype, hidden, rb, code = records
        if rows is None:
            rows = ([n // rb for n in in_splits], [n // rb for n in out_splits])
        sends, recvs = ([None if leg is None else leg._replace(wire=code) for leg in legs]
                        for legs in (sends, recvs))
    if rows is not None:
        sends, recvs = ([None if leg is None else leg._replace(rows=n) for leg, n in zip(legs, r)]
                        for legs, r in zip((sends, recvs), rows))
    frame = Frame(framing, pg, rank, world, operation, dtype, hidden, sends, recvs, detail,
                  gave_up=not wait, names=names, **frame_args)
    for p in frame.peers:
        frame.payload(p).copy_(isrc[ioff[p]:ioff[p] + frame.sends[p].nbytes])
    frame.start()
    if not wait:  # (a headers-only frame: nothing to copy out)
        return direct.Done()
    got = frame.wait()
    if got is not None:  # (None: headers only)
        n = in_splits[rank] * unit
        osrc[ooff[rank]:ooff[rank] + n].copy_(isrc[ioff[rank]:ioff[rank] + n])
        for p in frame.peers:
            osrc[ooff[p]:ooff[p] + recvs[p].nbytes].copy_(got[p])
    frame.release()
    return direct.Done()


def gather_words(framing: Framing, pg, rank: int, world: int, operation: str,
                 words: torch.Tensor) -> torch.Tensor:
    """Every rank's ``words`` (int64 [n], the same n on every rank) as a table [world, n], by
    one framed exchange: a rank that does not take part is named after the timeout."""
    leg = Leg(words.numel(), words.numel() * 8)
    legs = [None if p == rank else leg for p in range(world)]

    def start() -> Frame:
        frame = Frame(framing, pg, rank, world, operation, torch.int64, words.numel(), legs, legs)
        for p in frame.peers:
            frame.payload(p).copy_(words.view(torch.uint8))
        return frame.start()
    frame = start()
    try:
        got = frame.wait()
    except PeerTimeoutError:
        if operation == "consistency check":
            # the check again, left posted (a later wait settles it): a peer that comes late
            # makes the check with the abandoned frame, and its call's next step meets this
            # one, so that it raises in that call and forgets the check it passed alone
            # (Framing.on_peer_check): both check again at their next call
            start()
        raise
    table = torch.stack([words if p == rank else got[p].view(torch.int64) for p in range(world)])
    frame.release()
    return table


def reject(framing: Framing, pg, rank: int, world: int, operation: str,
           number: Optional[int] = None, counter=None) -> None:
    """This rank cannot make its call (its arguments were rejected, its communicator was
    closed, or it failed on its own during the call): headers only, flagged, in place of the
    call's exchange (or the step it owes), so the peers waiting in it
    raise at once rather than after the timeout, or pairing it with this rank's next call.
    Whatever they sent is drained; their errors are theirs to report. ``number``, ``counter``:
    the call's (Framing.numbering), where the call failed on this rank after it drew its
    number: ``operation`` is then the step it owes its peers (who make no later step of the
    call, meeting a rank in another state)."""
    legs = [None if p == rank else Leg(0, 0) for p in range(world)]
    frame = Frame(framing, pg, rank, world, operation, torch.uint8, 0, legs, legs,
                  rejected=True, number=number, counter=counter)
    # peers in the call answer at once; peers that are not (a call on this rank alone)
    # must not hold up this rank's own error for long
    frame.timeout = min(frame.timeout, datetime.timedelta(seconds=REJECT_WAIT_S))
    try:
        frame.start().wait()
    except PeerError:  # a lost connection: the caller's own error is the one to report
        return
    frame.release()
