"""Padding-free exchanges for DeepSpeed's ``MOELayer`` (the ``skip_padding`` field).

DeepSpeed exchanges the whole capacity-padded ``[E, C, M]`` tensor (E experts, C capacity
slots each). Which slots hold a token is decided by the gate, and in DeepSpeed 0.19.8 every
gate fills each expert's slots from 0 upward, without holes (deepspeed/moe/sharded_moe.py):

* ``top1gating``: the kept routes are chosen first (``topk`` over the mask, at random with
  ``use_rts``, by capacity), then ``locations1 = cumsum(mask1) - 1`` over the *kept* mask:
  slots 0 .. kept-1. With ``drop_tokens=False`` the capacity is the largest count, so nothing
  is dropped. Tutel's ``fast_cumsum_sub_one`` is the same cumulative sum.
* ``top2gating``: first choices take ``cumsum(mask1) - 1``, second choices follow them at
  ``count1 + cumsum(mask2) - 1``; ``drop_tokens`` drops the routes at or past C, so the kept
  ones are the prefix 0 .. min(count1 + count2, C) - 1.
* ``topkgating``: ``drop_policy="probs"`` (the default) masks first and then takes
  ``cumsum(mask) - 1``; ``"position"`` takes the cumulative sum and drops slots >= C; without
  ``drop_tokens`` the cumulative sum of the whole mask. A prefix in every case.

Every layer forward calls its gate with ``sparse_routes=True``, which returns each route's
expert (-1 where dropped) and slot. The number of slots sent for expert e is
``1 + the largest slot of a kept route to e`` (0 without one): exact whatever the filling
order (every filled slot is below it, and the rest of the [E, C, M] tensor is never read:
zero rows on dispatch, rows the combine never gathers, gradients of rows nothing reads);
with the prefix filling above it is exactly the number of kept routes, so no zero row is sent.

The receiver needs the counts of its senders, so the forward makes one small all-to-all of
the E counts right after the gate, and one copy of them to the host (the split sizes of the
uneven exchange). Each count carries its rank's capacity C in its high 32 bits (one add; no
other message), so every rank learns every rank's C, and ranks whose gates sized different
capacities (``drop_tokens`` sizes C from each rank's own token count) all raise alike before
any exchange: the padded exchange cannot pair them either. DeepSpeed's forward already
synchronizes with the host there (``C = int(C)`` just after the gate); on CUDA the counts are
copied asynchronously before that point, so that synchronization covers them. The same counts serve all four exchanges: the combine and the
dispatch's gradient go back the way the dispatch came.
"""
from __future__ import annotations

from typing import Optional

import torch


def filled_slots(indices: torch.Tensor, locations: torch.Tensor, experts: int) -> torch.Tensor:
    """[E] int64, on the device: per expert, 1 + the largest slot a kept route occupies (0
    for none). ``indices`` / ``locations``: [k, S] from a DeepSpeed gate's sparse routes
    (expert index, -1 where the route was dropped; slot in the expert's capacity)."""
    idx = indices.reshape(-1).long()
    loc = locations.reshape(-1).long()
    kept = idx >= 0
    out = torch.zeros(experts + 1, dtype=torch.long, device=idx.device)
    out.scatter_reduce_(0, torch.where(kept, idx, experts), torch.where(kept, loc + 1, 0), "amax")
    return out[:experts]


class _Gather(torch.autograd.Function):
    """Rows ``index`` of a 2-D tensor; backward: the gradient copied into those rows of zeros
    (a copy, not an add: gradients keep every bit, signed zeros included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _Scatter.apply(grad, index, ctx.rows), None


class _Scatter(torch.autograd.Function):
    """``rows`` rows of zeros with ``x`` copied into rows ``index``; backward: the gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros((rows,) + x.shape[1:]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _Gather.apply(grad.contiguous(), index), None, None


def _slot_rows(counts: torch.Tensor, capacity: int, total: int) -> torch.Tensor:
    """Row indices of the flat [E * C] tensor holding ``counts[e]`` slots of expert e, in
    order: e * C + 0 .. e * C + counts[e] - 1 (on the device, without a host sync)."""
    experts = counts.shape[0]
    starts = torch.arange(experts, device=counts.device) * capacity - (counts.cumsum(0) - counts)
    return (torch.repeat_interleave(starts, counts, output_size=total)
            + torch.arange(total, device=counts.device))


CAPACITY_SHIFT = 32  # a count's high bits carry its sender's capacity (counts are below 2^32)
COUNT_MASK = (1 << CAPACITY_SHIFT) - 1


class RouteCounts:
    """This rank's filled slots per expert and those of its senders, from one forward's gate:
    ``mine[e]`` (this rank's tokens for expert e), ``theirs[s * L + j]`` (what group rank s
    sends to this rank's j-th local expert): the row layout of the received [E, C, M].
    Made from ``received``, the counts as exchanged, each with its sender's capacity in the
    high bits (``theirs`` keeps the counts alone)."""

    def __init__(self, mine: torch.Tensor, received: torch.Tensor) -> None:
        self.mine, self.theirs = mine, received & COUNT_MASK
        both = torch.cat([mine, received])
        if both.is_cuda:  # copied now; DeepSpeed's own synchronization after the gate covers it
            self._host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self._host.copy_(both, non_blocking=True)
            self._ready: Optional[torch.cuda.Event] = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = both, None

    @classmethod
    def exchange(cls, mine: torch.Tensor, capacity, exchange_counts) -> "RouteCounts":
        """The counts of this rank's gate (``mine`` [E] on its device, ``capacity`` C as
        the gate returned it) and its senders', by ``exchange_counts`` (the layer's
        communicator's)."""
        return cls(mine, exchange_counts(torch.add(mine, capacity, alpha=1 << CAPACITY_SHIFT)))

    def host(self) -> tuple[list, list, list]:
        """(mine, theirs, the capacity each of theirs carried) as lists."""
        if self._ready is not None:
            self._ready.synchronize()
        counts = self._host.tolist()
        experts = self.mine.shape[0]
        received = counts[experts:]
        return (counts[:experts], [n & COUNT_MASK for n in received],
                [n >> CAPACITY_SHIFT for n in received])

    def plan(self, shape: torch.Size, world: int) -> "SlotPlan":
        return SlotPlan(self, shape, world)


class SlotPlan:
    """The uneven exchanges of one forward: which rows of the [E, C, M] tensors go, and the
    split sizes. The dispatch sends this rank's filled slots (``send``) and receives its
    senders' (``recv``); the combine and the dispatch's gradient the other way round."""

    def __init__(self, counts: RouteCounts, shape: torch.Size, world: int) -> None:
        experts, capacity = shape[0], shape[1]
        mine, theirs, carried = counts.host()
        if len(mine) != experts or experts % world:
            raise ValueError(f"moe_flashcomm skip_padding: {len(mine)} expert counts for the "
                             f"exchanged tensor {tuple(shape)} of {world} ranks")
        local = experts // world
        capacities = carried[::local]  # one per group rank
        if len(set(capacities)) > 1:  # (every rank sees every capacity: all raise alike)
            raise ValueError(
                f"moe_flashcomm skip_padding: the gates of the expert-parallel group's ranks "
                f"sized different capacities, {capacities} by group rank. DeepSpeed sizes the "
                "capacity from each rank's own token count: with drop_tokens from it, k, "
                "capacity_factor (eval_capacity_factor in eval mode) and min_capacity; "
                "without, as the group's largest expert load, capped at the rank's token "
                "count. Give every rank as many tokens, with the same gate settings and mode "
                "(the padded exchange cannot pair such ranks either)")
        if capacities != [capacity] * world or max(mine + theirs) > capacity:
            raise ValueError(f"moe_flashcomm skip_padding: the gate's routes (counts {mine}, "
                             f"{theirs}, capacities {capacities}) do not fit the exchanged "
                             f"tensor {tuple(shape)} of {world} ranks")
        self.rows = experts * capacity
        self.send_splits = [sum(mine[p * local:(p + 1) * local]) for p in range(world)]
        self.recv_splits = [sum(theirs[s * local:(s + 1) * local]) for s in range(world)]
        self.send_rows = _slot_rows(counts.mine, capacity, sum(mine))
        self.recv_rows = _slot_rows(counts.theirs, capacity, sum(theirs))
        self.stock_slots = (experts - local) * capacity  # slots the padded exchange sends to others
        self.shape = shape

    def pack(self, x: torch.Tensor, direction: str) -> tuple[torch.Tensor, list, list]:
        """(the filled rows of ``x`` [E, C, M] as [n, M], input splits, output splits)."""
        rows = self.send_rows if direction == "dispatch" else self.recv_rows
        flat = x.reshape(self.rows, x.shape[-1])  # (not -1: capacity 0 leaves no rows)
        if direction == "dispatch":
            return _Gather.apply(flat, rows), self.send_splits, self.recv_splits
        return _Gather.apply(flat, rows), self.recv_splits, self.send_splits

    def unpack(self, y: torch.Tensor, direction: str) -> torch.Tensor:
        """The received rows ``y`` placed into zeros of the stock output's shape."""
        rows = self.recv_rows if direction == "dispatch" else self.send_rows
        return _Scatter.apply(y, rows, self.rows).view(self.shape)
