"""Codec configuration: what a token looks like on the wire."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Union

# the bits values that are names, not widths; appended only: headers and stamps name them by
# position (comm/frame.py wire_code)
BITS_NAMED = ("fp8", "bf16", "native")
BITS_ALLOWED = "an int 2..8, 'fp8', 'bf16' or 'native'"
GROUP_SIZES = (32, 64, 128, 256)
ROUNDINGS = ("nearest", "stochastic")
FIELDS = ("bits", "group_size", "spikes", "rounding")

Bits = Union[int, str]


def _is_int(v: Any) -> bool:
    """A Python int proper: no bool, no float that equals an int, no digit string."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CodecConfig:
    """How token activations are encoded for transfer.

    bits:       2..8 (integer codes stored as 4/2/1-bit planes), "fp8" (e4m3 with a
                per-group scale), "bf16" (16-bit passthrough, no groups: fp32 tokens are
                rounded to bf16, bf16 and fp16 tokens travel exactly) or "native" (the
                tokens' own bytes in their own dtype: exact for fp32, bf16 and fp16).
    group_size: values sharing one scale/min: 32, 64, 128 or 256 (integer widths and fp8;
                "bf16" and "native" have no groups: normalised to 128).
    spikes:     keep each group's min and max exactly (integer widths only; ignored
                and normalised to False for "fp8", "bf16" and "native").
    rounding:   "nearest" (half to even) or "stochastic" (unbiased, for gradients).

    Types are exact: ``bits`` an int or one of the names, ``group_size`` an int (not 64.0,
    not True), ``spikes`` a bool, ``rounding`` a str.
    """

    bits: Bits = 4
    group_size: int = 128
    spikes: bool = True
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        bits = self.bits
        if not ((_is_int(bits) and 2 <= bits <= 8) or (isinstance(bits, str) and bits in BITS_NAMED)):
            raise ValueError(f"CodecConfig.bits must be {BITS_ALLOWED}, got {bits!r}")
        if not (_is_int(self.group_size) and self.group_size in GROUP_SIZES):
            raise ValueError(
                f"CodecConfig.group_size must be one of {GROUP_SIZES} (an int), got {self.group_size!r}"
            )
        if not isinstance(self.spikes, bool):
            raise ValueError(f"CodecConfig.spikes must be True or False, got {self.spikes!r}")
        if not (isinstance(self.rounding, str) and self.rounding in ROUNDINGS):
            raise ValueError(
                f"CodecConfig.rounding must be one of {ROUNDINGS}, got {self.rounding!r}"
            )
        if self.rounding == "stochastic" and not self.is_int:  # (it would round to nearest)
            raise ValueError(f"CodecConfig.rounding='stochastic' needs an integer width 2..8 "
                             f"(fp8, bf16 and native round to nearest), got bits={bits!r}")
        # what a codec does not use is normalised, so that codecs that send the same bytes
        # are equal (ranks that agree on their codec, cache keys)
        if not self.is_int:
            object.__setattr__(self, "spikes", False)
        if not self.is_quantized:
            object.__setattr__(self, "group_size", 128)

    @property
    def is_int(self) -> bool:
        return isinstance(self.bits, int)

    @property
    def is_fp8(self) -> bool:
        return self.bits == "fp8"

    @property
    def is_passthrough(self) -> bool:
        """The 16-bit passthrough "bf16": values in the wire float (fp32 rounds to bf16)."""
        return self.bits == "bf16"

    @property
    def is_native(self) -> bool:
        """Tokens in their own dtype, their own bytes: exact for fp32, bf16 and fp16."""
        return self.bits == "native"

    @property
    def is_stochastic(self) -> bool:
        """An integer width with stochastic rounding (its encode takes a seed)."""
        return self.is_int and self.rounding == "stochastic"

    @property
    def is_quantized(self) -> bool:
        """Integer widths and fp8: values in groups with a scale (not bf16, not native)."""
        return self.is_int or self.is_fp8

    @property
    def qmax(self) -> int:
        """Largest integer code (2**bits - 1); integer widths only."""
        assert self.is_int
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CodecConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"CodecConfig.from_dict needs a dict of the fields {', '.join(FIELDS)}, "
                            f"got {type(d).__name__}: {d!r}")
        unknown = set(d) - set(FIELDS)
        if unknown:
            raise ValueError(
                f"unknown codec field(s) {sorted(unknown, key=repr)}; allowed: {', '.join(FIELDS)}"
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
        raise TypeError(f"expected a CodecConfig, a dict of its fields or a bits value "
                        f"({BITS_ALLOWED}), got {type(obj).__name__}: {obj!r}")

    def __str__(self) -> str:
        if not self.is_int:
            return f"fp8/g{self.group_size}" if self.is_fp8 else str(self.bits)
        s = f"int{self.bits}/g{self.group_size}"
        if self.spikes:
            s += "+spikes"
        if self.rounding == "stochastic":
            s += "+sr"
        return s
