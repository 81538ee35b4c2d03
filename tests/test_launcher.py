"""The two ways a prepared launch reaches the driver: the compiled launcher (csrc/launcher.cpp,
built here with torch's extension builder: CI's check that it compiles) and ctypes. On CPU both
are driven with a stand-in for cuLaunchKernel (a ctypes callback of its signature) that records
what the driver would be given. The GPU tests at the end compare them on real kernels and
streams."""
import ctypes
import os
from pathlib import Path

import pytest
import torch

from moe_flashcomm import env, kernels as K

INVALID_CONTEXT = 201

_SIGNATURE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7,
                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
_COPY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t,
                         ctypes.c_void_p)
_RECORD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_WAIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)


class FakeDriver:
    """The driver's stand-in: records each launch (function, grid, block, stream and the
    parameter values it points at), copy, event record and stream wait, in order in ``log``
    (launches also in ``calls``), and returns the codes it is told to."""

    def __init__(self, cells):
        self.cells, self.calls, self.codes, self.made_current, self.log = cells, [], [], [], []
        self._callbacks = [_SIGNATURE(self._launch), _COPY(self._copy), _RECORD(self._record),
                           _WAIT(self._wait)]  # (kept alive with the object)
        self.launch, self.copy, self.event_record, self.stream_wait = self._callbacks
        # (what the compiled launcher calls)
        self.launch_address, *steps = [ctypes.cast(c, ctypes.c_void_p).value
                                       for c in self._callbacks]
        self.step_addresses = tuple(steps)
        self._events = 0

    def _code(self):
        return self.codes.pop(0) if self.codes else 0

    def _launch(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        values = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_uint64)).contents.value
                  for i in range(len(self.cells))]
        self.calls.append(dict(fn=fn, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem,
                               stream=stream or 0, values=values))
        self.log.append(("launch", fn, stream or 0, values))
        return self._code()

    def _copy(self, dst, src, nbytes, stream):
        self.log.append(("copy", dst, src, nbytes, stream or 0))
        return self._code()

    def _record(self, event, stream):
        self.log.append(("record", event, stream or 0))
        return self._code()

    def _wait(self, stream, event, flags):
        self.log.append(("wait", stream or 0, event))
        return self._code()

    def event(self, device):
        self._events += 1
        return 0xE0 + self._events

    def destroy_event(self, event):
        self.log.append(("destroy", event))

    def make_current(self, device):
        self.made_current.append(device)

    @staticmethod
    def error(code, what):
        return K.CudaError(f"{what} failed: CUDA error {code} (fake)")


@pytest.fixture(scope="module")
def native():
    return K.build_launcher(strict=True)


@pytest.fixture(params=["compiled", "ctypes"])
def make_launch(request):
    """A launch of ``block`` through the stand-in ``driver``, made either way."""
    native = K.build_launcher(strict=True) if request.param == "compiled" else None

    def make(driver, block, fn=0x1234, blocks=5, threads=256, device=3):
        if native is None:
            return K.CtypesLaunch(device, fn, blocks, threads, block, driver)
        return K.compiled_launch(native, driver, device, fn, blocks, threads, block)
    return make


def test_launch_writes_pointers_and_passes_the_block(make_launch):
    args = K.struct(K.DEC_ARGS, H=7168, rec_bytes=4144, total=99)
    block = K.ArgumentBlock((16, 0, args, K.Value(0xABCDEF)))
    driver = FakeDriver(block.cells)
    launch = make_launch(driver, block)
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


def test_launch_makes_the_context_current_once_and_raises_driver_errors(make_launch):
    block = K.ArgumentBlock((0,))
    driver = FakeDriver(block.cells)
    launch = make_launch(driver, block, device=2)
    driver.codes = [INVALID_CONTEXT, 0]
    launch(1, 64)
    assert driver.made_current == [2] and len(driver.calls) == 2
    driver.codes = [700]
    with pytest.raises(K.CudaError, match="cuLaunchKernel failed: CUDA error 700"):
        launch(1, 64)


def test_repeat_allocates_the_output_and_launches_on_it(native):
    block = K.ArgumentBlock((0, 8))
    driver = FakeDriver(block.cells)
    launches = [K.compiled_launch(native, driver, 0, fn, 1, 256, block) for fn in (1, 2)]
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


def test_exchange_checks_orders_allocates_and_launches(native):
    """The peer-to-peer call's hot path (comm/exchange.py P2PCall.run): the error page read
    first (its check raising before anything is queued), the output of the given shape,
    ``begin`` only when the stream changes, and the one launch on (tokens, output); tokens
    not 16-byte aligned are copied first, as the Python path does."""
    from moe_flashcomm.comm.p2p import NO_STREAM
    block = K.ArgumentBlock((0, 16))
    driver = FakeDriver(block.cells)
    launch = K.compiled_launch(native, driver, 0, 7, 3, 256, block)
    page, cell = (ctypes.c_uint64 * 7)(), ctypes.c_uint64(NO_STREAM)
    checked, begun = [], []

    def check():
        checked.append(page[6])
        raise K.CudaError("the kernels of an earlier call reported")

    def begin(stream):
        begun.append(stream)
        cell.value = stream
    program = K.compiled_program(native, 0, [K.Step(K.LAUNCH, launch, ((K.TOKENS, 0),
                                                                       (K.OUTPUT, 0)))], driver)
    call = native.Exchange(program, 0, torch.bfloat16, ctypes.addressof(page) + 8 * 6,
                           ctypes.addressof(cell), check, begin)
    x = torch.randn(6, 32).to(torch.bfloat16)
    out = call(x, (4, 2, 32), stream=55)
    assert out.shape == (4, 2, 32) and out.dtype == torch.bfloat16
    call(x, (4, 2, 32), stream=55)
    call(x, (3, 32), stream=0)  # (0 is a stream: the legacy default)
    assert begun == [55, 0] and cell.value == 0
    assert [c["stream"] for c in driver.calls] == [55, 55, 0]
    assert driver.calls[0]["fn"] == 7 and driver.calls[0]["grid"] == (3, 1, 1)
    assert driver.calls[0]["values"] == [x.data_ptr(), out.data_ptr() + 16]
    odd = torch.randn(6 * 32 + 1).to(torch.bfloat16)[1:].view(6, 32)  # 2 bytes off
    assert odd.data_ptr() % 16
    call(odd, (6, 32), stream=0)
    assert driver.calls[-1]["values"][0] % 16 == 0
    page[6] = 1
    with pytest.raises(K.CudaError, match="earlier call reported"):
        call(x, (6, 32), stream=0)
    assert checked == [1] and len(driver.calls) == 4


def _program_steps(make_launch, driver, block, called):
    """A call of every step kind (comm/exchange.py P2PCall makes them): launches on the tokens,
    the output, the staging buffer and fixed addresses, copies on either stream, the fork and
    join of the copy stream, a call into Python; a copy of nothing queues nothing."""
    launch = [make_launch(driver, block, fn=fn, blocks=2, device=0) for fn in (1, 2, 3)]
    fork, join = K.Order(0, driver), K.Order(0, driver)
    return [K.Step(K.LAUNCH, launch[0], ((K.TOKENS, 16), (K.OUTPUT, 32))),
            K.Step(K.COPY, refs=((K.FIXED, 0x5000), (K.TOKENS, 64)), nbytes=128),
            K.Step(K.STAGE, nbytes=4096),
            K.Step(K.LAUNCH, launch[1], ((K.TOKENS, 0), (K.STAGING, 0))),
            K.Step(K.ORDER, fork, stream=K.SIDE),
            K.Step(K.COPY, refs=((K.FIXED, 0x9000), (K.STAGING, 1024)), nbytes=512,
                   stream=K.SIDE),
            K.Step(K.ORDER, join, stream=K.MAIN),
            K.Step(K.CALL, lambda: called.append(len(driver.log))),
            K.Step(K.LAUNCH, launch[2]),  # no bases: the cells keep the last call's
            K.Step(K.COPY, refs=((K.OUTPUT, 0), (K.FIXED, 0x7000)), nbytes=0)]


@pytest.mark.parametrize("compiled", [True, False])
def test_a_program_runs_its_steps_in_order_either_way(compiled):
    """csrc/launcher.cpp's Program and its Python twin kernels.run_steps give the driver the
    same calls, in order, on the same streams; a staging buffer is allocated on the call's
    device and addressed by the steps after it."""
    native = K.build_launcher(strict=True)
    block = K.ArgumentBlock((0, 0))
    driver = FakeDriver(block.cells)
    called = []

    def make_launch(driver, block, fn, blocks, device):
        if compiled:
            return K.compiled_launch(native, driver, device, fn, blocks, 256, block)
        return K.CtypesLaunch(device, fn, blocks, 256, block, driver)
    steps = _program_steps(make_launch, driver, block, called)
    cpu = torch.device("cpu")
    if compiled:
        K.compiled_program(native, 0, steps, driver)(11, 22, 1000, 5000, cpu)
    else:
        K.run_steps(steps, cpu, 11, 22, 1000, 5000, driver)
    staging = driver.log[2][3][1]  # the second launch's second pointer
    assert staging not in (0, 1000, 5000)
    assert driver.log == [
        ("launch", 1, 11, [1016, 5032]),
        ("copy", 0x5000, 1064, 128, 11),
        ("launch", 2, 11, [1000, staging]),
        ("record", 0xE1, 11), ("wait", 22, 0xE1),  # the side stream waits for the main one
        ("copy", 0x9000, staging + 1024, 512, 22),
        ("record", 0xE2, 22), ("wait", 11, 0xE2),  # and the main stream for the copies
        ("launch", 3, 11, [1000, staging])]
    assert called == [8]  # after the join, before the last launch


def test_an_order_releases_its_event_with_it():
    """Orders (two per peer-to-peer call with copy-engine pairs, a call per split) never
    destroyed their events: uneven splits made events without end."""
    import gc
    driver = FakeDriver(())
    orders = [K.Order(0, driver) for _ in range(3)]
    events = [o.event for o in orders]
    del orders
    gc.collect()
    assert sorted(e for kind, e in driver.log if kind == "destroy") == events


@pytest.mark.parametrize("compiled", [True, False])
def test_a_program_retries_without_a_context_and_raises_driver_errors(compiled):
    native = K.build_launcher(strict=True)
    block = K.ArgumentBlock((0,))
    driver = FakeDriver(block.cells)
    fork = K.Order(3, driver)
    steps = [K.Step(K.COPY, refs=((K.OUTPUT, 0), (K.TOKENS, 0)), nbytes=64),
             K.Step(K.ORDER, fork, stream=K.SIDE)]
    if compiled:
        program = K.compiled_program(native, 3, steps, driver)

        def run():
            program(1, 2, 100, 200, torch.device("cpu"))
    else:
        def run():
            K.run_steps(steps, torch.device("cuda", 3), 1, 2, 100, 200, driver)
    driver.codes = [INVALID_CONTEXT, 0]
    run()
    assert driver.made_current == [3] and [e[0] for e in driver.log] == ["copy", "copy",
                                                                         "record", "wait"]
    driver.codes = [700]
    with pytest.raises(K.CudaError, match="cuMemcpyAsync failed: CUDA error 700"):
        run()


def test_a_program_of_ctypes_launches_is_not_compiled(native):
    block = K.ArgumentBlock((0,))
    driver = FakeDriver(block.cells)
    step = K.Step(K.LAUNCH, K.CtypesLaunch(0, 1, 1, 256, block, driver))
    assert K.compiled_program(native, 0, [step], driver) is None


def test_a_damaged_build_is_built_again_once(native, tmp_path):
    """A truncated module in the cache (a full disk, a killed build) is removed and built
    again on the next load, in new processes as a job's next start would be: two of them at
    once (the ranks of a node), one building while the other waits, both then loading it."""
    import shutil
    import subprocess
    import sys
    built = Path(native.__file__)  # <cache>/<module name>/<module name>.so
    cache = tmp_path / "cache"
    shutil.copytree(built.parent, cache / built.parent.name)
    damaged = cache / built.parent.name / built.name
    damaged.write_bytes(damaged.read_bytes()[:4096])
    code = ("import sys, warnings; warnings.simplefilter('error'); "
            "from moe_flashcomm import kernels as K; m = K.build_launcher(strict=True); "
            "print(m.__file__); print(hasattr(m, 'Repeat'))")
    env = {**os.environ, "MOE_FLASHCOMM_CACHE": str(cache)}
    ranks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in ranks]
    for (out, err), code in results:
        assert code == 0, err
        path, has_repeat = out.split()
        assert Path(path) == damaged and has_repeat == "True"
    assert sum("compiling the kernel launcher" in err for (_, err), _ in results) == 1
    assert damaged.stat().st_size > 4096


def test_without_a_compiler_it_warns_and_launches_through_ctypes(tmp_path):
    """No working C++ compiler: the build fails, a warning names the cause and the variable,
    and the process launches through ctypes (``KERNELS.native`` is None)."""
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from moe_flashcomm import kernels as K\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    native = K.KERNELS.native\n"
            "print(native is None); print([str(w.message) for w in seen])")
    env = {**os.environ, "MOE_FLASHCOMM_CACHE": str(tmp_path), "CXX": "/bin/false",
           "MOE_FLASHCOMM_NATIVE_LAUNCH": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    is_none, messages = run.stdout.strip().split("\n", 1)
    assert is_none == "True", run.stdout
    assert "the compiled launcher (csrc/launcher.cpp) could not be built" in messages
    assert "launched through ctypes" in messages and "MOE_FLASHCOMM_NATIVE_LAUNCH" in messages


def test_the_launcher_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("MOE_FLASHCOMM_NATIVE_LAUNCH", raising=False)
    assert env.native_launch()
    monkeypatch.setenv("MOE_FLASHCOMM_NATIVE_LAUNCH", "0")
    assert K.KernelCache().native is None  # (nothing built)
    monkeypatch.setenv("MOE_FLASHCOMM_NATIVE_LAUNCH", "abc")
    with pytest.raises(ValueError, match="MOE_FLASHCOMM_NATIVE_LAUNCH='abc'"):
        K.KernelCache().native


def test_kernel_defines_take_c_identifiers_with_any_value(monkeypatch):
    """MOE_FLASHCOMM_DEFINES: NAME or NAME=VALUE, NAME a C identifier, VALUE one -D argument."""
    monkeypatch.setenv("MOE_FLASHCOMM_DEFINES", "MFC_X=-1, MFC_Y=1.5,_Z,MFC_W=0x10")
    assert env.kernel_defines() == ("MFC_X=-1", "MFC_Y=1.5", "_Z", "MFC_W=0x10")
    for bad in ("1BAD", "MFC-X", "MFC_X=", "=1", "MFC_X=1 2", "MFC X"):
        monkeypatch.setenv("MOE_FLASHCOMM_DEFINES", f"MFC_OK,{bad}")
        with pytest.raises(ValueError, match=f"MOE_FLASHCOMM_DEFINES='MFC_OK,{bad}': '{bad}' is "
                                             "not a NAME or NAME=VALUE define"):
            env.kernel_defines()


def test_use_launcher_switches_the_launcher_and_keeps_each_ones_plans(native):
    """Benchmarks compare the launchers in one process: each keeps its own codec plans."""
    cache = K.KernelCache()
    cache.use_launcher(False)
    assert cache.native is None
    ctypes_plans = cache.plans
    cache.plan(("a",), lambda: "made through ctypes")
    cache.use_launcher(True)
    assert cache.native is native and cache.plans is not ctypes_plans
    assert cache.plan(("a",), lambda: "made compiled") == "made compiled"
    cache.use_launcher(False)
    assert cache.native is None and cache.plan(("a",), lambda: "again") == "made through ctypes"


def test_too_many_pointers_are_refused():
    with pytest.raises(ValueError, match="at most 8 pointers"):
        K.ArgumentBlock(tuple(range(K.MAX_POINTERS + 1)))


# ---- on a GPU --------------------------------------------------------------------------------
# The compiled launcher against the ctypes launch on real kernels, whichever the process uses
# (MOE_FLASHCOMM_NATIVE_LAUNCH); run the whole GPU suite with it set to 0 as well to test ctypes
# everywhere.
def _encode(native, bits, T=64, H=7168, dtype=torch.bfloat16):
    """(x, cfg, compiled launch, ctypes launch, record bytes) of one encode plan."""
    import moe_flashcomm as mf
    from moe_flashcomm.codec import cuda as C
    dev = torch.cuda.current_device()
    x = torch.randn(T, H, dtype=dtype, device="cuda")
    cfg = mf.CodecConfig(bits=bits)
    name, pieces = C.encode_pieces(T, H, cfg, dtype, H % 8 == 0)
    (blocks, x_off, rec_off, args), = pieces
    fn = K.KERNELS.function(dev, "codec_encode.cu", name)
    compiled = K.compiled_launch(native, K.KERNELS.driver, dev, fn, blocks, K.BLOCK,
                                 K.ArgumentBlock((x_off, rec_off, args)))
    by_ctypes = K.CtypesLaunch(dev, fn, blocks, K.BLOCK, K.ArgumentBlock((x_off, rec_off, args)))
    return x, cfg, compiled, by_ctypes, mf.record_bytes(H, cfg, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, "fp8"])
def test_compiled_and_ctypes_launches_give_the_same_records(native, bits):
    from moe_flashcomm.codec import reference
    x, cfg, compiled, by_ctypes, rb = _encode(native, bits)
    a = torch.full((x.shape[0], rb), 7, dtype=torch.uint8, device="cuda")
    b = torch.zeros_like(a)
    stream = torch.cuda.current_stream().cuda_stream
    compiled(stream, x.data_ptr(), a.data_ptr())
    by_ctypes(stream, x.data_ptr(), b.data_ptr())
    assert torch.equal(a, b)
    assert torch.equal(a.cpu(), reference.encode(x.cpu(), cfg))


@pytest.mark.cuda
def test_a_compiled_repeat_runs_on_torchs_current_stream(native):
    from moe_flashcomm.codec import reference
    x, cfg, compiled, _, rb = _encode(native, 3, T=32, H=1024, dtype=torch.float16)
    repeat = native.Repeat([compiled], rb, torch.uint8)
    dev = torch.cuda.current_device()
    side = torch.cuda.Stream()
    assert native.current_stream(dev) == torch.cuda.current_stream().cuda_stream
    with torch.cuda.stream(side):
        assert native.current_stream(dev) == side.cuda_stream
        first = repeat(x)
        torch.cuda._sleep(50_000_000)  # the side stream busy: a launch elsewhere would race
        x.add_(1)
        again = repeat(x)  # after the add, on this stream
    torch.cuda.synchronize()
    assert again.shape == (32, rb) and again.dtype == torch.uint8
    assert torch.equal(again.cpu(), reference.encode(x.cpu(), cfg))
    assert not torch.equal(first, again)


@pytest.mark.cuda
def test_public_codec_calls_agree_through_either_launcher(native):
    """``encode`` / ``decode`` and their repeats (the compiled ``Repeat``, whatever the
    environment says) give the ctypes calls' bits."""
    import moe_flashcomm as mf
    from moe_flashcomm.codec import cuda as C
    prior = K.KERNELS.native is not None
    x = torch.randn(8, 7168, dtype=torch.bfloat16, device="cuda")
    got = {}
    try:
        for compiled in (False, True):
            K.KERNELS.use_launcher(compiled)
            cfg = mf.CodecConfig(bits=4)
            recs = [mf.encode(x, cfg) for _ in range(3)]  # the first prepares, then repeats
            outs = [mf.decode(recs[0], cfg, 7168, torch.bfloat16) for _ in range(3)]
            repeats = [p for p in K.KERNELS.plans.values() if isinstance(p, C._Repeat)]
            assert len(repeats) == 2
            assert all(isinstance(r.call, native.Repeat) == compiled for r in repeats)
            got[compiled] = recs + outs
    finally:
        K.KERNELS.use_launcher(prior)
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
