"""The compiled launcher (csrc/launcher.cpp): built with torch's extension builder (this is
CI's check that it compiles), then driven on CPU with a stand-in for cuLaunchKernel (a ctypes
callback of its signature) that records what the driver would be given. The GPU tests at the
end compare it with the ctypes launch on real kernels and streams."""
import ctypes

import pytest
import torch

from moe_flashcomm import kernels as K

INVALID_CONTEXT = 201

_SIGNATURE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7,
                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


class FakeDriver:
    """cuLaunchKernel's stand-in: records each launch (function, grid, block, stream and the
    parameter values it points at) and returns the codes it is told to."""

    def __init__(self, layout):
        self.layout, self.calls, self.codes, self.made_current = layout, [], [], []
        self._callback = _SIGNATURE(self._launch)  # (kept alive with the object)
        self.launch_address = ctypes.cast(self._callback, ctypes.c_void_p).value

    def _launch(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        values = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_uint64)).contents.value
                  for i in range(len(self.layout))]
        self.calls.append(dict(fn=fn, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem,
                               stream=stream or 0, values=values))
        return self.codes.pop(0) if self.codes else 0

    def make_current(self, device):
        self.made_current.append(device)

    @staticmethod
    def error(code, what):
        return K.CudaError(f"{what} failed: CUDA error {code} (fake)")


@pytest.fixture(scope="module")
def native():
    return K.build_launcher(strict=True)


def _launch(native, driver, block, fn=0x1234, blocks=5, threads=256, device=3):
    return K.compiled_launch(native, driver, device, fn, blocks, threads, block)


def test_launch_writes_pointers_and_passes_the_block(native):
    args = K.struct(K.DEC_ARGS, H=7168, rec_bytes=4144, total=99)
    block = K.ArgumentBlock((16, 0, args, K.Value(0xABCDEF)))
    driver = FakeDriver(block.cells)
    launch = _launch(native, driver, block)
    launch(77, 1000, 5000)
    launch(78, 2000)  # a base left out keeps the last call's value
    first, second = driver.calls
    assert first["fn"] == 0x1234 and first["grid"] == (5, 1, 1) and first["block"] == (256, 1, 1)
    assert first["smem"] == 0 and first["stream"] == 77 and second["stream"] == 78
    assert first["values"][0] == 1016 and first["values"][1] == 5000
    assert second["values"][:2] == [2016, 5000]
    assert first["values"][3] == 0xABCDEF
    # the struct cell holds the argument bytes, and ``args`` writes into it in place
    assert launch.args["H"] == 7168 and launch.args["total"] == 99
    launch.args["total"] = 5
    launch(79, 0, 0)
    assert bytes(block.cells[2]) == K.struct(K.DEC_ARGS, H=7168, rec_bytes=4144, total=5).tobytes()


def test_launch_makes_the_context_current_once_and_raises_driver_errors(native):
    block = K.ArgumentBlock((0,))
    driver = FakeDriver(block.cells)
    launch = _launch(native, driver, block, device=2)
    driver.codes = [INVALID_CONTEXT, 0]
    launch(1, 64)
    assert driver.made_current == [2] and len(driver.calls) == 2
    driver.codes = [700]
    with pytest.raises(K.CudaError, match="cuLaunchKernel failed: CUDA error 700"):
        launch(1, 64)


def test_repeat_allocates_the_output_and_launches_on_it(native):
    block = K.ArgumentBlock((0, 8))
    driver = FakeDriver(block.cells)
    launches = [_launch(native, driver, block, fn=1), _launch(native, driver, block, fn=2)]
    repeat = native.Repeat(launches, 40, torch.uint8)
    src = torch.zeros(6, 32, dtype=torch.bfloat16)
    out = repeat(src, stream=55)
    assert out.shape == (6, 40) and out.dtype == torch.uint8 and out.device == src.device
    assert [c["fn"] for c in driver.calls] == [1, 2]
    for call in driver.calls:
        assert call["stream"] == 55
        assert call["values"] == [src.data_ptr(), out.data_ptr() + 8]
    empty = repeat(torch.zeros(0, 32, dtype=torch.bfloat16), stream=55)
    assert empty.shape == (0, 40)


def test_too_many_pointers_are_refused():
    with pytest.raises(ValueError, match="at most 8 pointers"):
        K.ArgumentBlock(tuple(range(K.MAX_POINTERS + 1)))


# ---- on a GPU --------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, "fp8"])
def test_compiled_and_ctypes_launches_give_the_same_records(native, bits):
    import moe_flashcomm as mf
    from moe_flashcomm.codec import cuda as C, reference
    assert K.KERNELS.native is native  # the GPU tests run on the compiled launcher
    dev, T, H = torch.cuda.current_device(), 64, 7168
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    cfg = mf.CodecConfig(bits=bits)
    name, pieces = C.encode_pieces(T, H, cfg, torch.bfloat16, True)
    (blocks, x_off, rec_off, args), = pieces
    fn = K.KERNELS.function(dev, "codec_encode.cu", name)
    compiled = K.prepare_launch(dev, fn, blocks, (x_off, rec_off, args))
    by_ctypes = K.CtypesLaunch(dev, fn, blocks, K.BLOCK, K.ArgumentBlock((x_off, rec_off, args)))
    assert isinstance(compiled, native.Launch)
    rb = mf.record_bytes(H, cfg, torch.bfloat16)
    a = torch.full((T, rb), 7, dtype=torch.uint8, device="cuda")
    b = torch.zeros_like(a)
    stream = torch.cuda.current_stream().cuda_stream
    compiled(stream, x.data_ptr(), a.data_ptr())
    by_ctypes(stream, x.data_ptr(), b.data_ptr())
    assert torch.equal(a, b)
    assert torch.equal(a.cpu(), reference.encode(x.cpu(), cfg))


@pytest.mark.cuda
def test_the_current_stream_is_torchs(native):
    import moe_flashcomm as mf
    dev = torch.cuda.current_device()
    side = torch.cuda.Stream()
    assert native.current_stream(dev) == torch.cuda.current_stream().cuda_stream
    with torch.cuda.stream(side):
        assert native.current_stream(dev) == side.cuda_stream
        x = torch.randn(32, 1024, dtype=torch.float16, device="cuda")
        cfg = mf.CodecConfig(bits=3)
        first = mf.encode(x, cfg)  # plans the repeat
        torch.cuda._sleep(50_000_000)  # the side stream busy: a launch elsewhere would race
        x.add_(1)
        again = mf.encode(x, cfg)  # the repeat: after the add, on this stream
    torch.cuda.synchronize()
    assert torch.equal(again.cpu(), mf.codec.reference.encode(x.cpu(), cfg))
    assert not torch.equal(first, again)
