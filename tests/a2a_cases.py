"""Inputs, split matrices and expected outputs shared by the all-to-all tests
(tests/test_all_to_all.py, tests/test_hierarchical.py).

The reference codec is the specification: what a rank must receive from a peer is
``reference.decode(reference.encode(rows))`` of that pair's codec, its own rows exactly.
"""
from __future__ import annotations

import torch

from moe_flashcomm.codec import CodecConfig, reference

SPLIT_KINDS = ("even", "uneven", "zeros", "empty")


def make_input(src: int, rows: int, tail: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rank ``src``'s input of case ``seed``: normal values with about 1% large spikes
    (what the codec's spike reserving is for)."""
    g = torch.Generator().manual_seed(seed * 1009 + src)
    x = torch.randn(rows, *tail, generator=g)
    x += (torch.rand(rows, *tail, generator=g) < 0.01) * 20 * torch.randn(rows, *tail, generator=g)
    return x.to(dtype)


def split_matrix(world: int, kind: str, seed: int) -> list[list[int]]:
    """S[src][dst] = rows src sends to dst, for one of SPLIT_KINDS:
    even (3 rows per pair), uneven (0..6), zeros (many empty pairs, rank 0 sends nothing and
    the last rank receives nothing), empty (nobody sends anything)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "even":
        return [[3] * world for _ in range(world)]
    if kind == "uneven":
        return torch.randint(0, 7, (world, world), generator=g).tolist()
    if kind == "zeros":
        s = torch.randint(1, 4, (world, world), generator=g) * (torch.rand(world, world, generator=g) < 0.5)
        s[0] = 0
        s[:, world - 1] = 0
        return s.tolist()
    if kind == "empty":
        return [[0] * world for _ in range(world)]
    raise ValueError(f"split kind {kind!r}; allowed: {', '.join(SPLIT_KINDS)}")


def roundtrip(rows: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    """What ``rows`` [n, ..., H] become on a link with codec ``cfg`` (reference codec)."""
    h = rows.shape[-1]
    flat = rows.reshape(-1, h).cpu()
    return reference.decode(reference.encode(flat, cfg), cfg, h, rows.dtype).view(rows.shape).to(rows.device)


def expected(rank: int, world: int, S, tail, dtype, seed, link, ranks=None) -> torch.Tensor:
    """What group rank ``rank`` must receive; ``link(p)`` is the codec of the pair (p, rank);
    ``ranks``: the input seed (global rank) of each group rank, default 0..world-1."""
    ranks = ranks or list(range(world))
    parts = []
    for p in range(world):
        x = make_input(ranks[p], sum(S[p]), tail, dtype, seed)
        off = sum(S[p][:rank])
        rows = x[off:off + S[p][rank]]
        parts.append(rows if p == rank else roundtrip(rows, link(p)))
    return torch.cat(parts)
