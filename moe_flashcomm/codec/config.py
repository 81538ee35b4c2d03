"""Codec configuration: what a token looks like on the wire."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Union

BITS_ALLOWED = "an int 2..8, 'fp8' or 'bf16'"
GROUP_SIZES = (32, 64, 128, 256)
ROUNDINGS = ("nearest", "stochastic")

Bits = Union[int, str]


@dataclass(frozen=True)
class CodecConfig:
    """How token activations are encoded for transfer.

    bits:       2..8 (integer codes stored as 4/2/1-bit planes), "fp8" (e4m3 with a
                per-group scale) or "bf16" (16-bit passthrough, no groups).
    group_size: values sharing one scale/min: 32, 64, 128 or 256.
    spikes:     keep each group's min and max exactly (integer widths only; ignored
                and normalised to False for "fp8" and "bf16").
    rounding:   "nearest" (half to even) or "stochastic" (unbiased, for gradients).
    """

    bits: Bits = 4
    group_size: int = 128
    spikes: bool = True
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, str) and bits.isdigit():
            bits = int(bits)
        if isinstance(bits, bool) or not (
            (isinstance(bits, int) and 2 <= bits <= 8) or bits in ("fp8", "bf16")
        ):
            raise ValueError(f"CodecConfig.bits must be {BITS_ALLOWED}, got {self.bits!r}")
        object.__setattr__(self, "bits", bits)
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"CodecConfig.group_size must be one of {GROUP_SIZES}, got {self.group_size!r}"
            )
        if not isinstance(self.spikes, bool):
            raise ValueError(f"CodecConfig.spikes must be True or False, got {self.spikes!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"CodecConfig.rounding must be one of {ROUNDINGS}, got {self.rounding!r}"
            )
        if not self.is_int:
            object.__setattr__(self, "spikes", False)

    @property
    def is_int(self) -> bool:
        return isinstance(self.bits, int)

    @property
    def is_fp8(self) -> bool:
        return self.bits == "fp8"

    @property
    def is_passthrough(self) -> bool:
        return self.bits == "bf16"

    @property
    def qmax(self) -> int:
        """Largest integer code (2**bits - 1); integer widths only."""
        assert self.is_int
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CodecConfig":
        unknown = set(d) - {"bits", "group_size", "spikes", "rounding"}
        if unknown:
            raise ValueError(
                f"unknown codec field(s) {sorted(unknown)}; allowed: bits, group_size, spikes, rounding"
            )
        return cls(**d)

    @classmethod
    def coerce(cls, obj: "CodecConfig | Mapping[str, Any] | Bits | None") -> "CodecConfig":
        """Accept a CodecConfig, a dict of its fields, a bare bits value, or None (default)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        if isinstance(obj, (int, str)):
            return cls(bits=obj)
        raise TypeError(f"expected a CodecConfig, a dict or a bits value, got {type(obj).__name__}")

    def __str__(self) -> str:
        if not self.is_int:
            return str(self.bits) if self.is_passthrough else f"fp8/g{self.group_size}"
        s = f"int{self.bits}/g{self.group_size}"
        if self.spikes:
            s += "+spikes"
        if self.rounding == "stochastic":
            s += "+sr"
        return s
