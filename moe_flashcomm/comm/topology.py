"""Which ranks share a node, which link a pair of ranks uses, and the codec per link."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .. import env
from ..codec import CodecConfig

# Link paths, the keys of the size gate's tables (moe_flashcomm.comm.gate).
PATHS = ("nvlink", "host", "network", "cpu")


@dataclass(frozen=True)
class Topology:
    """Node layout of the job: every node holds ``local_size`` consecutive global ranks
    (the placement of torchrun, the deepspeed launcher and mpirun's by-slot mapping).

    ``Topology(local_size=8)`` says ranks 0-7 are node 0, 8-15 node 1, and so on.
    """

    local_size: int

    def __post_init__(self) -> None:
        if isinstance(self.local_size, bool) or not isinstance(self.local_size, int) \
                or self.local_size < 1:
            raise ValueError(f"Topology.local_size must be an int >= 1, got {self.local_size!r}")

    def node_of(self, global_rank: int) -> int:
        """Node index of a global rank."""
        return global_rank // self.local_size

    @classmethod
    def from_env(cls, world_size: int) -> "Topology":
        """From the launcher: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (deepspeed) or
        ``OMPI_COMM_WORLD_LOCAL_SIZE`` (Open MPI); one node of ``world_size`` ranks if none is set.
        """
        local = env.local_size()
        return cls(local if local is not None else max(1, world_size))

    @classmethod
    def coerce(cls, obj: "Topology | int | None", world_size: int, global_rank: int) -> "Topology":
        """A Topology from itself, an int (``local_size``) or None (the environment).

        Warns once when ``LOCAL_RANK`` contradicts the consecutive placement.
        """
        if obj is None:
            topo = cls.from_env(world_size)
            local_rank = env.local_rank()
            if local_rank is not None and local_rank != global_rank % topo.local_size:
                warnings.warn(f"LOCAL_RANK={local_rank} but global rank {global_rank} with "
                              f"{topo.local_size} ranks per node implies local rank "
                              f"{global_rank % topo.local_size}; nodes are taken to hold "
                              "consecutive ranks. Pass topology=Topology(...) to silence this.",
                              stacklevel=3)
            return topo
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, int) and not isinstance(obj, bool):
            return cls(obj)
        raise TypeError(f"topology must be a Topology, an int (ranks per node) or None, "
                        f"got {type(obj).__name__}")


def intra_node_path(device_type: str) -> str:
    """The path between two ranks of one node: ``cpu`` for gloo on CPU tensors, else what
    NCCL will use as set by its environment (docs/design.md, "Link emulation")."""
    if device_type != "cuda":
        return "cpu"
    if env.nccl_flag("NCCL_P2P_DISABLE"):
        return "network" if env.nccl_flag("NCCL_SHM_DISABLE") else "host"
    return "nvlink"


def link_path(same_node: bool, device_type: str) -> str:
    """One of PATHS for a pair of ranks."""
    if device_type != "cuda":
        return "cpu"
    return intra_node_path(device_type) if same_node else "network"


CodecLike = Union[CodecConfig, Mapping[str, Any], int, str, None]


@dataclass(frozen=True)
class LinkCodecs:
    """Codec per link kind: ``intra_node`` for peers on this rank's node, ``inter_node``
    for the rest. Each field takes what ``CodecConfig.coerce`` takes.

    ``LinkCodecs(intra_node="bf16", inter_node=4)``: bf16 over NVLink, int4 across nodes.
    """

    intra_node: CodecLike = None
    inter_node: CodecLike = None

    def __post_init__(self) -> None:
        for name in ("intra_node", "inter_node"):
            try:
                object.__setattr__(self, name, CodecConfig.coerce(getattr(self, name)))
            except (TypeError, ValueError) as e:
                raise type(e)(f"LinkCodecs.{name}: {e}") from None
        object.__setattr__(self, "_hash", hash((self.intra_node, self.inter_node)))

    def __hash__(self) -> int:  # cached: LinkCodecs keys the per-call caches
        return self._hash

    def __reduce__(self):  # made again when loaded: str hashes differ between processes
        return type(self), (self.intra_node, self.inter_node)

    def for_peer(self, same_node: bool) -> CodecConfig:
        return self.intra_node if same_node else self.inter_node

    @classmethod
    def coerce(cls, obj: "LinkCodecs | CodecLike", name: str = "codec") -> "LinkCodecs":
        """A LinkCodecs from itself, a dict with keys ``intra_node``/``inter_node``, or
        anything ``CodecConfig.coerce`` takes (then the same codec on every link)."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping) and set(obj) & {"intra_node", "inter_node"}:
            unknown = set(obj) - {"intra_node", "inter_node"}
            if unknown:
                raise ValueError(f"{name}: unknown link field(s) {sorted(unknown, key=repr)}; "
                                 "allowed: intra_node, inter_node")
            return cls(**obj)
        try:
            c = CodecConfig.coerce(obj)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        return cls(c, c)

    def __str__(self) -> str:
        if self.intra_node == self.inter_node:
            return str(self.intra_node)
        return f"intra={self.intra_node},inter={self.inter_node}"
