"""CUDA kernels against the reference codec: identical record bytes and identical decoded bits
(NaNs included: one canonical NaN per dtype) for every config, on random and adversarial inputs; graph capture and
torch.compile. GPU tests are marked ``cuda``; the loader tests at the end run anywhere."""
import itertools
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from moe_flashcomm import CodecConfig, record_layout
from moe_flashcomm import env
from moe_flashcomm import kernels as K
from moe_flashcomm.codec import cuda as C
from moe_flashcomm.codec import reference as R

INT_BITS = [2, 3, 4, 5, 6, 7, 8]
GROUPS = [32, 64, 128, 256]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
REPO = Path(__file__).resolve().parents[1]

gpu = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def _compiled_kernels():
    """Compile every kernel once, NVRTC in parallel, before the tests time out on it."""
    if torch.cuda.is_available():
        cfgs = [CodecConfig(bits=b, spikes=s, rounding=r)
                for b, s, r in itertools.product(INT_BITS, (True, False), ("nearest", "stochastic"))]
        C.precompile(cfgs + [CodecConfig(bits="fp8")])
        for es in C.ENCODE_SHAPES:
            C.precompile(SHAPE_CFGS, encode_shape=es)
        for ds in C.DECODE_SHAPES:
            C.precompile(SHAPE_CFGS, decode_shape=ds)


# ---- helpers ---------------------------------------------------------------------------------
def section(L, offset):
    """Name of the record section holding byte ``offset`` (for failure messages)."""
    for p in L.planes:
        if p.offset <= offset < p.offset + p.nbytes:
            return f"plane{p.width}[value {(offset - p.offset) * 8 // p.width}]"
    for name in ("scale", "minimum", "lo_value", "hi_value", "lo_index", "hi_index"):
        off = getattr(L, name)
        size = 1 if name.endswith("index") else 2
        if off is not None and off <= offset < off + size * L.n_groups:
            return f"{name}[group {(offset - off) // size}]"
    return "padding"


def assert_same_records(got, want, L, what=""):
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):
        t, b = (got != want).nonzero()[0].tolist()
        n = int((got != want).sum())
        raise AssertionError(f"{what}: {n} bytes differ; first at token {t} byte {b} "
                             f"({section(L, b)}): got {got[t, b]}, want {want[t, b]}")


def assert_same_bits(got, want, what=""):
    """Equal bit patterns, NaNs included (decoded NaNs are canonical on both sides)."""
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, what
    gn, wn = torch.isnan(got), torch.isnan(want)
    assert torch.equal(gn, wn), f"{what}: NaN positions differ at {(gn != wn).nonzero()[:5].tolist()}"
    gb, wb = got.view(BITS_OF[got.dtype]), want.view(BITS_OF[want.dtype])
    if not torch.equal(gb, wb):
        i = (gb != wb).nonzero()[0].tolist()
        mask = (1 << 8 * got.element_size()) - 1
        raise AssertionError(f"{what}: {int((gb != wb).sum())} values differ; first at {i}: "
                             f"got {got[tuple(i)].item()!r} ({gb[tuple(i)].item() & mask:#x}), "
                             f"want {want[tuple(i)].item()!r} ({wb[tuple(i)].item() & mask:#x})")


def check(x, cfg, seed=None):
    """Kernel encode/decode of CUDA ``x`` == reference on its CPU copy; returns the records."""
    cfg = CodecConfig.coerce(cfg)
    T, H = x.shape
    L = record_layout(H, cfg, x.dtype)
    what = f"{cfg} {x.dtype} {tuple(x.shape)}"
    want = R.encode(x.cpu(), cfg, seed)
    rec = C.encode(x, cfg, seed)
    assert rec.is_cuda
    assert_same_records(rec, want, L, what)
    y = C.decode(rec, cfg, H, x.dtype)
    assert y.is_cuda and y.dtype == x.dtype
    assert_same_bits(y, R.decode(want, cfg, H, x.dtype), what + " decode")
    return rec


def heavy_tailed(T, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) / torch.rand(T, H, generator=g).clamp_min(0.02).sqrt()
    x *= 10.0 ** (torch.rand(T, 1, generator=g) * 6 - 3)  # per-token magnitude 1e-3 .. 1e3
    return x.to(dtype).cuda()


def adversarial(T, H, dtype, seed):
    """Rows of hostile patterns: outliers, constants, NaN/Inf, limits, subnormals, ties, +-0,
    tiny and huge ranges (the kernels' slow division path), exact rounding ties."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    r = lambda: torch.rand(H, generator=g)  # noqa: E731
    pos = lambda k: torch.randint(0, H, (k,), generator=g)  # noqa: E731
    rows = []
    x = torch.randn(H, generator=g); x[pos(max(1, H // 50))] = 1e4; rows.append(x)  # outliers
    rows.append(torch.full((H,), 3.0))                                           # constant
    x = torch.zeros(H); x[pos(H // 2 + 1)] = -0.0; rows.append(x)                # +-0 only
    x = torch.randn(H, generator=g); x[pos(3)] = float("nan"); rows.append(x)
    x = torch.randn(H, generator=g); x[pos(2)] = float("inf"); x[pos(2)] = float("-inf"); rows.append(x)
    rows.append((r() * 2 - 1) * fi.max)                                          # near the limits
    x = torch.randn(H, generator=g).sign() * fi.max; x[pos(H // 3 + 1)] = fi.min; rows.append(x)
    rows.append((r() * 2 - 1) * fi.smallest_normal)                              # subnormals
    rows.append(torch.randint(-2, 3, (H,), generator=g).float())                 # min/max ties
    rows.append(torch.randint(0, 511, (H,), generator=g).float() * 0.5)          # exact .5 ties
    rows.append(1000 + r() * 1e-3)                                               # cancellation
    rows.append(r() * 1e-25)                                                     # scale < 2^-64
    rows.append((r() - 0.5) * 1e25)                                              # scale > 2^64
    x = torch.randn(H, generator=g) * 1e-40; x[pos(H // 4 + 1)] = -0.0; rows.append(x)
    # fp8 rounding midpoints: amax 448 gives scale 1 and e4m3 neighbours' midpoints stay exact
    x = (1 + (2 * torch.randint(0, 8, (H,), generator=g) + 1) / 16) * 2.0 ** torch.randint(-9, 8, (H,), generator=g)
    x[pos(H // 8 + 1)] = 448.0; rows.append(x * torch.randn(H, generator=g).sign())
    x = torch.stack([rows[i % len(rows)] for i in range(max(T, len(rows)))])
    return x.to(dtype).cuda()


SHAPE_CFGS = [CodecConfig(bits=4, group_size=32), CodecConfig(bits=3),
              CodecConfig(bits=7, group_size=256, rounding="stochastic"),
              CodecConfig(bits=8, spikes=False), CodecConfig(bits="fp8", group_size=64)]
INT_CFGS = [CodecConfig(bits=b, group_size=g, spikes=s)
            for b, g, s in itertools.product(INT_BITS, GROUPS, [True, False])]
MIXED_CFGS = [CodecConfig(bits=2, group_size=32), CodecConfig(bits=3, group_size=64),
              CodecConfig(bits=4, group_size=128), CodecConfig(bits=4, group_size=128, spikes=False),
              CodecConfig(bits=5, group_size=256), CodecConfig(bits=6, group_size=32, spikes=False),
              CodecConfig(bits=7, group_size=128), CodecConfig(bits=8, group_size=64),
              CodecConfig(bits=8, group_size=256, spikes=False), CodecConfig(bits="fp8", group_size=32),
              CodecConfig(bits="fp8", group_size=128), CodecConfig(bits="bf16")]


# ---- every config on random data ---------------------------------------------------------------
@gpu
@pytest.mark.parametrize("cfg", INT_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int_configs_match_reference(cfg, dtype):
    G = cfg.group_size
    for i, (T, H) in enumerate([(33, 2 * G + 40), (9, 3 * G + 5), (4, 1024)]):
        # vector path with a partial last group; scalar path (H % 8); whole groups
        check(heavy_tailed(T, H, dtype, seed=zlib.crc32(f"{cfg} {dtype} {i}".encode())), cfg)


@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits="fp8", group_size=g) for g in GROUPS]
                         + [CodecConfig(bits="bf16"), CodecConfig(bits="native")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_and_passthrough_match_reference(cfg, dtype):
    for i, (T, H) in enumerate([(33, 2 * 256 + 40), (9, 3 * 128 + 5), (4, 1024)]):
        check(heavy_tailed(T, H, dtype, seed=100 + i), cfg)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_passthrough_decodes_any_record_bits_as_the_reference(dtype):
    """The passthrough's decode (csrc/codec_decode.cu decode_cast) on records of random bytes,
    NaNs of every payload among them: the reference's ``.to(dtype)`` bit for bit (the same
    bits for 16-bit tokens, bf16 shifted into fp32), on the vector and scalar paths."""
    cfg = CodecConfig(bits="bf16")
    g = torch.Generator().manual_seed(7)
    for T, H in ((16, 1024), (9, 3 * 128 + 5), (5, 7)):
        rb = record_layout(H, cfg, dtype).record_bytes
        rec = torch.randint(0, 256, (T, rb), dtype=torch.uint8, generator=g)
        rec.view(torch.int16)[:3, :H] |= 0x7F80  # exponents all ones: NaNs and infinities
        assert_same_bits(C.decode_impl(rec.cuda(), cfg, H, dtype), R.decode(rec, cfg, H, dtype),
                         f"{dtype} H={H}")


@gpu
def test_large_batch_matches_reference():
    """A size that fills the GPU several times over (many blocks, 7168-wide tokens)."""
    for cfg in (CodecConfig(bits=4), CodecConfig(bits=3), CodecConfig(bits="fp8")):
        check(heavy_tailed(1024, 7168, torch.bfloat16, seed=7), cfg)


@gpu
@pytest.mark.parametrize("cfg", SHAPE_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_shape_gives_the_same_bytes(cfg, dtype):
    """Each (values per thread, chunks per thread) shape the library may pick."""
    for H in (7168, 7168 + 5):
        x = adversarial(40, H, dtype, seed=5)
        want = R.encode(x.cpu(), cfg, 77)
        for shape in C.ENCODE_SHAPES:
            assert_same_records(C.encode_impl(x, cfg, 77, shape), want, record_layout(H, cfg), f"{cfg} {shape}")
        y = R.decode(want, cfg, H, dtype)
        for shape in C.DECODE_SHAPES:
            assert_same_bits(C.decode_impl(want.cuda(), cfg, H, dtype, shape), y, f"{cfg} {shape}")


# ---- NaN and Inf: one canonical NaN per output dtype, as in the reference -----------------------
def non_finite(T, H, dtype, seed):
    """Heavy-tailed rows with NaNs (either sign, odd payloads), +-Inf, whole NaN groups."""
    x = heavy_tailed(T, H, dtype, seed).cpu()
    g = torch.Generator().manual_seed(seed)
    ints = x.view(BITS_OF[dtype])
    for t in range(0, T, 2):  # every other row keeps its finite values (its groups stay finite)
        i = torch.randint(0, H, (3,), generator=g)
        x[t, i[0]] = float("nan")
        ints[t, i[1]] = -1                              # negative NaN, full payload
        x[t, i[2]] = float("inf") if t % 4 else float("-inf")
    if T > 1 and H >= 64:
        x[1, 32:64] = float("nan")
    return x.cuda()


NAN_CFGS = [CodecConfig(bits=b, group_size=g, spikes=s) for b, g, s in
            itertools.product(INT_BITS, (32, 128, 256), (True, False))] + \
           [CodecConfig(bits="fp8", group_size=g) for g in GROUPS] + [CodecConfig(bits="bf16")]


@gpu
@pytest.mark.parametrize("cfg", NAN_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_nan_bits_match_reference(cfg, dtype):
    """A group with NaN or Inf decodes to NaN; the kernels write the reference's canonical
    bits (bf16 0x7FC0, fp16 0x7E00, fp32 0x7FC00000) on every store path: 16-byte stores,
    scalar stores (H % 8), the staged dense rows, spike slots."""
    nan = R.CANONICAL_NAN[dtype]
    for T, H in ((12, 1024), (12, 3 * 128 + 5), (7, 2 * 256 + 40)):
        x = non_finite(T, H, dtype, seed=zlib.crc32(f"{cfg} {dtype} {H}".encode()))
        check(x, cfg)
        y = C.decode(C.encode(x, cfg), cfg, H, dtype).cpu()
        bits = y.view(BITS_OF[dtype])[torch.isnan(y)] & ((1 << 8 * dtype.itemsize) - 1)
        assert bits.numel() and (bits == nan).all(), f"{cfg} {dtype} H={H}: NaN bits " \
            f"{sorted({hex(v) for v in bits.tolist()})}"


@gpu
@pytest.mark.parametrize("cfg", SHAPE_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_nan_bits_for_every_kernel_shape(cfg, dtype):
    for H in (1024, 7168 + 5):
        x = non_finite(24, H, dtype, seed=H)
        want = R.encode(x.cpu(), cfg, 5)
        y = R.decode(want, cfg, H, dtype)
        for shape in C.DECODE_SHAPES:
            assert_same_bits(C.decode_impl(want.cuda(), cfg, H, dtype, shape), y, f"{cfg} {shape}")


@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits=4), CodecConfig(bits=3, group_size=32, spikes=False),
                                 CodecConfig(bits=8, group_size=256), CodecConfig(bits="fp8"),
                                 CodecConfig(bits="bf16")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_all_reduce_nan_bits_match_reference(cfg, dtype):
    """csrc/allreduce.cu with NaN/Inf among the peers' and the own values: the same record
    bytes (re-quantized) and the same bits, canonical NaNs included (the sum itself), as
    reduce_chunk's definition on the CPU."""
    from moe_flashcomm.comm.all_reduce import ROW, reduce_chunk
    for P, rank in ((2, 0), (3, 1)):
        vals = [non_finite(6, ROW, dtype, seed=10 * P + p).cpu() for p in range(P)]
        peers = torch.stack([R.encode(vals[p], cfg) for p in range(P) if p != rank])
        for requant in (True, False):
            want = reduce_chunk(peers, vals[rank], rank, cfg, requant=requant)
            got = reduce_chunk(peers.cuda(), vals[rank].cuda(), rank, cfg, requant=requant)
            what = f"{cfg} {dtype} P={P} rank={rank} requant={requant}"
            if requant:
                assert_same_records(got, want, record_layout(ROW, cfg), what)
            else:
                assert torch.isnan(want).any(), what
                assert_same_bits(got, want, what)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_is_the_tokens_own_bytes_on_cuda(dtype):
    """"native" on CUDA tensors: records are the tokens' bytes (NaN payloads kept), through
    the custom ops and the impls with out=, equal to the reference."""
    cfg = CodecConfig(bits="native")
    x = non_finite(9, 1000, dtype, seed=3)
    rec = check(x, cfg)
    assert rec.shape == (9, record_layout(1000, cfg, dtype).record_bytes)
    y = C.decode(rec, cfg, 1000, dtype)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    out = torch.full_like(rec, 0xAB)
    assert C.encode_impl(x, cfg, 0, out=out) is out and torch.equal(out, rec)
    y2 = torch.empty_like(x)
    assert C.decode_impl(rec, cfg, 1000, dtype, out=y2) is y2 and torch.equal(y2.view(torch.uint8), x.view(torch.uint8))
    assert C.kernel_names(cfg, dtype) == []


# ---- adversarial inputs and shapes ---------------------------------------------------------------
@gpu
@pytest.mark.parametrize("cfg", MIXED_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [256, 7168, 7168 + 5])  # dense rows (encode_int's DG copy) and not
def test_adversarial_inputs_match_reference(cfg, dtype, H):
    check(adversarial(16, H, dtype, seed=H), cfg)


@gpu
@pytest.mark.parametrize("cfg", MIXED_CFGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_and_tiny_hidden_sizes(cfg, dtype):
    for H in (1, 2, 3, 7, 33, 100, 7168 + 5):
        check(heavy_tailed(6, H, dtype, seed=H), cfg)
        check(adversarial(3, H, dtype, seed=H), cfg)


@gpu
@pytest.mark.parametrize("cfg", MIXED_CFGS, ids=str)
def test_empty_batch(cfg):
    x = torch.empty(0, 100, dtype=torch.bfloat16, device="cuda")
    rec = check(x, cfg)
    assert rec.shape == (0, record_layout(100, cfg).record_bytes)


@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits=4), CodecConfig(bits=3, group_size=32), CodecConfig(bits="fp8")], ids=str)
def test_non_contiguous_and_misaligned_input(cfg):
    base = heavy_tailed(40, 1024, torch.bfloat16, seed=3)
    check(base[:, ::2], cfg)                                  # strided columns
    check(base.t()[:512:2], cfg)                              # transposed view
    flat = heavy_tailed(1, 16 * 512 + 1, torch.bfloat16, seed=4).view(-1)
    check(flat[1:].view(16, 512), cfg)                        # contiguous, 2 bytes off 16-byte alignment
    rec = C.encode(base, cfg)
    wide = torch.zeros(rec.shape[0], rec.shape[1] + 16, dtype=torch.uint8, device="cuda")
    wide[:, 8:8 + rec.shape[1]] = rec                         # records at an 8-byte offset
    assert_same_bits(C.decode(wide[:, 8:8 + rec.shape[1]], cfg, 1024, torch.bfloat16),
                     R.decode(rec.cpu(), cfg, 1024, torch.bfloat16), "misaligned records")


@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits=4), CodecConfig(bits=3, group_size=32, spikes=False),
                                 CodecConfig(bits="fp8"), 6, "fp8"], ids=str)
def test_repeated_calls_match_reference(cfg):
    """Calls that repeat a shape and codec take the prepared path (codec.cuda._Repeat): new
    data, aligned and misaligned tensors in turn, still bit-identical to the reference."""
    full = CodecConfig.coerce(cfg)
    flat = heavy_tailed(1, 24 * 1024 + 8, torch.bfloat16, seed=20).view(-1)
    for i in range(6):
        x = heavy_tailed(24, 1024, torch.bfloat16, seed=21 + i)
        if i % 2:  # the same shape 16 bytes (aligned), then 2 bytes (misaligned) into `flat`
            off = 8 if i % 4 == 1 else 1
            x = flat[off:off + 24 * 1024].view(24, 1024).copy_(x)
        want = R.encode(x.cpu(), full)
        rec = C.encode(x, cfg)
        assert_same_records(rec, want, record_layout(1024, full), f"call {i}")
        assert_same_bits(C.decode(rec, cfg, 1024, torch.bfloat16),
                         R.decode(want, full, 1024, torch.bfloat16), f"decode, call {i}")
    repeats = {k[5] for k, v in K.KERNELS.plans.items() if isinstance(v, C._Repeat) and v.cfg is cfg}
    assert repeats == {"encode", "decode"}


@gpu
def test_repeated_calls_never_reuse_a_mutable_codec_argument():
    """A dict codec may change between calls: its calls are never repeats."""
    x = heavy_tailed(8, 512, torch.float16, seed=30)
    codec = {"bits": 4}
    C.encode(x, codec)
    codec["bits"] = 8
    assert_same_records(C.encode(x, codec), R.encode(x.cpu(), CodecConfig(bits=8)),
                        record_layout(512, CodecConfig(bits=8)), "dict changed to int8")


@gpu
def test_out_arguments_write_in_place():
    cfg = CodecConfig(bits=5, group_size=64)
    x = heavy_tailed(12, 640, torch.float16, seed=9)
    rec = torch.full((12, record_layout(640, cfg).record_bytes), 0xAB, dtype=torch.uint8, device="cuda")
    assert C.encode_impl(x, cfg, 0, out=rec) is rec
    want = R.encode(x.cpu(), cfg)
    assert_same_records(rec, want, record_layout(640, cfg), "encode out=")
    y = torch.full((12, 640), float("nan"), dtype=torch.float16, device="cuda")
    assert C.decode_impl(rec, cfg, 640, torch.float16, out=y) is y
    assert_same_bits(y, R.decode(want, cfg, 640, torch.float16), "decode out=")


# ---- stochastic rounding -------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("spikes", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_matches_reference_rng(bits, spikes, dtype):
    for G, (T, H) in ((128, (17, 3 * 128 + 8)), (128, (6, 1024)), (32, (5, 100))):
        cfg = CodecConfig(bits=bits, group_size=G, spikes=spikes, rounding="stochastic")
        x = heavy_tailed(T, H, dtype, seed=bits)
        a = check(x, cfg, seed=1234 + bits)
        assert torch.equal(a, C.encode(x, cfg, seed=1234 + bits)), "same seed, different bytes"
        assert not torch.equal(a, C.encode(x, cfg, seed=99)), "the seed changed nothing"
    check(adversarial(15, 7168 + 5, dtype, seed=bits), cfg, seed=2**32 - 1)
    dense = CodecConfig(bits=bits, spikes=spikes, rounding="stochastic")  # groups of 128
    check(adversarial(15, 1024, dtype, seed=bits), dense, seed=2**32 - 1)


@gpu
def test_stochastic_seed_from_generator():
    cfg = CodecConfig(bits=3, rounding="stochastic")
    x = heavy_tailed(8, 512, torch.bfloat16, seed=5)
    a = C.encode(x, cfg, torch.Generator().manual_seed(7))
    b = R.encode(x.cpu(), cfg, torch.Generator().manual_seed(7))
    assert_same_records(a, b, record_layout(512, cfg), "generator seed")
    # a CUDA generator (the model's own, say) draws the seed on its device; it once raised
    c = C.encode(x, cfg, torch.Generator(device="cuda").manual_seed(7))
    d = R.encode(x.cpu(), cfg, torch.Generator(device="cuda").manual_seed(7))
    assert_same_records(c, d, record_layout(512, cfg), "CUDA generator seed")
    assert not torch.equal(c, C.encode(x, cfg, torch.Generator(device="cuda").manual_seed(8)))


# ---- CUDA graphs and torch.compile ---------------------------------------------------------------
@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits=4), CodecConfig(bits=6, group_size=32),
                                 CodecConfig(bits="fp8"), CodecConfig(bits="bf16")], ids=str)
def test_cuda_graph_capture_gives_the_same_bytes(cfg):
    T, H = 64, 4096
    static = heavy_tailed(T, H, torch.bfloat16, seed=1)
    C.decode(C.encode(static, cfg), cfg, H, torch.bfloat16)  # warm-up: compile and load
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rec = C.encode(static, cfg)
        y = C.decode(rec, cfg, H, torch.bfloat16)
    for seed in (2, 3):
        x = heavy_tailed(T, H, torch.bfloat16, seed=seed)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        want = R.encode(x.cpu(), cfg)
        assert_same_records(rec, want, record_layout(H, cfg), "graph replay")
        assert_same_bits(y, R.decode(want, cfg, H, torch.bfloat16), "graph replay decode")


@gpu
@pytest.mark.parametrize("cfg", [CodecConfig(bits=4), CodecConfig(bits=3, group_size=64, spikes=False),
                                 CodecConfig(bits="fp8")], ids=str)
def test_torch_compile_keeps_one_op_each_and_the_same_bytes(cfg):
    H = 1024

    def f(x):
        rec = C.encode(x, cfg)
        return rec, C.decode(rec, cfg, H, x.dtype)

    graphs = []

    def recording(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    x = heavy_tailed(32, H, torch.bfloat16, seed=11)
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=recording)(x)
    assert graphs == [["moe_flashcomm.encode.default", "moe_flashcomm.decode.default"]]
    rec, y = torch.compile(f, fullgraph=True)(x)
    want_rec, want_y = f(x)
    assert_same_records(rec, want_rec.cpu(), record_layout(H, cfg), "compiled")
    assert_same_bits(y, want_y.cpu(), "compiled decode")


@gpu
def test_runs_on_the_current_stream():
    cfg = CodecConfig(bits=4)
    x = heavy_tailed(256, 4096, torch.bfloat16, seed=12)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        rec = C.encode(x, cfg)
        y = C.decode(rec, cfg, 4096, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    want = R.encode(x.cpu(), cfg)
    assert_same_records(rec, want, record_layout(4096, cfg), "side stream")
    assert_same_bits(y, R.decode(want, cfg, 4096, torch.bfloat16), "side stream decode")


# ---- loader (no GPU needed) --------------------------------------------------------------------
def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes "import cupy" fail
    with pytest.raises(ImportError, match=r"moe-flashcomm\[cuda12\].*moe-flashcomm\[cuda13\]"):
        K.cupy()


def test_kernel_source_inlines_the_header():
    assert K.csrc_dir() == REPO / "csrc"
    for name in ("codec_encode.cu", "codec_decode.cu"):
        src = K.kernel_source(name)
        assert '#include "codec_common.cuh"' not in src and "struct Wire" in src


def test_sources_found_in_an_installed_layout(tmp_path):
    """As in a wheel (setup.py maps csrc/ to moe_flashcomm/csrc): no repo csrc/ beside it."""
    pkg = tmp_path / "site" / "moe_flashcomm"
    shutil.copytree(REPO / "moe_flashcomm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "csrc", pkg / "csrc")
    code = ("from moe_flashcomm import kernels; d = kernels.csrc_dir(); print(d); "
            "assert 'struct Wire' in kernels.kernel_source('codec_encode.cu')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == pkg / "csrc"


def test_gaps_and_geometry_cover_the_record():
    """The zeroed padding ranges plus planes and metadata tile every record exactly."""
    for cfg in INT_CFGS + [CodecConfig(bits="fp8", group_size=g) for g in GROUPS]:
        for H in (1, 33, 100, 4096, 7173):
            L = record_layout(H, cfg)
            covered = [(p.offset, p.nbytes) for p in L.planes]
            covered += [(g >> 4, g & 15) for g in C._gaps(L) if g]
            for name, size in (("scale", 2), ("minimum", 2), ("lo_value", 2), ("hi_value", 2),
                               ("lo_index", 1), ("hi_index", 1)):
                if getattr(L, name) is not None:
                    covered.append((getattr(L, name), size * L.n_groups))
            covered.sort()
            assert [o for o, _ in covered] == list(itertools.accumulate([0] + [n for _, n in covered[:-1]]))
            assert sum(n for _, n in covered) == L.record_bytes, (cfg, H)


def test_env_defines_select_a_kernel_variant(monkeypatch):
    """$MOE_FLASHCOMM_DEFINES reaches every compile (A/B runs of whole test files)."""
    monkeypatch.delenv("MOE_FLASHCOMM_DEFINES", raising=False)
    assert env.kernel_defines() == ()
    monkeypatch.setenv("MOE_FLASHCOMM_DEFINES", "MFC_ENC_V4, MFC_SCALAR_STATS,")
    assert env.kernel_defines() == ("MFC_ENC_V4", "MFC_SCALAR_STATS")
    monkeypatch.setenv("MOE_FLASHCOMM_DEFINES", "MFC_ENC_V4;rm -rf")
    with pytest.raises(ValueError, match="MOE_FLASHCOMM_DEFINES"):
        env.kernel_defines()


def test_layout_fields_of_every_int_codec():
    """The encode kernels address metadata field k as o_scale + k * (o_min - o_scale)."""
    for cfg in INT_CFGS:
        for H in (1, 100, 4096, 7173):
            f = C._layout_fields(record_layout(H, cfg))
            n = record_layout(H, cfg).n_groups
            assert f["o_min"] - f["o_scale"] == 2 * n


def test_dense_rows_take_their_own_encode_copy():
    """Groups of 128 on aligned rows with H % 128 == 0 use encode_int's DG = 128 copy (no code
    for partial chunks); precompile covers it and the general copy (DG = 0)."""
    def dg(name):
        return int(name.rsplit(",", 1)[1].rstrip(">"))
    cfg = CodecConfig(bits=4)
    assert dg(C._encode_name(cfg, torch.bfloat16, 32, 1, dense=True)) == 128
    assert dg(C._encode_name(cfg, torch.bfloat16, 32, 1, dense=False)) == 0
    assert dg(C._encode_name(CodecConfig(bits=4, group_size=64), torch.bfloat16, 32, 1, dense=True)) == 0
    names = [n for src, n in C.kernel_names(cfg, torch.float16) if src == "codec_encode.cu"]
    assert sorted(map(dg, names)) == [0, 128]
    names = [n for src, n in C.kernel_names(CodecConfig(bits="fp8"), torch.float16) if src == "codec_encode.cu"]
    assert len(names) == 1 and "encode_fp8" in names[0]
