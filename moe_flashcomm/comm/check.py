"""Detect ranks that call a collective with different configurations.

On the first call with a new configuration key, every rank all-gathers one int64 hash per
field (one small collective), compares, and records the key in the communicator's table of
verified keys (key -> the words sent). A mismatch raises the same kind of error on every
rank, naming the fields, instead of a hang or garbage bytes. Over gloo the gather is a
framed exchange (comm/frame.py), so a rank checking while another exchanges meets it and
both raise.
Later calls are checked by the headers of the exchanges themselves.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist


class ConfigMismatchError(RuntimeError):
    """Ranks of a group called a collective with different configurations. ``elsewhere``:
    the ranks seen running another call (another operation, or rejecting their arguments),
    which take no part in this call's later steps (a framed exchange sets it)."""
    elsewhere: frozenset = frozenset()


def hash63(value: Any) -> int:
    return _hash_text(repr(value))


def _hash_text(text: str) -> int:
    """hash63 of a value whose repr is ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _named(word: int, value: Any, used: set) -> str:
    """A peer's value of a field, from its hash ``word``, where this rank can tell it: among
    the values this rank used for the field (``used``: reprs) and, for a bool or a dtype,
    the others of its kind; else "something else"."""
    texts = set(used)
    if isinstance(value, bool):
        texts |= {"True", "False"}
    elif isinstance(value, torch.dtype):
        texts |= {repr(t) for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                    torch.int64, torch.int32, torch.uint8)}
    for text in texts:
        if _hash_text(text) == word:
            return text
    return "something else"


# Every check gathers the same number of words, whatever it checks, so two ranks running
# different checks (one making a communicator, the other calling) meet in one collective
# and both raise instead of aborting on mismatched sizes.
MAX_FIELDS = 15


# The first word of a rank whose arguments for the checked call were rejected (reject_check)
REJECTED = hash63("moe_flashcomm: this rank rejected its arguments")


def gather_table(words: list, group, device: torch.device, framing) -> torch.Tensor:
    """Every rank's int64 ``words`` (as many on every rank), a table [world, len(words)], for
    a first-use step: framed on CPU (as a consistency check: not counted among the group's
    exchanges), else one all_gather."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor(words, dtype=torch.int64, device=device)
    if framing is not None and device.type == "cpu":
        from .frame import gather_words  # (frame.py imports this module)
        return gather_words(framing, group, rank, world, "consistency check", mine)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).cpu()


def _gather(words: list, group, device: torch.device, framing) -> torch.Tensor:
    """Every rank's check words (``padded``), a table [world, 1 + MAX_FIELDS]."""
    return gather_table(padded(words), group, device, framing)


def padded(words: list) -> list:
    """A check's words as they travel: 1 + MAX_FIELDS of them."""
    return words + [0] * (1 + MAX_FIELDS - len(words))


def reject_check(group: Optional[dist.ProcessGroup], device: torch.device, framing=None) -> None:
    """This rank rejected its arguments for a call whose first step is a consistency check
    (making a Communicator): take part in the check marked so, so that the other ranks raise
    at once instead of waiting for this one; the caller then raises its own error. What the
    others sent is not this rank's to report."""
    try:
        _gather([REJECTED], group, device, framing)
    except RuntimeError:  # (a disagreement or a silent peer seen while marking)
        pass


def _checking(error: ConfigMismatchError, what: str, fields: Mapping[str, Any]
              ) -> ConfigMismatchError:
    """``error`` (peers in another call met at a first-use check), naming the configuration
    this rank checks. (Made here: a local naming it in the frame that raises it would close
    a cycle holding the frames below and their buffers until the garbage collector runs.)"""
    named = ConfigMismatchError(f"{error}\nThis rank was making the first-use check of {what} "
                                "with " + ", ".join(f"{k}={v!r}" for k, v in fields.items()))
    named.elsewhere = error.elsewhere
    return named


def check_consistent(fields: Mapping[str, Any], group: Optional[dist.ProcessGroup],
                     device: torch.device, verified: dict,
                     what: str = "moe_flashcomm.all_to_all", framing=None) -> None:
    """Raise ConfigMismatchError on every rank unless all ranks of ``group`` run the same
    check (``what``) with equal ``fields`` (compared by repr). Collective on the first call
    per key (remembered in ``verified``, the communicator's: key -> the words sent, which
    a peer checking them again names, Communicator._peer_check), free after.
    ``framing``: the communicator's (comm/frame.py), for a framed exchange on CPU."""
    key = (what,) + tuple((k, repr(v)) for k, v in fields.items())
    if key in verified:
        return
    assert len(fields) <= MAX_FIELDS, len(fields)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    words = [hash63((what, tuple(fields)))] + [hash63(v) for v in fields.values()]
    try:
        table = _gather(words, group, device, framing)
    except ConfigMismatchError as e:
        if not e.elsewhere:
            raise
        # peers in a call, not a check: they made theirs before, and name the fields new
        # to them; this rank names the configuration it checks
        raise _checking(e, what, fields) from None
    kind = table[:, 0]
    rejected = [q for q in range(world) if kind[q] == REJECTED]
    if rejected:
        raise ConfigMismatchError(
            f"{what}: ranks {rejected} of the group rejected their arguments for this call "
            f"(their own errors say why; group rank {rank} of {world}). Every rank must pass "
            "valid arguments, the same on every rank.")
    if bool((kind != kind[rank]).any()):
        other = [q for q in range(world) if kind[q] != kind[rank]]
        # what the communicator says of each peer's check: where this rank made that very
        # check before, the peer missed it (it came late), and this rank forgets it, so that
        # both make it again at their next call instead of disagreeing at every call
        # (framed only: over NCCL a rank that forgot would make its next check alone)
        hook = framing.on_peer_check if framing is not None and device.type == "cpu" else None
        notes = [] if hook is None else [(q, hook(tuple(table[q].tolist()))) for q in other]
        raise ConfigMismatchError(
            f"{what}: ranks {other} of the group ran a different moe_flashcomm operation at "
            f"this point (group rank {rank} of {world})"
            + "".join(f"\n  rank {q}: {note}" for q, note in notes if note)
            + "\nEvery rank must make the same calls "
            "in the same order, with the same group, topology and size gate (a different "
            "topology or gate makes a different communicator), codecs, shapes and dtype.")
    problems = []
    for i, (name, value) in enumerate(fields.items(), start=1):
        column = table[:, i]
        if bool((column != column[0]).any()):
            same = [q for q in range(world) if column[q] == column[rank]]
            used = {text for k in verified if k[0] == what for field, text in k[1:]
                    if field == name}
            theirs = {}  # the peers' values, as this rank can tell them
            for q in range(world):
                if column[q] != column[rank]:
                    theirs.setdefault(_named(int(column[q]), value, used), []).append(q)
            problems.append(f"{name}: this rank has {value!r} (as do ranks {same}); "
                            + "; ".join(f"ranks {qs} have {text}" for text, qs in theirs.items()))
    if problems:
        raise ConfigMismatchError(
            f"{what}: ranks of the group disagree (group rank {rank} of {world}):\n  "
            + "\n  ".join(problems)
            + "\nEvery rank must pass the same codec, grad codec, hidden size (x.shape[1:]), "
              "dtype, algorithm, chunks, topology and size gate.")
    verified[key] = tuple(padded(words))

