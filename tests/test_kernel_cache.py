"""The compiled-kernel disk cache (moe_flashcomm/kernels.py): entries are named by a hash
of what the binary is built from and carry a checksum; a truncated, corrupted or foreign
file is rejected (then compiled again). Runs without a GPU or CuPy; the GPU test at the end
damages a real entry and checks that the kernel is rebuilt."""
import os
import warnings
from pathlib import Path

import pytest
import torch

from moe_flashcomm import kernels as cuda

KEY = cuda.cache_key("__global__ void k() {}", "k", (12, 8), ("--gpu-architecture=sm_90",))
NAME = "_Z1kv"
CUBIN = bytes(range(256)) * 40 + b"\n\x00tail"  # binary, with newlines and zeros inside


def test_a_good_entry_is_accepted(tmp_path):
    path = tmp_path / f"{KEY}.bin"
    cuda.write_cache_file(path, KEY, NAME, CUBIN)
    assert cuda.read_cache_file(path, KEY) == (NAME, CUBIN)
    assert cuda.parse_cache_entry(cuda.cache_entry(KEY, NAME, CUBIN), KEY) == (NAME, CUBIN)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_an_entry_is_readable_as_the_umask_allows(tmp_path, umask):
    """A cache shared by users (one MOE_FLASHCOMM_CACHE): an entry gets the mode open() would
    give it. Entries were 0600 whatever the umask, so the other users compiled every kernel
    again and replaced each other's entries."""
    old = os.umask(umask)
    try:
        cuda.write_cache_file(tmp_path / "entry.bin", KEY, NAME, CUBIN)
    finally:
        os.umask(old)
    assert (tmp_path / "entry.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_key_hashes_source_name_version_options_and_headers():
    base = ("src", "mfc::k<1>", (12, 8), ("--gpu-architecture=sm_90", "-DX"))
    keys = {cuda.cache_key(*base),
            cuda.cache_key("src ", *base[1:]),
            cuda.cache_key(base[0], "mfc::k<2>", *base[2:]),
            cuda.cache_key(*base[:2], (12, 9), base[3]),
            cuda.cache_key(*base[:3], ("--gpu-architecture=sm_100", "-DX")),
            cuda.cache_key(*base[:3], ("--gpu-architecture=sm_90",)),
            cuda.cache_key(*base, headers="digest of other CUDA headers")}
    assert len(keys) == 7 and all(len(k) == 64 for k in keys)


def _damaged():
    good = cuda.cache_entry(KEY, NAME, CUBIN)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit of the cubin
    name_flip = bytearray(good)
    name_flip[good.index(NAME.encode())] ^= 0x20  # the lowered name
    other_key = cuda.cache_key("other", "k", (12, 8), ())
    return {
        "truncated": good[:-1],
        "truncated_to_header": good[:good.index(b"\n") + 1],
        "cubin_byte_flipped": bytes(flipped),
        "name_flipped": bytes(name_flip),
        "another_keys_entry": cuda.cache_entry(other_key, NAME, CUBIN),
        "old_format": NAME.encode() + b"\n" + CUBIN,  # the unverified format before checksums
        "foreign": b"\x7fELF\x02\x01\x01" + bytes(100),
        "empty": b"",
        "header_only": cuda.cache_entry(KEY, NAME, CUBIN).split(b"\n")[0],
        "extra_bytes": good + b"\x00",
    }


@pytest.mark.parametrize("kind", list(_damaged()))
def test_a_damaged_or_foreign_entry_is_rejected(tmp_path, kind):
    data = _damaged()[kind]
    assert cuda.parse_cache_entry(data, KEY) is None
    path = tmp_path / f"{KEY}.bin"
    path.write_bytes(data)
    with pytest.warns(RuntimeWarning, match="damaged or foreign; compiling it again"):
        assert cuda.read_cache_file(path, KEY) is None
    cuda.write_cache_file(path, KEY, NAME, CUBIN)  # what compile_kernel then does
    assert cuda.read_cache_file(path, KEY) == (NAME, CUBIN)


def test_a_missing_entry_is_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda.read_cache_file(tmp_path / f"{KEY}.bin", KEY) is None


@pytest.mark.cuda
def test_compile_kernel_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    """A real kernel: its entry truncated, then a foreign file in its place; each time the
    next compile_kernel call compiles again, returns a working cubin and replaces the file."""
    monkeypatch.setenv("MOE_FLASHCOMM_CACHE", str(tmp_path))
    from moe_flashcomm.codec.cuda import CodecConfig, kernel_names
    source, name_expr = kernel_names(CodecConfig(bits=4), torch.bfloat16)[-1]
    arch = cuda.arch(torch.cuda.current_device())
    name, cubin = cuda.compile_kernel(source, name_expr, arch)
    (path,) = tmp_path.iterdir()
    good = path.read_bytes()
    assert cuda.parse_cache_entry(good, path.stem) == (name, cubin)
    for bad in (good[:len(good) // 2], b"\x7fELF" + bytes(64)):
        path.write_bytes(bad)
        with pytest.warns(RuntimeWarning, match="damaged or foreign"):
            again = cuda.compile_kernel(source, name_expr, arch)
        assert again[0] == name and again[1]
        assert cuda.parse_cache_entry(path.read_bytes(), path.stem) == again  # replaced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda.compile_kernel(source, name_expr, arch) == again  # read back, verified


@pytest.fixture
def nvrtc(tmp_path, monkeypatch):
    """compile_kernel with NVRTC (CuPy and the CUDA headers, no GPU) into a fresh cache."""
    try:
        cuda.cupy()
        cuda._include_dirs()
    except (ImportError, RuntimeError) as e:
        if torch.cuda.is_available():  # (a GPU machine without them runs no kernel either)
            pytest.fail(f"a GPU is present but not CuPy's NVRTC and the CUDA headers: {e}")
        pytest.skip(f"needs CuPy's NVRTC and the CUDA headers: {e}")
    monkeypatch.setenv("MOE_FLASHCOMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOE_FLASHCOMM_DEFINES", raising=False)
    return tmp_path / "cache"


KERNEL = ("stamp_check.cu", "mfc::check_stamp_table")  # the smallest kernel of csrc/


def test_an_unwritable_cache_still_gives_the_kernel(nvrtc, tmp_path, monkeypatch):
    """A cache that cannot be written (a read-only or full disk; here a folder that cannot be
    made) costs the entry, not the kernel: it is compiled and returned, with a warning that
    names the folder and the variable."""
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("MOE_FLASHCOMM_CACHE", str(blocker / "kernels"))
    with pytest.warns(RuntimeWarning, match="could not write the kernel cache entry .*a_file"
                                            ".*MOE_FLASHCOMM_CACHE"):
        name, cubin = cuda.compile_kernel(*KERNEL, "sm_90")
    assert "check_stamp_table" in name and cubin
    # with the folder writable again the same kernel is written and then read back
    monkeypatch.setenv("MOE_FLASHCOMM_CACHE", str(nvrtc))
    assert cuda.compile_kernel(*KERNEL, "sm_90") == (name, cubin)
    (entry,) = nvrtc.iterdir()
    assert cuda.parse_cache_entry(entry.read_bytes(), entry.stem) == (name, cubin)


def test_a_cache_this_user_may_not_read_still_gives_the_kernel(nvrtc, monkeypatch):
    """Another user's 0700 folder in a shared cache: Path.exists() raised PermissionError
    before any fallback (reproduced here by a read that is refused)."""
    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", refused)
    name, cubin = cuda.compile_kernel(*KERNEL, "sm_90")
    assert "check_stamp_table" in name and cubin


def test_a_failed_publish_leaves_no_temporary_file(tmp_path):
    """_write_atomic removes its temporary file when the rename fails too (here the entry's
    name is taken by a folder), not only when the write does."""
    path = tmp_path / f"{KEY}.bin"
    (path / "x").mkdir(parents=True)
    with pytest.raises(OSError):
        cuda.write_cache_file(path, KEY, NAME, CUBIN)
    assert os.listdir(tmp_path) == [path.name]


def test_cuda_headers_changed_in_place_are_compiled_again(nvrtc, tmp_path, monkeypatch):
    """The kernels inline code of the CUDA headers (cuda_fp8.hpp's conversions and the
    like): headers replaced at the same path (a toolkit upgraded in place, /usr/local/cuda
    pointed at another version) with the same NVRTC must not find the old entry."""
    real = cuda._include_dirs()[0]
    headers = tmp_path / "include"
    headers.mkdir()
    for entry in os.listdir(real):  # the toolkit's headers, by link
        os.symlink(os.path.join(real, entry), headers / entry)
    monkeypatch.setattr(cuda, "_include_dirs", lambda: [str(headers)])
    first = cuda.compile_kernel(*KERNEL, "sm_90")
    changed = headers / "cuda_fp8.hpp"
    text = changed.read_text()
    changed.unlink()
    changed.write_text(text + "\n#error headers changed in place\n")
    with pytest.raises(RuntimeError, match="headers changed in place"):
        cuda.compile_kernel(*KERNEL, "sm_90")  # compiled again: NVRTC reads the new header
    changed.write_text(text)  # the same content again: the first entry, read back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda.compile_kernel(*KERNEL, "sm_90") == first


# ---- the codec's host-side arguments and caches (moe_flashcomm/codec/cuda.py), no GPU ----------
def test_codec_kernel_names_refuse_a_dtype_they_have_no_kernel_for():
    """A dtype other than fp32/bf16/fp16 once raised a bare KeyError (or, for native, no
    error at all); a direction other than encode/decode once gave the decode's shape."""
    from moe_flashcomm.codec import CodecConfig
    from moe_flashcomm.codec import cuda as codec_cuda
    for bits in (4, "fp8", "bf16", "native"):
        for dtype in (torch.float64, "bfloat16"):
            with pytest.raises(TypeError, match="dtype must be torch.float32, bfloat16 or "
                                                f"float16, got {dtype!r}"):
                codec_cuda.kernel_names(CodecConfig(bits=bits), dtype)
    with pytest.raises(ValueError, match="direction must be 'encode' or 'decode', got 'decoder'"):
        codec_cuda.kernel_shape(CodecConfig(), "decoder")
    with pytest.raises(ValueError, match=r"decode_shape \(1, 1\) is not one of"):  # (which one)
        codec_cuda.kernel_shape(CodecConfig(), "decode", (1, 1))


def test_precompile_takes_one_codec_alone(monkeypatch):
    """precompile("fp8") once iterated the string ("CodecConfig.bits ... got 'f'"), and one
    CodecConfig or one dtype was "not iterable"."""
    from moe_flashcomm.codec import CodecConfig
    from moe_flashcomm.codec import cuda as codec_cuda
    monkeypatch.setattr(codec_cuda.K, "precompile_names", lambda jobs, *args: jobs)  # no GPU
    want = codec_cuda.kernel_names(CodecConfig(bits="fp8"), torch.bfloat16)
    assert codec_cuda.precompile("fp8", torch.bfloat16) == want
    assert codec_cuda.precompile(CodecConfig(bits="fp8"), [torch.bfloat16]) == want
    assert codec_cuda.precompile({"bits": "fp8"}, torch.bfloat16) == want
    assert codec_cuda.precompile(["fp8", 4], torch.bfloat16) == \
        want + codec_cuda.kernel_names(CodecConfig(bits=4), torch.bfloat16)


@pytest.mark.parametrize("hidden", [40.0, True])
def test_a_decode_repeat_is_not_taken_by_a_hidden_of_another_type(monkeypatch, hidden):
    """A repeated CUDA decode skips the checks: its key once took hidden=40.0 (or True) for
    the 40 (or 1) of an earlier call, so a bad hidden ran that call's launches. Here the
    kernels are the reference (no GPU); the repeat itself is the real one."""
    from moe_flashcomm.codec import CodecConfig, record_bytes, reference
    from moe_flashcomm.codec import cuda as codec_cuda
    monkeypatch.setattr(codec_cuda, "decode_impl", reference.decode)
    monkeypatch.setattr(codec_cuda, "decode_launches", lambda *args: ())
    monkeypatch.setattr(cuda.KERNELS, "_native", None)  # (ctypes: no launcher build)
    monkeypatch.setattr(cuda.KERNELS, "plans", {})
    cfg, width = CodecConfig(bits=4), int(hidden) if hidden is True else 40
    records = torch.zeros(2, record_bytes(width, cfg), dtype=torch.uint8)
    assert codec_cuda.decode(records, cfg, width).shape == (2, width)  # made, then kept
    assert len(cuda.KERNELS.plans) == 1
    with pytest.raises(ValueError, match=f"hidden must be an int >= 1, got {hidden!r}"):
        codec_cuda.decode(records, cfg, hidden)


def test_two_threads_first_using_a_kernel_get_one_loaded_module(monkeypatch):
    """Both threads missed the cache, compiled and loaded; the second store replaced the
    first, whose module was then unloaded (CuPy's Module unloads when freed) while its thread
    had handed out a handle into it. CuPy is replaced by a stand-in that records unloads."""
    import gc
    import sys
    import threading
    import types
    unloaded, ids = set(), iter(range(1, 100))

    class Module:
        def load(self, cubin):
            self.ptr = next(ids)

        def get_function(self, name):
            return types.SimpleNamespace(module=self, ptr=self.ptr)

        def __del__(self):
            unloaded.add(self.ptr)
    cuda_mod = types.SimpleNamespace(function=types.SimpleNamespace(Module=Module), nvrtc=None,
                                     Device=lambda d: threading.Lock())
    fake = types.SimpleNamespace(cuda=cuda_mod)
    for name, mod in (("cupy", fake), ("cupy.cuda", cuda_mod), ("cupy.cuda.function", cuda_mod.function),
                      ("cupy.cuda.nvrtc", types.ModuleType("nvrtc"))):
        monkeypatch.setitem(sys.modules, name, mod)
    both_missed = threading.Barrier(2)

    def compile_kernel(*args):
        both_missed.wait(timeout=10)  # (a real compile or disk read: the same window)
        return "lowered", b"cubin"
    monkeypatch.setattr(cuda, "compile_kernel", compile_kernel)
    monkeypatch.setattr(cuda, "arch", lambda device: "sm_90")
    cache, got = cuda.KernelCache(), []
    threads = [threading.Thread(target=lambda: got.append(cache.function(0, "p2p.cu", "f")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert len(got) == 2 and got[0] == got[1] and not unloaded & set(got)
