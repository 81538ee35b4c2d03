"""Codec: the wire format of one token. ``encode``/``decode`` run the CUDA kernels for
CUDA tensors and the torch reference (the specification) for CPU tensors."""
from __future__ import annotations

import torch

from . import cuda, reference
from .config import CodecConfig
from .format import RecordLayout, record_bytes, record_layout
from .reference import Seed


def encode(x: torch.Tensor, cfg: CodecConfig, seed: Seed = None) -> torch.Tensor:
    """Tokens [T, H] (fp32/bf16/fp16) -> records uint8 [T, record_bytes(H, cfg, x.dtype)].
    With ``bits="native"`` the records are the tokens' own bytes (exact; padded to 16 bytes).

    ``seed`` (int or torch.Generator) drives stochastic rounding; None draws one from
    torch's default generator. Ignored for nearest rounding.
    """
    if isinstance(x, torch.Tensor) and x.is_cuda:
        return cuda.encode(x, cfg, seed)
    return reference.encode(x, cfg, seed)


def decode(records: torch.Tensor, cfg: CodecConfig, hidden: int,
           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Records uint8 [T, record_bytes] -> tokens [T, hidden] of ``dtype`` (the encoded dtype)."""
    if isinstance(records, torch.Tensor) and records.is_cuda:
        return cuda.decode(records, cfg, hidden, dtype)
    return reference.decode(records, cfg, hidden, dtype)


__all__ = ["CodecConfig", "RecordLayout", "decode", "encode", "record_bytes", "record_layout"]
