"""Detect ranks that call a collective with different configurations.

On the first call with a new configuration key, every rank all-gathers one int64 hash per
field (one small collective), compares, and caches the key. A mismatch raises the same
kind of error on every rank, naming the fields, instead of a hang or garbage bytes.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist


class ConfigMismatchError(RuntimeError):
    """Ranks of a group called a collective with different configurations."""


_verified: set = set()


def _hash63(value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(),
                          "little") >> 1


def group_key(group: Optional[dist.ProcessGroup]) -> tuple:
    g = group if group is not None else dist.group.WORLD
    return (id(g), getattr(g, "group_name", None))


def check_consistent(fields: Mapping[str, Any], group: Optional[dist.ProcessGroup],
                     device: torch.device, what: str = "moe_flashcomm.all_to_all") -> None:
    """Raise ConfigMismatchError on every rank unless all ranks of ``group`` pass equal
    ``fields`` (compared by repr). Collective on the first call per key, free after."""
    key = (group_key(group), tuple((k, repr(v)) for k, v in fields.items()))
    if key in _verified:
        return
    world = dist.get_world_size(group)
    mine = torch.tensor([_hash63(v) for v in fields.values()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    rank = dist.get_rank(group)
    problems = []
    for i, (name, value) in enumerate(fields.items()):
        column = table[:, i]
        if bool((column != column[0]).any()):
            same = [q for q in range(world) if column[q] == column[rank]]
            other = [q for q in range(world) if column[q] != column[rank]]
            problems.append(f"{name}: this rank has {value!r} (as do ranks {same}); "
                            f"ranks {other} have something else")
    if problems:
        raise ConfigMismatchError(
            f"{what}: ranks of the group disagree (group rank {rank} of {world}):\n  "
            + "\n  ".join(problems)
            + "\nEvery rank must pass the same codec, grad codec, hidden size (x.shape[1:]), "
              "dtype, algorithm, chunks, topology and size gate.")
    _verified.add(key)
