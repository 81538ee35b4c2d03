"""Split sizes: validation and the per-chunk partition of each peer's rows. No tensors moved."""
from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Optional, Sequence, Union

import torch

SplitSizes = Union[Sequence[int], torch.Tensor, None]
NOT_SPLIT_SIZES = (Mapping, Set, str, bytes)  # iterable, but no list of sizes (a dict: its keys)


def integer_dtype(dtype: torch.dtype) -> bool:
    """Whether a tensor of ``dtype`` may hold split sizes (not bool, floating or complex:
    2.0 and 2+0j equal 2, but are refused)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_splits(name: str, sizes: SplitSizes, world: int) -> Optional[list[int]]:
    """``sizes`` as a list of ``world`` non-negative ints (None stays None)."""
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        if sizes.dim() != 1 or not integer_dtype(sizes.dtype):
            raise ValueError(f"{name} must be a 1-D integer tensor or a list of ints, "
                             f"got a {sizes.dtype} tensor of shape {tuple(sizes.shape)}")
        sizes = sizes.tolist()
    try:
        if isinstance(sizes, NOT_SPLIT_SIZES):
            raise TypeError
        out = list(sizes)
    except TypeError:
        raise TypeError(f"{name} must be a list of ints (one per rank of the group) or None, "
                        f"got {type(sizes).__name__}") from None
    if len(out) != world:
        raise ValueError(f"{name} must have one entry per rank of the group ({world}), "
                         f"got {len(out)}: {out}")
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                v = out[i] = int(v.__index__())  # numpy / 0-d tensor ints
            except (AttributeError, TypeError):
                raise TypeError(f"{name}[{i}] must be an int, got {v!r}") from None
        if v < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {v}")
    return out


def check_chunks(chunks) -> None:
    """``chunks``: None (chosen by size) or an int >= 1, the same on every rank."""
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int)
                               or chunks < 1):
        raise ValueError(f"chunks must be an int >= 1 or None, got {chunks!r}")


def resolve_splits(rows: int, output_split_sizes: SplitSizes, input_split_sizes: SplitSizes,
                   world: int, rank: int) -> tuple[list[int], list[int]]:
    """Row counts (dim 0 of ``x``) to send to / receive from each rank, routed as
    ``torch.distributed.all_to_all_single``: a missing side is an even split of ``rows``."""
    out_s = check_splits("output_split_sizes", output_split_sizes, world)
    in_s = check_splits("input_split_sizes", input_split_sizes, world)
    if in_s is None:
        if rows % world:
            raise ValueError(f"x.shape[0]={rows} is not divisible by the group size {world}: "
                             "pass input_split_sizes")
        in_s = [rows // world] * world
    elif sum(in_s) != rows:
        raise ValueError(f"input_split_sizes sums to {sum(in_s)} but x.shape[0] is {rows}")
    if out_s is None:
        if rows % world:
            raise ValueError(f"x.shape[0]={rows} is not divisible by the group size {world}: "
                             "pass output_split_sizes")
        out_s = [rows // world] * world
    if in_s[rank] != out_s[rank]:
        raise ValueError(f"input_split_sizes[{rank}]={in_s[rank]} must equal "
                         f"output_split_sizes[{rank}]={out_s[rank]}: both count the rows "
                         f"rank {rank} sends to itself")
    return in_s, out_s


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: where each peer's rows start."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def chunk_range(n: int, k: int, chunks: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``k`` of ``chunks`` of a peer's ``n`` rows: a pure
    function of (n, k, chunks), so a sender and its receiver agree."""
    return n * k // chunks, n * (k + 1) // chunks
