"""Byte layout of one token record. Pure arithmetic: no tensors.

A record is the encoding of one token of ``hidden`` values (docs/wire-format.md):

    [plane 4-bit][plane 2-bit][plane 1-bit]   integer widths (8-bit: one 8-bit plane)
    [fp8 codes]                               fp8
    [16-bit values]                           bf16 passthrough
    [the token's own values]                  native (its size depends on the dtype)
    then per-group metadata arrays, the record padded to ALIGN bytes.

Every plane and the metadata block start on an ALIGN-byte boundary so kernels can use
16-byte loads and stores, and a batch of records is a plain ``[T, record_bytes]`` uint8 tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .config import CodecConfig

ALIGN = 16
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the token dtypes
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit splitting: a b-bit code as planes of 4, 2 and 1 bits, most significant first."""
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


@dataclass(frozen=True)
class Plane:
    width: int   # bits per value in this plane
    shift: int   # the plane holds (code >> shift) & (2**width - 1)
    offset: int  # byte offset in the record
    nbytes: int


@dataclass(frozen=True)
class RecordLayout:
    """Where everything lives in a record of ``record_bytes`` bytes.

    Metadata offsets are byte offsets of arrays with one entry per group; None when absent.
    16-bit floats are in the wire float (fp16 for fp16 input, bf16 otherwise).
    """

    hidden: int
    group_size: int
    n_groups: int
    padded_hidden: int
    planes: tuple[Plane, ...]
    scale: Optional[int]     # 16-bit float per group
    minimum: Optional[int]   # 16-bit float per group (integer widths)
    lo_value: Optional[int]  # 16-bit float per group: the reserved minimum spike
    hi_value: Optional[int]  # 16-bit float per group: the reserved maximum spike
    lo_index: Optional[int]  # uint8 per group: the spike's index inside its group
    hi_index: Optional[int]  # uint8 per group
    record_bytes: int

    @property
    def bits_per_value(self) -> float:
        """Wire bits per hidden value, payload and metadata and padding included."""
        return self.record_bytes * 8 / self.hidden


def record_layout(hidden: int, cfg: CodecConfig, dtype: Optional[torch.dtype] = None) -> RecordLayout:
    """The layout of one record of ``hidden`` values under ``cfg``. ``dtype``, the tokens'
    dtype, is needed by "native" only (its records are the tokens' own bytes)."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    if dtype is not None and dtype not in INPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype!r}")
    cfg = CodecConfig.coerce(cfg)
    # torch.compile traces the maker itself: it skips a functools cache, with a warning
    layout = _make_layout if torch.compiler.is_compiling() else _layout
    if not cfg.is_native:
        return layout(hidden, cfg, 0)
    if dtype is None:
        raise ValueError("the 'native' codec's records are the tokens' own bytes, so their size "
                         "depends on the dtype: pass dtype= (record_layout / record_bytes)")
    return layout(hidden, cfg, dtype.itemsize)


def _make_layout(hidden: int, cfg: CodecConfig, itemsize: int) -> RecordLayout:
    """``itemsize``: bytes per value of a native record (0 for the other codecs)."""
    if cfg.is_passthrough or cfg.is_native:
        size = 2 if cfg.is_passthrough else itemsize
        return RecordLayout(hidden, 0, 0, hidden, (Plane(8 * size, 0, 0, size * hidden),),
                            None, None, None, None, None, None, align(size * hidden))
    g = cfg.group_size
    n = -(-hidden // g)
    padded = n * g
    widths = (8,) if cfg.is_fp8 else plane_widths(cfg.bits)
    planes, offset, shift = [], 0, sum(widths)
    for w in widths:
        shift -= w
        planes.append(Plane(w, shift, offset, padded * w // 8))
        offset = align(offset + padded * w // 8)
    fields = {}
    for name, size in (("scale", 2), ("minimum", 2), ("lo_value", 2), ("hi_value", 2),
                       ("lo_index", 1), ("hi_index", 1)):
        present = name == "scale" or (cfg.is_int and (name == "minimum" or cfg.spikes))
        fields[name] = offset if present else None
        offset += n * size if present else 0
    return RecordLayout(hidden, g, n, padded, tuple(planes), record_bytes=align(offset), **fields)


_layout = lru_cache(maxsize=4096)(_make_layout)  # bounded, as memo's tables


def record_bytes(hidden: int, cfg: CodecConfig, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of one encoded token of ``hidden`` values under ``cfg`` (a multiple of 16);
    ``dtype`` as in record_layout (needed by "native" only)."""
    return record_layout(hidden, cfg, dtype).record_bytes
