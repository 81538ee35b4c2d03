"""Collectives issued on the process group object itself, for hot paths that repeat a call
whose arguments were validated when it was first prepared (membership, dtypes, sizes).

``torch.distributed``'s functions check and log every call in Python before they reach the
group's backend: about 3 us of host time per call on a CPU where the whole collective
issues in 6 us. Back-to-back small collectives are bound by host time (docs/benchmarks.md,
"Small and mid-size messages"), so the calls that stand in for a plain NCCL collective (the
size gate's bf16 path, the passthrough codec) skip that layer: what they add to NCCL's host
time is our own lookups, not a second round of checks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch.compile: the public calls test ``compiling()`` (0.06 us) and, while dynamo traces
# them, hand themselves to ``untraced``: a graph break, so the call runs eagerly between the
# compiled graphs, as DeepSpeed's own all-to-all does. Dynamo cannot trace the transport's
# host state (plans, frames, numpy headers, the process group object); a wrapper of
# torch.compiler.disable on every call would cost 0.5-1.2 us of host time each. Dynamo's
# own flag, not torch.compiler.is_compiling: that one is also set for non-strict
# torch.export and for code that runs eagerly during a compile, where ``untraced`` is a
# plain call and the public call would hand itself over again and again.
compiling = torch.compiler.is_dynamo_compiling


@torch.compiler.disable
def untraced(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, outside any graph torch.compile is tracing."""
    return fn(*args, **kwargs)


def _options(kind, async_op: bool):
    # asyncOp as torch.distributed sets it per call: a synchronous NCCL collective then runs on
    # the caller's stream, with no side stream, events or work tracking to pay for on the host
    opts = kind()
    if hasattr(opts, "asyncOp"):  # torch >= 2.8
        opts.asyncOp = async_op
    return opts


_A2A = {a: _options(dist.AllToAllOptions, a) for a in (False, True)}
_ALL_REDUCE = _options(dist.AllreduceOptions, False)  # sum


class Done:
    """The work of a call that completed before it returned (for ``async_op=True`` callers)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def process_group(group):
    """``group``, None as the default group (resolved per call: the default group may have
    been destroyed and created again)."""
    return group if group is not None else dist.group.WORLD


def _known() -> Optional[dict]:
    """torch.distributed's table of the process groups it knows (private; None: a torch
    without it)."""
    return getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)


def is_live(group) -> bool:
    """Whether torch.distributed still knows ``group`` (None: the default group). A group
    destroyed (``destroy_process_group``) keeps its sockets, so a call on it may run on one
    rank and fail on another: callers refuse it. A dict lookup (0.2 us)."""
    pg, known = process_group(group), _known()
    if known is not None:
        return pg in known
    try:
        dist.get_process_group_ranks(pg)
        return True
    except (KeyError, ValueError, RuntimeError, AttributeError):
        return False


def live_groups() -> list:
    """The process groups torch.distributed currently knows (empty when not initialised)."""
    if not dist.is_initialized():
        return []
    known = _known()
    return list(known) if known is not None else [dist.group.WORLD]


def all_to_all_single(group, out, x, out_splits: list, in_splits: list, async_op: bool):
    """``dist.all_to_all_single(out, x, out_splits or None, in_splits or None, group,
    async_op=async_op)`` (``[]``: even splits); the work when ``async_op``, else None."""
    work = process_group(group).alltoall_base(out, x, out_splits, in_splits, _A2A[async_op])
    if async_op:
        return work
    if work is not None:  # (a backend that synchronized itself returns none)
        work.wait()
    return None


def all_reduce(group, x) -> None:
    """``dist.all_reduce(x, group=group)`` (sum, synchronous like it)."""
    work = process_group(group).allreduce([x], _ALL_REDUCE)
    if work is not None:
        work.wait()
