"""The codec on CUDA tensors: the kernels in ``csrc/`` compiled at first use with NVRTC
(through CuPy) and launched on torch's current stream over the tensors' memory.

Bit-identical to :mod:`moe_flashcomm.codec.reference` (the specification) for every config.
No host synchronisation and no extra copies, so the calls are safe under CUDA graph capture;
``torch.ops.moe_flashcomm.encode`` / ``decode`` are custom ops, so ``torch.compile`` keeps each
call as one opaque op.

Compiled kernels are cached on disk (``$MOE_FLASHCOMM_CACHE``, default
``~/.cache/moe_flashcomm/kernels``), each entry named by a hash of what it was built from and
checked against its own checksum when read; :func:`precompile` fills that cache in parallel.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .. import env
from . import reference
from .config import CodecConfig
from .format import ALIGN, RecordLayout, record_layout

CUPY_HINT = ("install CuPy for your CUDA version: pip install moe-flashcomm[cuda12] "
             "(CUDA 12) or pip install moe-flashcomm[cuda13] (CUDA 13)")
BLOCK = 256  # threads per block (kBlock in csrc/codec_common.cuh)
DENSE_GROUP = 128  # the group size with an encode kernel copy for dense rows (encode_int's DG)
# Kernel shapes (V, U): a thread handles U chunks of V consecutive values (V <= group size).
# The shapes the sources instantiate for CI (MFC_ENC_SHAPES / MFC_DEC_SHAPES in csrc/) and the
# defaults, chosen by tools/bench_codec.py measurements (docs/kernel-notes.md).
ENCODE_SHAPES = ((16, 1), (32, 1), (32, 2), (64, 1))
DECODE_SHAPES = ((8, 2), (8, 4), (16, 1), (16, 2), (32, 1))
# Defaults by codec kind, measured on an H200 (docs/kernel-notes.md): 32-value chunks amortise
# the group statistics; the integer decode stages 64-byte chunks through shared memory, fp8
# decode (no staging) keeps 16-byte chunks, two per thread.
ENCODE_SHAPE = {"int": (32, 1), "fp8": (32, 1)}
DECODE_SHAPE = {"int": (32, 1), "fp8": (8, 2)}
Shape = tuple[int, int]
# Spec arithmetic: no FMA contraction, no flush-to-zero (CuPy's own compile path forces
# -ftz=true, which is why this module drives NVRTC itself).
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true",
                 "--prec-sqrt=true")
_CTYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
_MAX_ITEMS = 2**31 - 1  # fastdiv and the kernels' 32-bit thread index


# ---- CuPy / NVRTC --------------------------------------------------------------------------
def _cupy():
    """Import CuPy, or fail naming the extra that provides it."""
    try:
        import cupy
        from cupy.cuda import function, nvrtc  # noqa: F401
    except ImportError as e:
        raise ImportError(f"moe_flashcomm: encoding CUDA tensors needs CuPy; {CUPY_HINT}") from e
    return cupy


def csrc_dir() -> Path:
    """The kernel sources: ``<repo>/csrc`` in a source checkout, else the installed package."""
    here = Path(__file__).resolve().parents[2] / "csrc"
    if (here / "codec_common.cuh").is_file():
        return here
    return Path(str(resources.files("moe_flashcomm") / "csrc"))


def kernel_source(name: str) -> str:
    """``name`` (a csrc/*.cu file) with codec_common.cuh inlined, so the source text alone
    determines the binary (and its cache key). Other csrc files it includes by name
    (``#include "codec_encode.cu"``: csrc/allreduce.cu) are inlined too, each once."""
    d = csrc_dir()
    seen: set = set()

    def inline(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        return _INCLUDE.sub(lambda m: inline(m.group(1)), (d / fname).read_text())

    return inline(name)


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"[ \t]*$', re.M)


def _include_dirs() -> list[str]:
    """Folders holding cuda_bf16.h / cuda_fp8.h for NVRTC."""
    cands = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        cands.append(find_nvidia_header_directory("cudart"))
    except Exception:
        pass
    try:
        from cupy import _environment
        p = _environment.get_cuda_path()
        cands.append(p and os.path.join(p, "include"))
    except Exception:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        cands.append(os.environ.get(var) and os.path.join(os.environ[var], "include"))
    cands.append("/usr/local/cuda/include")
    found = [c for c in cands if c and os.path.isfile(os.path.join(c, "cuda_fp8.h"))]
    if not found:
        raise RuntimeError("moe_flashcomm: no CUDA headers (cuda_fp8.h) found for NVRTC; "
                           f"set CUDA_HOME or {CUPY_HINT}")
    return found[:1]


cache_dir = env.kernel_cache_dir
env_defines = env.kernel_defines

# A cache entry: one header line ``CACHE_MAGIC <key> <sha256 of key, name and cubin>``, then the
# lowered name and the cubin. The key (the entry's file name) hashes everything the binary
# depends on, so a file that is truncated, corrupted, or belongs to another key or to no one
# fails the check and is compiled again.
CACHE_MAGIC = b"moe_flashcomm-kernel-v1"


def cache_key(source: str, name_expr: str, nvrtc_version, options: tuple[str, ...]) -> str:
    """The entry's file name: a hash of everything the cubin depends on (the source with its
    includes inlined, the name expression, NVRTC's version, the options: arch, defines)."""
    text = "\0".join((source, name_expr, str(nvrtc_version)) + tuple(options))
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_digest(key: str, name: bytes, cubin: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\n" + name + b"\n" + cubin).hexdigest().encode()


def cache_entry(key: str, name: str, cubin: bytes) -> bytes:
    """The bytes of the cache entry of (lowered ``name``, ``cubin``) under ``key``."""
    raw = name.encode()
    return b" ".join((CACHE_MAGIC, key.encode(), _entry_digest(key, raw, cubin))) + b"\n" \
        + raw + b"\n" + cubin


def parse_cache_entry(data: bytes, key: str) -> Optional[tuple[str, bytes]]:
    """(lowered name, cubin) of a cache entry written under ``key``, or None when ``data`` is
    not one: truncated, corrupted, of another key or no entry at all."""
    header, sep, rest = data.partition(b"\n")
    name, sep2, cubin = rest.partition(b"\n")
    parts = header.split(b" ")
    if not (sep and sep2 and name and cubin and len(parts) == 3):
        return None
    magic, entry_key, digest = parts
    if magic != CACHE_MAGIC or entry_key != key.encode() \
            or digest != _entry_digest(key, name, cubin):
        return None
    try:
        return name.decode("ascii"), cubin
    except UnicodeDecodeError:
        return None


def read_cache_file(path: Path, key: str) -> Optional[tuple[str, bytes]]:
    """The verified entry at ``path``, or None (missing, unreadable or failing the check)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    entry = parse_cache_entry(data, key)
    if entry is None:
        warnings.warn(f"moe_flashcomm: kernel cache entry {path} is damaged or foreign; "
                      "compiling it again", RuntimeWarning, stacklevel=3)
    return entry


def write_cache_file(path: Path, key: str, name: str, cubin: bytes) -> None:
    """Publish the entry at ``path`` atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
        try:
            f.write(cache_entry(key, name, cubin))
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def compile_kernel(source_name: str, name_expr: str, arch: str,
                   defines: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """(lowered name, cubin) of one template instance, from the disk cache or NVRTC (a cache
    entry that fails its check is compiled again and replaced).
    ``defines`` select kernel variants for benchmarks (e.g. MFC_SCALAR_STATS)."""
    _cupy()
    from cupy.cuda import nvrtc
    src = kernel_source(source_name)
    defines = tuple(defines) + env_defines()
    opts = (f"--gpu-architecture={arch}",) + NVRTC_OPTIONS + tuple(f"-D{d}" for d in defines)
    opts += tuple(f"-I{d}" for d in _include_dirs())
    key = cache_key(src, name_expr, nvrtc.getVersion(), opts)
    path = cache_dir() / f"{key}.bin"
    if path.exists():
        cached = read_cache_file(path, key)
        if cached is not None:
            return cached
    prog = nvrtc.createProgram(src, source_name, [], [])
    try:
        nvrtc.addNameExpression(prog, name_expr)
        try:
            nvrtc.compileProgram(prog, list(opts))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {name_expr}:\n{nvrtc.getProgramLog(prog)}") from e
        name, cubin = nvrtc.getLoweredName(prog, name_expr), nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    write_cache_file(path, key, name, cubin)
    return name, cubin


def _arch(device: int) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


_functions: dict = {}
_lock = threading.Lock()


def _function(device: int, source_name: str, name_expr: str, defines: tuple[str, ...] = ()):
    """The loaded kernel on ``device`` (modules belong to a device's context)."""
    key = (device, name_expr, defines)
    fn = _functions.get(key)
    if fn is None:
        cupy = _cupy()
        from cupy.cuda import function
        name, cubin = compile_kernel(source_name, name_expr, _arch(device), defines)
        with _lock, cupy.cuda.Device(device):
            mod = function.Module()
            mod.load(cubin)
            fn = _functions[key] = (mod, mod.get_function(name))
    return fn[1]


class _Stream:
    """What CuPy's launcher reads from a stream: its handle."""
    def __init__(self, ptr: int):
        self.ptr = ptr


def _launch(device: int, source_name: str, name_expr: str, threads: int, args: list,
            defines: tuple[str, ...] = ()) -> None:
    """Launch ``threads`` threads of a kernel on torch's current stream."""
    _run(device, _function(device, source_name, name_expr, defines), _blocks(threads), args)


def _blocks(threads: int) -> int:
    """Blocks of BLOCK threads that cover ``threads`` threads."""
    return -(-threads // BLOCK)


def _run(device: int, fn, blocks: int, args: list) -> None:
    """Launch ``blocks`` blocks of BLOCK threads of a loaded kernel on torch's current stream."""
    stream = _Stream(_raw_stream(device))
    if device == torch.cuda.current_device():
        fn((blocks,), (BLOCK,), args, stream=stream)
    else:
        with _cupy().cuda.Device(device):
            fn((blocks,), (BLOCK,), args, stream=stream)


# torch's current stream of a device as a handle (the C call torch.compile's code uses)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)


def by_value(struct: np.ndarray):
    """A kernel argument that passes the one-element ``struct`` by value. Built once per
    struct: CuPy would rebuild a structured dtype's descriptor at every launch (~20 us).
    The launch copies the value, so the struct may be changed in place between launches."""
    from cupy.cuda import function
    cls = getattr(function, "CNumpyArray", None)
    return cls(struct) if cls is not None else struct


# ---- launch geometry -----------------------------------------------------------------------
def _fastdiv(d: int) -> tuple[int, int]:
    """Multiplier and shift for x // d with x < 2^31 (csrc fastdiv)."""
    shift = max(0, (d - 1).bit_length())
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _gaps(L: RecordLayout) -> list[int]:
    """Padding ranges of a record as (start << 4) | length, four entries."""
    gaps = []
    for p in L.planes:
        end = p.offset + p.nbytes
        if end % ALIGN:
            gaps.append((end, ALIGN - end % ALIGN))
    meta_end = max(off + size * L.n_groups for off, size in (
        (L.scale, 2), (L.minimum, 2), (L.lo_value, 2), (L.hi_value, 2), (L.lo_index, 1),
        (L.hi_index, 1)) if off is not None)
    if meta_end < L.record_bytes:
        gaps.append((meta_end, L.record_bytes - meta_end))
    assert len(gaps) <= 4 and all(n < 16 and s % 2 == 0 and n % 2 == 0 for s, n in gaps)
    return [(s << 4) | n for s, n in gaps] + [0] * (4 - len(gaps))


def _shape(cfg: CodecConfig, shape: Optional[Shape], defaults: dict, allowed) -> Shape:
    V, U = shape or defaults["fp8" if cfg.is_fp8 else "int"]
    if (V, U) not in allowed:
        raise ValueError(f"kernel shape {(V, U)} is not one of {allowed}")
    return min(V, cfg.group_size), U


def kernel_shape(cfg: CodecConfig, direction: str, shape: Optional[Shape] = None) -> Shape:
    """The (values per chunk, chunks per thread) an encode or decode of ``cfg`` runs with."""
    if direction == "encode":
        return _shape(cfg, shape, ENCODE_SHAPE, ENCODE_SHAPES)
    return _shape(cfg, shape, DECODE_SHAPE, DECODE_SHAPES)


def _geometry(T: int, L: RecordLayout, V: int):
    """Per launch (token range): first token, items (chunks), log2(lanes per group), items
    per token and its fastdiv multiplier and shift."""
    ipt = L.padded_hidden // V
    mul, shift = _fastdiv(ipt)
    step = max(1, _MAX_ITEMS // ipt)  # tokens per launch
    log2L = (L.group_size // V).bit_length() - 1
    for t0 in range(0, T, step):
        yield t0, (min(T, t0 + step) - t0) * ipt, log2L, ipt, mul, shift


# The kernels' argument structs (EncArgs, DecArgs in csrc/), passed by value.
_i4, _u4 = "<i4", "<u4"
ENC_ARGS = np.dtype([("H", _i4), ("log2L", _i4), ("padded", _i4), ("rec_bytes", _i4),
                     ("ipt", _u4), ("div_mul", _u4), ("div_shift", _u4), ("total", _u4),
                     ("o4", _i4), ("o2", _i4), ("o1", _i4), ("o_scale", _i4), ("o_min", _i4),
                     ("o_lov", _i4), ("o_hiv", _i4), ("o_loi", _i4), ("o_hii", _i4),
                     ("gap", _i4, (4,)), ("seed_key", _u4), ("counter0", _u4), ("vec", _i4)])
DEC_ARGS = np.dtype([("H", _i4), ("log2L", _i4), ("rec_bytes", _i4), ("ipt", _u4),
                     ("div_mul", _u4), ("div_shift", _u4), ("total", _u4), ("o4", _i4),
                     ("o2", _i4), ("o1", _i4), ("o_scale", _i4), ("o_min", _i4), ("o_lov", _i4),
                     ("o_hiv", _i4), ("o_loi", _i4), ("o_hii", _i4), ("vec", _i4), ("dense", _i4)])


def _struct(dtype: np.dtype, **fields) -> np.ndarray:
    a = np.zeros(1, dtype=dtype)
    for k, v in fields.items():
        a[k] = v
    return a


def _ptr(t: torch.Tensor, offset_bytes: int = 0):
    return np.uint64(t.data_ptr() + offset_bytes)


def _planes(L: RecordLayout) -> tuple[int, int, int]:
    """Offsets of the 4-bit (or 8-bit) plane, the 2-bit and the 1-bit plane (0 if absent)."""
    off = {p.width: p.offset for p in L.planes}
    return off.get(4, off.get(8, 0)), off.get(2, 0), off.get(1, 0)


def _meta(L: RecordLayout) -> list[int]:
    return [o or 0 for o in (L.scale, L.minimum, L.lo_value, L.hi_value, L.lo_index, L.hi_index)]


# ---- encode / decode implementations (the custom ops' bodies) -------------------------------
def _layout_fields(L: RecordLayout) -> dict:
    o4, o2, o1 = _planes(L)
    names = ("o_scale", "o_min", "o_lov", "o_hiv", "o_loi", "o_hii")
    # the encode kernels address metadata field k as o_scale + k * (o_min - o_scale) (and the
    # index arrays likewise): consecutive arrays, as format.record_layout lays them out
    n = L.n_groups
    assert L.minimum is None or L.minimum == L.scale + 2 * n
    assert L.lo_value is None or (L.lo_value, L.hi_value, L.lo_index, L.hi_index) == (
        L.scale + 4 * n, L.scale + 6 * n, L.scale + 8 * n, L.scale + 9 * n)
    return dict(o4=o4, o2=o2, o1=o1, rec_bytes=L.record_bytes, **dict(zip(names, _meta(L))))


def encode_impl(x: torch.Tensor, cfg: CodecConfig, seed: int, shape: Optional[Shape] = None,
                defines: tuple[str, ...] = (), out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens [T, H] on a CUDA device -> records uint8 [T, record_bytes] (no validation).
    ``shape`` (V, U) and ``defines`` pick kernel variants (benchmarks). ``out``: a
    contiguous, 16-byte aligned uint8 [T, record_bytes] to write (the all-reduce's buffers)."""
    T, H = x.shape
    L = record_layout(H, cfg, x.dtype)
    x = x.contiguous()
    if T == 0:
        return torch.zeros(0, L.record_bytes, dtype=torch.uint8, device=x.device)
    rec = torch.empty(T, L.record_bytes, dtype=torch.uint8, device=x.device) if out is None else out
    if cfg.is_native:
        return reference.encode_native(x, rec)
    if cfg.is_passthrough:  # NaN as the canonical NaN bits, like the reference
        wire = reference.wire_float(x.dtype)
        nan = reference.CANONICAL_NAN[wire]
        rec.view(torch.int16)[:, :H] = torch.where(torch.isnan(x), nan, x.to(wire).view(torch.int16))
        rec[:, 2 * H:].zero_()
        return rec
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    vec = H % 8 == 0 and x.data_ptr() % 16 == 0
    stochastic = cfg.is_int and cfg.rounding == "stochastic"
    seed_key = _lowbias32(seed & 0xFFFFFFFF) if stochastic else 0
    xp, rp = x.data_ptr(), rec.data_ptr()
    for fn, blocks, x_off, rec_off, struct, arg in _encode_launches(dev, T, H, cfg, x.dtype, vec,
                                                                    shape, defines):
        if stochastic:
            struct["seed_key"] = seed_key
        _run(dev, fn, blocks, [np.uint64(xp + x_off), np.uint64(rp + rec_off), arg])
    return rec


@functools.lru_cache(maxsize=4096)
def _encode_launches(dev: int, T: int, H: int, cfg: CodecConfig, dtype: torch.dtype, vec: bool,
                     shape: Optional[Shape], defines: tuple) -> tuple:
    """The kernel launches of one encode: (kernel, blocks, token and record byte offsets,
    argument struct, the struct as a launch argument) each. Cached: the host time of a call
    is then a few launches."""
    L = record_layout(H, cfg)
    V, U = _shape(cfg, shape, ENCODE_SHAPE, ENCODE_SHAPES)
    name = _encode_name(cfg, dtype, V, U, dense=vec and H % DENSE_GROUP == 0)
    fn = _function(dev, "codec_encode.cu", name, defines)
    launches = []
    for t0, items, log2L, ipt, mul, shift in _geometry(T, L, V):
        # the noise counter (token * padded_hidden + position) counts tokens from the batch start
        args = _struct(ENC_ARGS, H=H, log2L=log2L, padded=L.padded_hidden, ipt=ipt, div_mul=mul,
                       div_shift=shift, total=items, gap=_gaps(L), seed_key=0,
                       counter0=t0 * L.padded_hidden & 0xFFFFFFFF, vec=int(vec), **_layout_fields(L))
        launches.append((fn, _blocks(-(-items // U)), t0 * H * dtype.itemsize, t0 * L.record_bytes,
                         args, by_value(args)))
    return tuple(launches)


def decode_impl(records: torch.Tensor, cfg: CodecConfig, hidden: int, dtype: torch.dtype,
                shape: Optional[Shape] = None, defines: tuple[str, ...] = (),
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Records [T, record_bytes] on a CUDA device -> tokens [T, hidden] (no validation).
    ``out``: a contiguous [T, hidden] tensor of ``dtype`` to write (the all-reduce's output)."""
    T = records.shape[0]
    L = record_layout(hidden, cfg, dtype)
    records = records.contiguous()
    if records.data_ptr() % 16:
        records = records.clone()  # the kernels read planes with 16-byte loads
    if T == 0:
        return torch.empty(0, hidden, dtype=dtype, device=records.device)
    y = torch.empty(T, hidden, dtype=dtype, device=records.device) if out is None else out
    if cfg.is_native:  # a copy of the tokens' bytes
        y.view(torch.uint8).copy_(records[:, :hidden * dtype.itemsize])
        return y
    if cfg.is_passthrough:  # a copy: a custom op's output must not alias its input
        return y.copy_(records.view(reference.wire_float(dtype))[:, :hidden])
    dev = records.device.index if records.device.index is not None else torch.cuda.current_device()
    rp, yp = records.data_ptr(), y.data_ptr()
    for fn, blocks, rec_off, y_off, arg in _decode_launches(dev, T, hidden, cfg, dtype, shape,
                                                            defines):
        _run(dev, fn, blocks, [np.uint64(rp + rec_off), np.uint64(yp + y_off), arg])
    return y


@functools.lru_cache(maxsize=4096)
def _decode_launches(dev: int, T: int, hidden: int, cfg: CodecConfig, dtype: torch.dtype,
                     shape: Optional[Shape], defines: tuple) -> tuple:
    """The kernel launches of one decode, as _encode_launches (record, token offsets)."""
    L = record_layout(hidden, cfg)
    V, U = _shape(cfg, shape, DECODE_SHAPE, DECODE_SHAPES)
    t = _CTYPE[dtype]
    if cfg.is_fp8:
        name = f"mfc::decode_fp8<{t}, {V}, {U}>"
    else:
        name = f"mfc::decode_int<{t}, {cfg.bits}, {str(cfg.spikes).lower()}, {V}, {U}>"
    fn = _function(dev, "codec_decode.cu", name, defines)
    launches = []
    for t0, items, log2L, ipt, mul, shift in _geometry(T, L, V):
        args = _struct(DEC_ARGS, H=hidden, log2L=log2L, ipt=ipt, div_mul=mul, div_shift=shift,
                       total=items, vec=int(hidden % 8 == 0), dense=int(L.padded_hidden == hidden),
                       **_layout_fields(L))
        launches.append((fn, _blocks(-(-items // U)), t0 * L.record_bytes,
                         t0 * hidden * dtype.itemsize, by_value(args)))
    return tuple(launches)


def _encode_name(cfg: CodecConfig, dtype: torch.dtype, V: int, U: int, dense: bool) -> str:
    """The encode kernel's name expression. ``dense``: rows 16-byte aligned with a hidden size
    that is a multiple of DENSE_GROUP; with groups of that size an integer encode then takes
    the kernel copy that holds no code for partial chunks and unaligned rows (DG = 128)."""
    t = _CTYPE[dtype]
    if cfg.is_fp8:
        return f"mfc::encode_fp8<{t}, {V}, {U}>"
    sp, sr = str(cfg.spikes).lower(), str(cfg.rounding == "stochastic").lower()
    dg = DENSE_GROUP if dense and cfg.group_size == DENSE_GROUP else 0
    return f"mfc::encode_int<{t}, {cfg.bits}, {sp}, {sr}, {V}, {U}, {dg}>"


def kernel_names(cfg: CodecConfig, dtype: torch.dtype, encode_shape: Optional[Shape] = None,
                 decode_shape: Optional[Shape] = None) -> list[tuple[str, str]]:
    """(source, name expression) of the kernels a config uses for one dtype (the encode for
    dense rows and for the others)."""
    if not cfg.is_quantized:
        return []
    t = _CTYPE[dtype]
    (Ve, Ue) = _shape(cfg, encode_shape, ENCODE_SHAPE, ENCODE_SHAPES)
    (Vd, Ud) = _shape(cfg, decode_shape, DECODE_SHAPE, DECODE_SHAPES)
    encodes = dict.fromkeys(_encode_name(cfg, dtype, Ve, Ue, dense) for dense in (True, False))
    decode = (f"mfc::decode_fp8<{t}, {Vd}, {Ud}>" if cfg.is_fp8 else
              f"mfc::decode_int<{t}, {cfg.bits}, {str(cfg.spikes).lower()}, {Vd}, {Ud}>")
    return [("codec_encode.cu", e) for e in encodes] + [("codec_decode.cu", decode)]


def precompile(configs: Iterable[CodecConfig], dtypes: Iterable[torch.dtype] = tuple(_CTYPE),
               device: Optional[int] = None, workers: Optional[int] = None,
               encode_shape: Optional[Shape] = None, decode_shape: Optional[Shape] = None,
               defines: tuple[str, ...] = ()) -> int:
    """Compile the kernels of ``configs`` x ``dtypes`` into the disk cache, NVRTC runs in
    parallel threads. Returns how many kernels were compiled or found."""
    arch = _arch(torch.cuda.current_device() if device is None else device)
    jobs = sorted({k for c in configs for d in dtypes
                   for k in kernel_names(CodecConfig.coerce(c), d, encode_shape, decode_shape)})
    with ThreadPoolExecutor(workers or os.cpu_count() or 4) as pool:
        list(pool.map(lambda j: compile_kernel(j[0], j[1], arch, defines), jobs))
    return len(jobs)


# ---- custom ops ----------------------------------------------------------------------------
def _cfg(bits: str, group_size: int, spikes: bool, rounding: str) -> CodecConfig:
    """The CodecConfig of a custom op's arguments (``bits`` as str(cfg.bits))."""
    return CodecConfig(bits=int(bits) if bits.isdigit() else bits, group_size=group_size,
                       spikes=spikes, rounding=rounding)


@torch.library.custom_op("moe_flashcomm::encode", mutates_args=())
def encode_op(x: torch.Tensor, bits: str, group_size: int, spikes: bool, rounding: str,
              seed: int) -> torch.Tensor:
    return encode_impl(x, _cfg(bits, group_size, spikes, rounding), seed)


@encode_op.register_fake
def _(x, bits, group_size, spikes, rounding, seed):
    L = record_layout(x.shape[1], _cfg(bits, group_size, spikes, rounding), x.dtype)
    return x.new_empty((x.shape[0], L.record_bytes), dtype=torch.uint8)


@torch.library.custom_op("moe_flashcomm::decode", mutates_args=())
def decode_op(records: torch.Tensor, bits: str, group_size: int, spikes: bool, hidden: int,
              dtype: torch.dtype) -> torch.Tensor:
    return decode_impl(records, _cfg(bits, group_size, spikes, "nearest"), hidden, dtype)


@decode_op.register_fake
def _(records, bits, group_size, spikes, hidden, dtype):
    return records.new_empty((records.shape[0], hidden), dtype=dtype)


# ---- public entry points -------------------------------------------------------------------
def _check_device(t: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # checked when the op runs; keeps the graph whole
        return
    _cupy()
    if not torch.cuda.is_available():
        raise RuntimeError(f"moe_flashcomm: no usable CUDA GPU for a {t.device} tensor")


def encode(x: torch.Tensor, cfg: CodecConfig, seed: reference.Seed = None) -> torch.Tensor:
    """Encode CUDA tokens ``x`` [T, H] (fp32/bf16/fp16) into records uint8 [T, record_bytes]."""
    cfg = CodecConfig.coerce(cfg)
    reference.check_input(x)
    _check_device(x)
    s = reference.resolve_seed(seed) if cfg.is_int and cfg.rounding == "stochastic" else 0
    return encode_op(x, str(cfg.bits), cfg.group_size, cfg.spikes, cfg.rounding, s)


def decode(records: torch.Tensor, cfg: CodecConfig, hidden: int,
           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode CUDA records uint8 [T, record_bytes] into tokens [T, hidden] of ``dtype``."""
    cfg = CodecConfig.coerce(cfg)
    L = record_layout(hidden, cfg, dtype)
    reference.check_records(records, L, dtype)
    _check_device(records)
    return decode_op(records, str(cfg.bits), cfg.group_size, cfg.spikes, hidden, dtype)
