"""Every environment variable the package reads, parsed in one place.

Each accessor reads the environment when it is called (never at import), so a process may
set a variable after ``import moe_flashcomm``; a malformed value raises ``ValueError``
naming the variable, its value and what is allowed. The README's table lists them all.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def _raw(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return None if value is None or not value.strip() else value.strip()


def flag(name: str, default: bool) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty: default."""
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected one of "
                     f"{', '.join(_TRUE + _FALSE)}")


_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def integer(name: str, default: int, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """An int variable from ``minimum`` to ``maximum``; unset or empty: default."""
    value = _raw(name)
    if value is None:
        return default
    # plain ASCII digits: Python's int() would also take "1_000" and other scripts' digits
    out = int(value) if _INT.fullmatch(value) else None
    if out is None or out < minimum or (maximum is not None and out > maximum):
        allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"environment variable {name}={value!r}: expected an int {allowed}")
    return out


# ---- the package's own variables -------------------------------------------------------------
DEFAULT_TIMEOUT_S = 300  # MOE_FLASHCOMM_TIMEOUT_S when unset
# the longest wait for a silent peer, in seconds: the GPU kernels count it in int64 nanoseconds
MAX_TIMEOUT_S = 10**9

def kernel_cache_dir() -> Path:
    """MOE_FLASHCOMM_CACHE: where compiled kernels are kept."""
    value = _raw("MOE_FLASHCOMM_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "moe_flashcomm" / "kernels"


# a C identifier, optionally =VALUE (MFC_X=-1, MFC_Y=1.5); no spaces: each is one -D argument
_DEFINE = re.compile(r"[A-Za-z_]\w*(=[^,\s]+)?", re.ASCII)


def kernel_defines() -> tuple[str, ...]:
    """MOE_FLASHCOMM_DEFINES: extra -D defines for every kernel compile (comma-separated),
    to point a whole run at a kernel variant (e.g. ``MFC_ENC_V4``)."""
    value = _raw("MOE_FLASHCOMM_DEFINES") or ""
    out = tuple(d.strip() for d in value.split(",") if d.strip())
    for d in out:
        if not _DEFINE.fullmatch(d):
            raise ValueError(f"environment variable MOE_FLASHCOMM_DEFINES={value!r}: {d!r} is "
                             "not a NAME or NAME=VALUE define (NAME a C identifier, VALUE "
                             "without spaces)")
    return out


def native_launch() -> bool:
    """MOE_FLASHCOMM_NATIVE_LAUNCH: launch kernels through the compiled launcher
    (csrc/launcher.cpp, built on the first CUDA call; default on); off: through ctypes."""
    return flag("MOE_FLASHCOMM_NATIVE_LAUNCH", True)


def gate_file() -> Optional[str]:
    """MOE_FLASHCOMM_GATE_FILE: a size-gate JSON file (``python -m moe_flashcomm.tune_gate``)."""
    return _raw("MOE_FLASHCOMM_GATE_FILE")


def p2p_enabled() -> bool:
    """MOE_FLASHCOMM_P2P: the peer-to-peer transport inside a node (default on)."""
    return flag("MOE_FLASHCOMM_P2P", True)


def p2p_max_bytes() -> int:
    """MOE_FLASHCOMM_P2P_MAX_MB: most device memory one rank's peer buffers may take."""
    return integer("MOE_FLASHCOMM_P2P_MAX_MB", 4096, minimum=1) << 20


def p2p_copy_bytes() -> int:
    """MOE_FLASHCOMM_P2P_COPY_MB: records per peer from which the copy engine moves them."""
    return integer("MOE_FLASHCOMM_P2P_COPY_MB", 64, minimum=0) << 20


def stamps_enabled() -> bool:
    """MOE_FLASHCOMM_STAMPS: every pair of a CUDA all-to-all or all-reduce over NCCL carries a
    stamp its receiver checks (default on; off: the records alone, checked at first use
    only)."""
    return flag("MOE_FLASHCOMM_STAMPS", True)


def timeout_s() -> int:
    """MOE_FLASHCOMM_TIMEOUT_S: how long a call waits for silent peers (a framed exchange over
    gloo, a peer-to-peer kernel's wait, the agreement of ``enable_deepspeed`` and
    ``enable_all_reduce``)."""
    return integer("MOE_FLASHCOMM_TIMEOUT_S", DEFAULT_TIMEOUT_S, minimum=1, maximum=MAX_TIMEOUT_S)


def all_reduce_pair_gather() -> bool:
    """MOE_FLASHCOMM_AR_PAIR_GATHER: a two-rank all-reduce sends its reduce-scatter as an
    all-gather (default on; off for comparisons)."""
    return flag("MOE_FLASHCOMM_AR_PAIR_GATHER", True)


# ---- variables of the launchers and NCCL that decide the topology and link path ---------------
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def local_size() -> Optional[int]:
    """Ranks per node as the launcher says (torchrun, deepspeed, Open MPI), or None."""
    for name in LOCAL_SIZE_VARS:
        if _raw(name) is not None:
            return integer(name, 1, minimum=1)
    return None


def local_rank() -> Optional[int]:
    """LOCAL_RANK as the launcher sets it, or None."""
    return integer("LOCAL_RANK", 0) if _raw("LOCAL_RANK") is not None else None


# the number C's strtol(value, NULL, 0) reads: spaces, a sign, then hex, octal or decimal digits
_STRTOL = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", re.ASCII)


def nccl_flag(name: str) -> bool:
    """An NCCL switch (NCCL_P2P_DISABLE, NCCL_SHM_DISABLE) as NCCL reads it: on where
    strtol(value, NULL, 0) is 1; "true", "yes" or 2 leave NCCL's transport on."""
    m = _STRTOL.match(os.environ.get(name, ""))
    if m is None:
        return False
    sign, digits = m.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10
    return int(sign + digits, base) == 1


def cuda_homes() -> list[str]:
    """CUDA_HOME and CUDA_PATH, where set: CUDA toolkits whose headers NVRTC may use."""
    return [v for v in (_raw("CUDA_HOME"), _raw("CUDA_PATH")) if v]


def rank() -> Optional[int]:
    """RANK (the global rank) as the launcher sets it, or None when not launched."""
    return integer("RANK", 0) if _raw("RANK") is not None else None


def torch_extensions_dir() -> Path:
    """Where torch (and so DeepSpeed) builds its JIT C++ ops: TORCH_EXTENSIONS_DIR, else
    torch's default (~/.cache/torch_extensions). Read as torch reads it: set at all, even
    empty (the working directory), it is the root, taken as written."""
    value = os.environ.get("TORCH_EXTENSIONS_DIR")
    if value is not None:
        return Path(value)
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())
