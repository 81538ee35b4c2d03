"""Every kernel of ``csrc/``: compiled with NVRTC at first use (cached on disk), loaded once per
device, and launched through the CUDA driver's ``cuLaunchKernel`` with arguments packed once.

:func:`prepare_launch` gives one kernel launch whose argument block is built when its plan is
made; a call writes only the pointers that change (the tensors' addresses) and calls the driver:
a few microseconds of host time, no Python-side argument conversion per call. The calls go
through the compiled launcher (csrc/launcher.cpp, built on the first CUDA call with torch's
extension builder) or, with MOE_FLASHCOMM_NATIVE_LAUNCH=0 or no compiler, through ctypes,
with the same argument blocks. The argument structs are declared once here (``STRUCTS``),
mirrored from csrc, and ``tests/test_kernel_structs.py`` checks their sizes and offsets
against the .cu declarations with nvcc.

State: one :class:`KernelCache` per process (``KERNELS``) holds the loaded modules, the
per-shape launch plans of the codec and of the all-reduce's fused reduction, and the
prepared repeats of the public codec calls; everything else belongs to a Communicator.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import sys
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from . import env
from .memo import remember

CUPY_HINT = ("install CuPy for your CUDA version: pip install moe-flashcomm[cuda12] "
             "(CUDA 12) or pip install moe-flashcomm[cuda13] (CUDA 13)")
BLOCK = 256  # threads per block (kBlock in csrc/codec_common.cuh)
# Spec arithmetic: no FMA contraction, no flush-to-zero (CuPy's own compile path forces
# -ftz=true, which is why this module drives NVRTC itself).
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true",
                 "--prec-sqrt=true")

# ---- argument structs (passed by value), one declaration each --------------------------------
_i4, _u4, _u8 = "<i4", "<u4", "<u8"
MAX_PEERS = 16  # kMaxPeers in csrc/p2p.cu
ENC_ARGS = np.dtype([("H", _i4), ("log2L", _i4), ("padded", _i4), ("rec_bytes", _i4),
                     ("ipt", _u4), ("div_mul", _u4), ("div_shift", _u4), ("total", _u4),
                     ("o4", _i4), ("o2", _i4), ("o1", _i4), ("o_scale", _i4), ("o_min", _i4),
                     ("o_lov", _i4), ("o_hiv", _i4), ("o_loi", _i4), ("o_hii", _i4),
                     ("gap", _i4, (4,)), ("seed_key", _u4), ("counter0", _u4), ("vec", _i4)],
                    align=True)
DEC_ARGS = np.dtype([("H", _i4), ("log2L", _i4), ("rec_bytes", _i4), ("ipt", _u4),
                     ("div_mul", _u4), ("div_shift", _u4), ("total", _u4), ("o4", _i4),
                     ("o2", _i4), ("o1", _i4), ("o_scale", _i4), ("o_min", _i4), ("o_lov", _i4),
                     ("o_hiv", _i4), ("o_loi", _i4), ("o_hii", _i4), ("vec", _i4), ("dense", _i4)],
                    align=True)
REDUCE_ARGS = np.dtype([("enc", ENC_ARGS), ("dec", DEC_ARGS), ("world", _i4), ("rank", _i4),
                        ("peer_base", _i4), ("peer_step", _i4), ("write_slot", _i4),
                        ("stamp", _u8), ("error_page", _u8), ("slot_stamp", _u8),
                        ("numel", _u8)], align=True)
P2P_ARGS = np.dtype([("peer_flags", _u8, (MAX_PEERS,)), ("send_stamp", _u8, (MAX_PEERS,)),
                     ("recv_stamp", _u8, (MAX_PEERS,)), ("error_page", _u8),
                     ("timeout_ns", _u8), ("copy_n16", _u8), ("stamp_detail", _u8),
                     ("rank", _i4), ("world", _i4), ("mode", _i4), ("advance", _i4)], align=True)
EXCHANGE_TASK = np.dtype([("offset", _u8), ("remote", _u8), ("items", _u4), ("first", _u4),
                          ("blocks", _u4), ("peer", _i4)], align=True)
EXCHANGE_ARGS = np.dtype([("task", EXCHANGE_TASK, (2 * (MAX_PEERS - 1),)),
                          ("keep_src", _u8), ("keep_dst", _u8), ("keep_first", _u4),
                          ("keep_blocks", _u4), ("sends", _i4), ("tasks", _i4)], align=True)
STAMP_CHECKS = 32  # kStampChecks in csrc/stamp_check.cu: slots one launch checks
STAMP_TABLE = np.dtype([("offset", _u8, (STAMP_CHECKS,)), ("want", _u8, (STAMP_CHECKS,)),
                        ("peer", _i4, (STAMP_CHECKS,)), ("error_page", _u8), ("n", _i4),
                        ("kind", _i4)], align=True)
# csrc/p2p.cu: word offsets of a rank's flags (landed and freed per peer, the call counter,
# block-completion counts per task kind and peer, the peers' stamps, p2p_exchange's ticket
# and block counters), p2p_sync's modes and p2p_exchange's
P2P_LANDED, P2P_FREED, P2P_COUNTER = 0, MAX_PEERS, 2 * MAX_PEERS
P2P_STAMP, P2P_TICKET, P2P_DONE = 4 * MAX_PEERS + 1, 5 * MAX_PEERS + 1, 5 * MAX_PEERS + 2
P2P_FLAG_WORDS = P2P_DONE + 1
# the error page (csrc/error_page.cuh): claimed, peer, word seen, word expected, call, kind,
# reported (written last)
P2P_ERROR_WORDS, P2P_ERROR_KIND, P2P_ERROR_SET = 7, 5, 6
# its kinds: a stamp that differs, a wait for "freed" or for "landed" that timed out, a stamp
# that differs in an all-reduce's reduce-scatter, the same stamp with another numel there
P2P_ERROR_STAMP, P2P_ERROR_FREED_TIMEOUT, P2P_ERROR_LANDED_TIMEOUT = 1, 2, 3
P2P_ERROR_REDUCE_STAMP, P2P_ERROR_REDUCE_NUMEL = 4, 5
WAIT_FREED, PUBLISH_LANDED, WAIT_LANDED, PUBLISH_FREED = 1, 2, 4, 8
EXCHANGE_STAGE = 16  # p2p_exchange's mode: encode into a staging buffer, publish nothing
# exchanges another transport carries (NCCL: p2p_exchange's LOCAL variant, the all-reduce's
# reduce-scatter): each pair's records behind a slot of STAMP_BYTES in the local buffers, its
# stamp and a second word (the all-reduce's numel, else 0)
STAMP_BYTES = 16
# in place of a stamp: the rank that wrote it saw ranks disagree in this call (kSawDisagreement)
SAW_DISAGREEMENT = (1 << 64) - 1
# C name -> (numpy layout, the csrc file that declares it)
STRUCTS = {"EncArgs": (ENC_ARGS, "codec_encode.cu"), "DecArgs": (DEC_ARGS, "codec_decode.cu"),
           "ReduceArgs": (REDUCE_ARGS, "allreduce.cu"), "P2PArgs": (P2P_ARGS, "p2p.cu"),
           "ExchangeTask": (EXCHANGE_TASK, "p2p.cu"), "ExchangeArgs": (EXCHANGE_ARGS, "p2p.cu"),
           "StampTable": (STAMP_TABLE, "stamp_check.cu")}


def struct(dtype: np.dtype, **fields) -> np.ndarray:
    """A one-element argument struct with ``fields`` set (the rest zero)."""
    a = np.zeros(1, dtype=dtype)
    for k, v in fields.items():
        a[k] = v
    return a


# ---- sources and compilation -----------------------------------------------------------------
def cupy():
    """Import CuPy (NVRTC and device memory), or fail naming the extra that provides it."""
    try:
        import cupy as cp
        from cupy.cuda import function, nvrtc  # noqa: F401
    except ImportError as e:
        raise ImportError(f"moe_flashcomm: CUDA tensors need CuPy; {CUPY_HINT}") from e
    return cp


def csrc_dir() -> Path:
    """The kernel sources: ``<repo>/csrc`` in a source checkout, else the installed package."""
    here = Path(__file__).resolve().parents[1] / "csrc"
    if (here / "codec_common.cuh").is_file():
        return here
    return Path(str(resources.files("moe_flashcomm") / "csrc"))


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"[ \t]*$', re.M)


def kernel_source(name: str) -> str:
    """``name`` (a csrc/*.cu file) with the csrc files it includes by name inlined, each once,
    so the source text alone determines the binary (and its cache key)."""
    d = csrc_dir()
    seen: set = set()

    def inline(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        return _INCLUDE.sub(lambda m: inline(m.group(1)), (d / fname).read_text())

    return inline(name)


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
    cands += [os.path.join(home, "include") for home in env.cuda_homes()]
    cands.append("/usr/local/cuda/include")
    found = [c for c in cands if c and os.path.isfile(os.path.join(c, "cuda_fp8.h"))]
    if not found:
        raise RuntimeError("moe_flashcomm: no CUDA headers (cuda_fp8.h) found for NVRTC; "
                           f"set CUDA_HOME or {CUPY_HINT}")
    return found[:1]


# A cache entry: one header line ``CACHE_MAGIC <key> <sha256 of key, name and cubin>``, then the
# lowered name and the cubin. The key (the entry's file name) hashes everything the binary
# depends on, so a file that is truncated, corrupted, or belongs to another key or to no one
# fails the check and is compiled again.
CACHE_MAGIC = b"moe_flashcomm-kernel-v1"


def cache_key(source: str, name_expr: str, nvrtc_version, options: tuple[str, ...],
              headers: str = "") -> str:
    """The entry's file name: a hash of everything the cubin depends on (the source with its
    includes inlined, the name expression, NVRTC's version, the options: arch, defines, and
    ``headers``, the digest of the CUDA headers it includes: :func:`headers_digest`)."""
    text = "\0".join((source, name_expr, str(nvrtc_version)) + tuple(options) + (headers,))
    return hashlib.sha256(text.encode()).hexdigest()


# The CUDA headers csrc/codec_common.cuh includes, whose inline code (the fp8, bf16 and fp16
# conversions) is compiled into every kernel. Their folder is in the options, but a toolkit
# changed in place (an upgraded wheel, /usr/local/cuda pointed at another version) keeps it,
# and NVRTC's version need not change with them: the key hashes their content.
CUDA_HEADERS = ("cuda_bf16.h", "cuda_bf16.hpp", "cuda_fp16.h", "cuda_fp16.hpp", "cuda_fp8.h",
                "cuda_fp8.hpp")


def headers_digest(include_dirs: Sequence[str]) -> str:
    """A hash of the CUDA_HEADERS NVRTC finds in ``include_dirs`` (about 1 ms: once per
    kernel and process, when it is loaded)."""
    h = hashlib.sha256()
    for name in CUDA_HEADERS:
        for d in include_dirs:
            try:
                h.update(name.encode() + b"\0" + Path(d, name).read_bytes())
                break
            except OSError:
                continue
    return h.hexdigest()


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
    _write_atomic(path, cache_entry(key, name, cubin))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # created as open() creates files (0666 less the umask), so that a cache shared by users
    # is read by all of them (NamedTemporaryFile's 0600 made the others compile again)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # (the write, its flush at close or the rename): no file left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def compile_kernel(source_name: str, name_expr: str, arch: str,
                   defines: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """(lowered name, cubin) of one template instance, from the disk cache or NVRTC (a cache
    entry that fails its check is compiled again and replaced).
    ``defines`` select kernel variants for benchmarks (e.g. MFC_SCALAR_STATS)."""
    cupy()
    from cupy.cuda import nvrtc
    src = kernel_source(source_name)
    defines = tuple(defines) + env.kernel_defines()
    opts = (f"--gpu-architecture={arch}",) + NVRTC_OPTIONS + tuple(f"-D{d}" for d in defines)
    includes = _include_dirs()
    opts += tuple(f"-I{d}" for d in includes)
    key = cache_key(src, name_expr, nvrtc.getVersion(), opts, headers_digest(includes))
    path = env.kernel_cache_dir() / f"{key}.bin"
    # (no exists() first: in a folder this user may not enter it raises, where reading
    # returns None and the kernel is compiled)
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
    try:
        write_cache_file(path, key, name, cubin)
    except OSError as e:  # a read-only or full disk costs the entry, not the kernel
        warnings.warn(f"moe_flashcomm: could not write the kernel cache entry {path} ({e}); "
                      "the kernel is compiled again by every process. Set MOE_FLASHCOMM_CACHE "
                      "to a writable folder.", RuntimeWarning, stacklevel=2)
    return name, cubin


def arch(device: int) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def precompile_names(jobs: Iterable[tuple[str, str]], device: Optional[int] = None,
                     workers: Optional[int] = None, defines: tuple[str, ...] = ()) -> int:
    """Compile (source, name expression) pairs into the disk cache, NVRTC in parallel threads."""
    target = arch(torch.cuda.current_device() if device is None else device)
    jobs = sorted(set(jobs))
    with ThreadPoolExecutor(workers or os.cpu_count() or 4) as pool:
        list(pool.map(lambda j: compile_kernel(j[0], j[1], target, defines), jobs))
    return len(jobs)


# ---- the driver ------------------------------------------------------------------------------
INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


class _Driver:
    """The driver calls of the hot path, through ctypes: launch and asynchronous copy."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        # The hot path's calls only queue work (microseconds) and keep the GIL (a PyDLL):
        # giving it up lets any other busy Python thread of the process take it for up to
        # its switch interval, 5 ms a launch when measured (docs/notes.md).
        hot = ctypes.PyDLL("libcuda.so.1")
        vp, ui = ctypes.c_void_p, ctypes.c_uint
        self.launch = hot.cuLaunchKernel
        self.launch.argtypes = [vp, ui, ui, ui, ui, ui, ui, ui, vp, vp, vp]
        self.launch.restype = ctypes.c_int
        self.launch_address = ctypes.cast(self.launch, vp).value  # (the compiled launcher's)
        self.copy = hot.cuMemcpyAsync
        self.copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, vp]
        self.copy.restype = ctypes.c_int
        self._error_string = lib.cuGetErrorString
        self._error_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._lib = lib
        self._contexts: dict = {}
        self.event_record = hot.cuEventRecord
        self.event_record.argtypes = [vp, vp]
        self.stream_wait = hot.cuStreamWaitEvent
        self.stream_wait.argtypes = [vp, vp, ui]
        # (the compiled launcher's Program calls these three directly)
        self.step_addresses = tuple(ctypes.cast(f, vp).value for f in
                                    (self.copy, self.event_record, self.stream_wait))

    def event(self, device: int) -> int:
        """A new event (no timing) of ``device``'s context, for ordering streams."""
        self.make_current(device)
        ev = ctypes.c_void_p()
        rc = self._lib.cuEventCreate(ctypes.byref(ev), 2)  # CU_EVENT_DISABLE_TIMING
        if rc:
            raise self.error(rc, "cuEventCreate")
        return ev.value

    def destroy_event(self, event: int) -> None:
        """Release an event made by ``event`` (work queued on it completes first)."""
        self._lib.cuEventDestroy_v2(ctypes.c_void_p(event))

    def make_current(self, device: int) -> None:
        """Make ``device``'s primary context (torch's) current in this thread: threads that
        never touched the runtime (autograd's backward threads) have none for the driver."""
        ctx = self._contexts.get(device)
        if ctx is None:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            for rc, what in ((self._lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet"),
                             (self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
                              "cuDevicePrimaryCtxRetain")):
                if rc:
                    raise self.error(rc, what)
            self._contexts[device] = ctx
        rc = self._lib.cuCtxSetCurrent(ctx)
        if rc:
            raise self.error(rc, "cuCtxSetCurrent")

    def error(self, code: int, what: str) -> CudaError:
        s = ctypes.c_char_p()
        self._error_string(code, ctypes.byref(s))
        return CudaError(f"{what} failed: CUDA error {code} "
                         f"({s.value.decode() if s.value else 'unknown'})")


class Value(int):
    """A kernel argument passed as a fixed 64-bit value (not a pointer a call fills in)."""


MAX_POINTERS = 8  # pointer parameters a launch may take (csrc/launcher.cpp)
PreparedLaunch = Callable[..., None]  # prepare_launch's result: (stream, *bases) -> None


class ArgumentBlock:
    """A kernel's parameters, packed once into ctypes cells: an int is a pointer (a call's
    base address plus this offset), a :class:`Value` a fixed u64, a one-element numpy
    struct an argument struct (``args`` is a writable view of its copy)."""
    __slots__ = ("cells", "array", "pointers", "args")

    def __init__(self, params: Sequence) -> None:
        self.args = None
        cells, pointers = [], []
        for p in params:
            if isinstance(p, np.ndarray):
                cell = (ctypes.c_uint8 * p.dtype.itemsize).from_buffer_copy(p.tobytes())
                self.args = np.frombuffer(cell, dtype=p.dtype, count=1)  # writable view
            elif isinstance(p, Value):
                cell = ctypes.c_uint64(int(p))
            else:
                cell = ctypes.c_uint64(0)
                pointers.append((cell, int(p)))
            cells.append(cell)
        if len(pointers) > MAX_POINTERS:
            raise ValueError(f"a launch takes at most {MAX_POINTERS} pointers, got {len(pointers)}")
        self.cells, self.pointers = cells, tuple(pointers)
        self.array = (ctypes.c_void_p * len(cells))(*[ctypes.addressof(c) for c in cells])


def prepare_launch(device: int, fn: int, blocks: int, params: Sequence,
                   threads: int = BLOCK) -> PreparedLaunch:
    """One kernel launch, its argument block built once: a callable ``(stream, *bases)``
    that writes the pointer parameters (base + offset, in order) and launches, with ``args``
    the writable view of its argument struct. Through the compiled launcher where it is
    turned on and built (``KERNELS.native``), else a :class:`CtypesLaunch`; both launch the
    same block."""
    block = ArgumentBlock(params)
    native = KERNELS.native
    if native is None:
        return CtypesLaunch(device, fn, blocks, threads, block)
    return compiled_launch(native, KERNELS.driver, device, fn, blocks, threads, block)


def compiled_launch(native, driver, device: int, fn: int, blocks: int, threads: int,
                    block: ArgumentBlock):
    """The compiled launcher's Launch of ``block``, calling the function at
    ``driver.launch_address`` (cuLaunchKernel's signature) and, on an invalid context,
    ``driver.make_current(device)`` once; a failure raises ``driver.error(code, what)``."""
    made = native.Launch(driver.launch_address, device, fn, blocks, threads,
                         ctypes.addressof(block.array),
                         [(ctypes.addressof(c), off) for c, off in block.pointers], block,
                         driver.make_current, driver.error)
    made.args = block.args
    return made


class CtypesLaunch:
    """A :func:`prepare_launch` through ctypes (MOE_FLASHCOMM_NATIVE_LAUNCH=0, or no compiler);
    ``driver`` as for :func:`compiled_launch` (default: the process's)."""
    __slots__ = ("_fn", "_blocks", "_threads", "_block", "_ptrs", "_params", "args",
                 "_driver", "_launch", "_device")

    def __init__(self, device: int, fn: int, blocks: int, threads: int,
                 block: ArgumentBlock, driver=None) -> None:
        self._driver = KERNELS.driver if driver is None else driver
        self._launch = self._driver.launch
        self._device, self._fn, self._blocks, self._threads = device, fn, blocks, threads
        # _block held: _ptrs and _params point into its ctypes cells
        self._block, self._ptrs, self._params, self.args = block, block.pointers, block.array, block.args

    def __call__(self, stream: int, *bases: int) -> None:
        for (cell, off), base in zip(self._ptrs, bases):
            cell.value = base + off
        drive(self._driver, self._device, "cuLaunchKernel", self._launch, self._fn,
              self._blocks, 1, 1, self._threads, 1, 1, 0, stream, self._params, None)


def drive(driver: _Driver, device: int, what: str, call, *args) -> None:
    """``call(*args)``, a driver call; where the thread has no context (autograd's threads),
    ``device``'s is made current and the call made once more; a failure raises CudaError."""
    rc = call(*args)
    if rc == INVALID_CONTEXT:
        driver.make_current(device)
        rc = call(*args)
    if rc:
        raise driver.error(rc, what)


def copy_async(device: int, dst: int, src: int, nbytes: int, stream: int,
               driver: Optional[_Driver] = None) -> None:
    """``nbytes`` from device address ``src`` to ``dst`` (local or a peer's mapping)."""
    if nbytes:
        driver = KERNELS.driver if driver is None else driver
        drive(driver, device, "cuMemcpyAsync", driver.copy, dst, src, nbytes, stream)


class Order:
    """Orders one stream after another with a driver event: ``Order(dev)(after, before)``
    makes stream ``after`` wait for the work queued so far on ``before``. Two driver calls,
    valid under CUDA graph capture (a fork or join of the captured streams)."""
    __slots__ = ("event", "_device", "_driver")

    def __init__(self, device: int, driver: Optional[_Driver] = None) -> None:
        self._driver = driver = KERNELS.driver if driver is None else driver
        self._device, self.event = device, driver.event(device)

    def __call__(self, after: int, before: int) -> None:
        d = self._driver
        drive(d, self._device, "cuEventRecord", d.event_record, self.event, before)
        drive(d, self._device, "cuStreamWaitEvent", d.stream_wait, after, self.event, 0)

    def __del__(self) -> None:
        # with its call (the steps that hold it, and the compiled program made of them): a
        # call is made per split, so uneven splits made events without end
        try:
            self._driver.destroy_event(self.event)
        except Exception:  # (at interpreter exit the library may be gone)
            pass


# ---- a call's steps as data: run by Python (ctypes) or by the compiled launcher ---------------
LAUNCH, COPY, ORDER, STAGE, CALL = range(5)  # Step.kind (csrc/launcher.cpp Program::Kind)
# what a step's address is an offset from: the call's tokens, its output, its staging buffer,
# nothing (peer buffers: they do not move while a plan holds them)
TOKENS, OUTPUT, STAGING, FIXED = range(4)
MAIN, SIDE = 0, 1  # the call's stream, the communicator's copy stream


class Step(NamedTuple):
    """One step of a call: LAUNCH ``target`` (a prepared launch) with ``refs`` its pointer
    bases; COPY ``nbytes`` from ``refs[1]`` to ``refs[0]`` on ``stream``; ORDER (``target``
    an Order) ``stream`` after the other one; STAGE a staging buffer of ``nbytes`` (it lives
    until the next STAGE or the call's end: order the main stream after its readers); CALL
    ``target()`` in Python (stochastic encodes draw a seed per call). A ref is (base, offset),
    base one of TOKENS, OUTPUT, STAGING, FIXED."""
    kind: int
    target: object = None
    refs: tuple = ()
    nbytes: int = 0
    stream: int = MAIN


def run_steps(steps: Sequence[Step], device: torch.device, main: int, side: int, tokens: int,
              output: int, driver: Optional[_Driver] = None) -> None:
    """Run ``steps`` on streams ``main`` and ``side`` of ``device`` (the twin of
    csrc/launcher.cpp's Program, which :func:`compiled_program` makes of the same steps)."""
    bases, streams = [tokens, output, 0, 0], (main, side)
    staging = None
    for step in steps:
        kind = step.kind
        if kind == LAUNCH:
            step.target(main, *[bases[b] + off for b, off in step.refs])
        elif kind == COPY:
            (db, do), (sb, so) = step.refs
            copy_async(device.index, bases[db] + do, bases[sb] + so, step.nbytes,
                       streams[step.stream], driver)
        elif kind == ORDER:
            step.target(streams[step.stream], streams[1 - step.stream])
        elif kind == STAGE:  # (held here until the next one or the call's end)
            staging = torch.empty(step.nbytes, dtype=torch.uint8, device=device)
            bases[STAGING] = staging.data_ptr()
        else:
            step.target()


def compiled_program(native, device: int, steps: Sequence[Step], driver=None):
    """The compiled launcher's Program of ``steps``, or None where a launch among them is not
    a compiled one (prepared through ctypes)."""
    if any(s.kind == LAUNCH and not isinstance(s.target, native.Launch) for s in steps):
        return None
    driver = KERNELS.driver if driver is None else driver
    return native.Program([(s.kind, s.target.event if s.kind == ORDER else s.target,
                            s.refs, s.nbytes, s.stream) for s in steps],
                          device, driver.step_addresses, driver.make_current, driver.error)


# torch's current stream of a device as a handle (the C call torch.compile's code uses)
raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)


def device_index(t: torch.Tensor) -> int:
    """The index of a CUDA tensor's device (``t.device`` would build a device object)."""
    return t.get_device()


def index_of(device: torch.device) -> int:
    """The index of a CUDA device (``cuda`` alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_ALREADY_CURRENT = contextlib.nullcontext()  # (reusable: it holds no state)


def on_device(dev: int):
    """A context that makes ``dev`` current for a launch (its kernels live in its context)."""
    return _ALREADY_CURRENT if dev == _current_device() else torch.cuda.device(dev)


_UNBUILT = object()


def build_launcher(strict: bool = False):
    """Build (or load from the kernel cache) csrc/launcher.cpp with torch's C++ extension
    builder. The module is checked against the checksum written beside it when it was built
    (loading a truncated one would kill the process with SIGBUS): a damaged entry is built
    again. A failure warns and returns None (``strict``: raises), naming the cause."""
    src = csrc_dir() / "launcher.cpp"
    # a module per source, torch installation and Python: environments that share the cache
    # never rebuild each other's (torch's builder would, in place, for other include paths)
    tag = hashlib.sha256(b"\0".join([src.read_bytes(), torch.__version__.encode(),
                                     torch.__file__.encode(), sys.version.encode()])
                         ).hexdigest()[:16]
    name = f"moe_flashcomm_launcher_{tag}"
    if name in sys.modules:  # loaded by this process already
        return sys.modules[name]
    build = env.kernel_cache_dir() / name
    module, checksum = build / f"{name}.so", build / f"{name}.so.sha256"
    try:
        from torch.utils.cpp_extension import load
        build.parent.mkdir(parents=True, exist_ok=True)
        # one process at a time checks, builds and stamps (the ranks of a node start
        # together): a check must never see, and remove, a module another is still linking
        with open(build.parent / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if module.exists() and not _matches(module, checksum):
                shutil.rmtree(build)  # damaged or unfinished: built again
            build.mkdir(exist_ok=True)
            if not module.exists():
                print(f"moe_flashcomm: compiling the kernel launcher once (about 20-60 s) into "
                      f"{build}", file=sys.stderr, flush=True)
            loaded = load(name, [str(src)], extra_cflags=["-O2"], build_directory=str(build))
            if not _matches(module, checksum):  # just built
                _write_atomic(checksum, hashlib.sha256(module.read_bytes()).hexdigest().encode())
        return loaded
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers, a full disk
        if strict:
            raise
        warnings.warn(f"moe_flashcomm: the compiled launcher (csrc/launcher.cpp) could not be "
                      f"built ({type(e).__name__}: {e}); kernels are launched through ctypes, a "
                      f"few microseconds more per call. MOE_FLASHCOMM_NATIVE_LAUNCH=0 skips the "
                      f"build.", RuntimeWarning, stacklevel=2)
        return None


def _matches(path: Path, checksum: Path) -> bool:
    """``path``'s content has the sha256 recorded in ``checksum``."""
    try:
        return checksum.read_bytes().strip() == hashlib.sha256(path.read_bytes()).hexdigest().encode()
    except OSError:
        return False


class KernelCache:
    """Loaded kernels per (device, source, name, defines) and the codec's launch plans per
    shape: the process's one cache of compiled code. Loading is thread-safe."""

    def __init__(self) -> None:
        self._functions: dict = {}
        self._driver: Optional[_Driver] = None
        self._native = _UNBUILT
        self.plans: dict = {}  # launch plans by shape (codec, fused reduction), public repeats
        self._plan_sets: dict = {}  # compiled or not -> codec plans (use_launcher)
        self._lock = threading.Lock()

    @property
    def driver(self) -> _Driver:
        if self._driver is None:
            self._driver = _Driver()
        return self._driver

    @property
    def native(self):
        """The compiled launcher module (csrc/launcher.cpp), built the first time; None with
        MOE_FLASHCOMM_NATIVE_LAUNCH=0 or where it cannot be built (launches then use ctypes)."""
        if self._native is _UNBUILT:
            with self._lock:
                if self._native is _UNBUILT:
                    self._native = build_launcher() if env.native_launch() else None
        return self._native

    def use_launcher(self, compiled: bool) -> None:
        """Prepare launches from now on through the compiled launcher (built if need be) or
        ctypes, whatever the environment says: benchmarks compare the two in one process.
        Each keeps its own codec plans; launches prepared before keep their launcher."""
        self._native = build_launcher(strict=True) if compiled else None
        self.plans = self._plan_sets.setdefault(compiled, {})

    def function(self, device: int, source_name: str, name_expr: str,
                 defines: tuple[str, ...] = ()) -> int:
        """The CUfunction handle of a kernel on ``device`` (modules belong to its context)."""
        key = (device, source_name, name_expr, defines)
        hit = self._functions.get(key)
        if hit is None:
            cp = cupy()
            from cupy.cuda import function
            name, cubin = compile_kernel(source_name, name_expr, arch(device), defines)
            with self._lock, cp.cuda.Device(device):
                # checked again: a thread that loaded it meanwhile has handed out its handle,
                # which replacing its module would unload
                hit = self._functions.get(key)
                if hit is None:
                    mod = function.Module()
                    mod.load(cubin)
                    hit = self._functions[key] = (mod, mod.get_function(name))
        return hit[1].ptr

    def plan(self, key: tuple, make):
        """The codec launch plan under ``key``, made by ``make()`` the first time."""
        return remember(self.plans, key, make, 4096)


KERNELS = KernelCache()


def blocks(threads: int) -> int:
    """Blocks of BLOCK threads that cover ``threads`` threads."""
    return -(-threads // BLOCK)


# ---- launchers of csrc/p2p.cu ------------------------------------------------------------------
COPY_BLOCKS = 264  # most extra copy blocks of a launch (two per multiprocessor of an H200)


def copy_blocks(copy_bytes: int) -> int:
    """Extra blocks that copy ``copy_bytes`` (16-byte words, four per thread) in a launch."""
    words = copy_bytes // 16
    return min(COPY_BLOCKS, blocks(-(-words // 4))) if words else 0


def p2p_args(peer_flags: Sequence[int], rank: int, world: int, timeout_ns: int,
             **fields) -> np.ndarray:
    """The P2PArgs of csrc/p2p.cu's kernels for one rank of a group."""
    flags = list(peer_flags) + [0] * (MAX_PEERS - len(peer_flags))
    return struct(P2P_ARGS, peer_flags=flags, rank=rank, world=world, timeout_ns=timeout_ns,
                  **fields)


def sync_launch(device: int, args: np.ndarray, copy_bytes: int = 0) -> PreparedLaunch:
    """p2p_sync with ``args`` (its mode, advance, copy_n16 set): block 0 waits for / publishes
    to every peer, the other blocks copy ``copy_bytes`` meanwhile (pointer bases: source,
    destination)."""
    fn = KERNELS.function(device, "p2p.cu", "mfc::p2p_sync")
    return prepare_launch(device, fn, 1 + copy_blocks(copy_bytes), (args, 0, 0))


def stamp_check_launches(device: int, checks: Sequence, kind: int, page: int) -> tuple:
    """check_stamp_table (csrc/stamp_check.cu): each (byte offset, stamp expected, peer) of
    ``checks`` compared, a difference reported on the error page at ``page`` as ``kind``; one
    launch per STAMP_CHECKS of them (pointer base: the buffer)."""
    fn = KERNELS.function(device, "stamp_check.cu", "mfc::check_stamp_table")
    launches = []
    for i in range(0, len(checks), STAMP_CHECKS):
        part = checks[i:i + STAMP_CHECKS]
        table = struct(STAMP_TABLE, error_page=page, n=len(part), kind=kind)
        for j, (offset, want, peer) in enumerate(part):
            table["offset"][0, j], table["want"][0, j], table["peer"][0, j] = offset, want, peer
        launches.append(prepare_launch(device, fn, 1, (0, table), threads=32))
    return tuple(launches)


def exchange_launch(device: int, name_expr: str, enc: np.ndarray, dec: np.ndarray,
                    table: np.ndarray, args: np.ndarray, blocks: int) -> PreparedLaunch:
    """p2p_exchange (``name_expr``: its template for the call's wire): the whole call in one
    launch of ``blocks`` blocks, every task of ``table`` (an ExchangeArgs) and the copy of the
    rows a rank keeps (pointer bases: tokens, output)."""
    fn = KERNELS.function(device, "p2p.cu", name_expr)
    return prepare_launch(device, fn, blocks, (0, 0, enc, dec, table, args))
