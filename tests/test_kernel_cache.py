"""The compiled-kernel disk cache (moe_flashcomm/kernels.py): entries are named by a hash
of what the binary is built from and carry a checksum; a truncated, corrupted or foreign
file is rejected (then compiled again). Runs without a GPU or CuPy; the GPU test at the end
damages a real entry and checks that the kernel is rebuilt."""
import os
import warnings

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


def test_the_key_hashes_source_name_version_and_options():
    base = ("src", "mfc::k<1>", (12, 8), ("--gpu-architecture=sm_90", "-DX"))
    keys = {cuda.cache_key(*base),
            cuda.cache_key("src ", *base[1:]),
            cuda.cache_key(base[0], "mfc::k<2>", *base[2:]),
            cuda.cache_key(*base[:2], (12, 9), base[3]),
            cuda.cache_key(*base[:3], ("--gpu-architecture=sm_100", "-DX")),
            cuda.cache_key(*base[:3], ("--gpu-architecture=sm_90",))}
    assert len(keys) == 6 and all(len(k) == 64 for k in keys)


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
