"""The torch reference codec: accuracy bounds, exact spikes, bit-plane packing, edge cases."""
import itertools

import pytest
import torch

from moe_flashcomm import CodecConfig, decode, encode, record_layout
from moe_flashcomm.codec import reference as R

INT_BITS = [2, 3, 4, 5, 6, 7, 8]
GROUPS = [32, 64, 128, 256]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def heavy_tailed(T, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g) / torch.rand(T, H, generator=g).clamp_min(0.05).sqrt()
    return x.to(dtype)


def groups_of(t, L):
    """[T, H] -> [T, n, G] fp32, padding as NaN."""
    T, H = t.shape
    out = torch.full((T, L.padded_hidden), float("nan"))
    out[:, :H] = t.float()
    return out.view(T, L.n_groups, L.group_size)


def check_int_bound(x, cfg):
    """Nearest rounding: every non-spike value within half a step (+ output rounding)."""
    T, H = x.shape
    L = record_layout(H, cfg)
    rec = encode(x, cfg)
    y = decode(rec, cfg, H, x.dtype)
    meta = R.read_meta(rec, L, cfg.spikes, R.wire_float(x.dtype))
    scale = meta["scale"].float()[..., None].expand(T, L.n_groups, L.group_size)
    scale = scale.reshape(T, -1)[:, :H]
    mn = meta["minimum"].float()[..., None].expand(T, L.n_groups, L.group_size).reshape(T, -1)[:, :H]
    err = (y.float() - x.float()).abs()
    eps = torch.finfo(x.dtype).eps
    tiny = torch.finfo(x.dtype).smallest_normal
    bound = scale / 2 * (1 + 1e-6) + y.float().abs() * eps / 2 + 1e-6 * (mn.abs() + cfg.qmax * scale) + tiny
    if cfg.spikes and x.dtype == torch.float32:  # fp32 spikes travel as bf16: allow its rounding there
        spike = torch.zeros(T, L.n_groups, L.group_size, dtype=torch.bool)
        for idx in (meta["lo_index"], meta["hi_index"]):
            spike.scatter_(-1, idx[..., None], True)
        spike = spike.view(T, -1)[:, :H]
        bound = torch.where(spike, x.float().abs() * 2**-8, bound)
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"{cfg} {x.dtype}: max excess {(err - bound).max().item()}"
    # the step above is read back from the record: it must be the input's own, no larger
    # than the range of the group's values (without the min and max spikes carry) over
    # qmax, allowing the wire float's rounding of both ends and of the scale (a scale
    # written too large would widen the bound with it)
    values = torch.sort(groups_of(x, L), dim=-1).values  # (NaN padding sorts last)
    count = (~torch.isnan(values)).sum(-1, keepdim=True)
    cut = int(cfg.spikes)
    lo = values.gather(-1, torch.full_like(count, cut)).squeeze(-1)
    hi = values.gather(-1, (count - 1 - cut).clamp(min=0)).squeeze(-1)
    ends = 2**-7 * (lo.abs() + hi.abs()) if x.dtype == torch.float32 else 0.0
    step = ((hi - lo) + ends) / cfg.qmax * (1 + 2**-7) + tiny
    ok = (meta["scale"].float() <= step) | (count.squeeze(-1) <= 2 * cut)
    assert ok.all(), f"{cfg} {x.dtype}: a scale above the input's own step"
    return rec, y, L


@pytest.mark.parametrize("bits,group,spikes", list(itertools.product(INT_BITS, GROUPS, [True, False])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_error_within_half_step_and_spikes_exact(bits, group, spikes, dtype):
    cfg = CodecConfig(bits=bits, group_size=group, spikes=spikes)
    x = heavy_tailed(5, 3 * group + 17, dtype, seed=bits * 7 + group)  # partial last group
    rec, y, L = check_int_bound(x, cfg)
    if spikes:
        xg, yg = groups_of(x, L), groups_of(y, L)
        lo_idx = torch.nan_to_num(xg, nan=float("inf")).argmin(-1, keepdim=True)
        hi_idx = torch.nan_to_num(xg, nan=float("-inf")).argmax(-1, keepdim=True)
        for idx in (lo_idx, hi_idx):
            want, got = xg.gather(-1, idx), yg.gather(-1, idx)
            if dtype == torch.float32:  # fp32 spikes travel as bf16
                want = want.to(torch.bfloat16).float()
            assert torch.equal(want, got)


@pytest.mark.parametrize("bits", INT_BITS)
def test_spikes_shrink_the_range(bits):
    x = torch.randn(64, 512)
    x[:, ::128] *= 50  # one outlier per group
    err = {}
    for spikes in (True, False):
        cfg = CodecConfig(bits=bits, spikes=spikes)
        err[spikes] = (decode(encode(x, cfg), cfg, 512, x.dtype) - x).norm()
    assert err[True] < err[False] / 3


# ---- bit-plane packing against a slow bit-by-bit implementation ---------------------------
def slow_pack(codes, widths_shifts, padded):
    """codes: list of ints -> dict width -> bytearray, bit k of value i's plane code at
    plane bit position i*width + k (least significant first)."""
    out = {}
    for width, shift in widths_shifts:
        buf = bytearray(padded * width // 8)
        for i, c in enumerate(codes):
            part = (c >> shift) & ((1 << width) - 1)
            for k in range(width):
                if part >> k & 1:
                    pos = i * width + k
                    buf[pos // 8] |= 1 << (pos % 8)
        out[width] = buf
    return out


def slow_unpack(planes, widths_shifts, padded):
    codes = [0] * padded
    for width, shift in widths_shifts:
        buf = planes[width]
        for i in range(padded):
            part = 0
            for k in range(width):
                pos = i * width + k
                part |= (buf[pos // 8] >> (pos % 8) & 1) << k
            codes[i] |= part << shift
    return codes


@pytest.mark.parametrize("bits", INT_BITS)
def test_planes_match_slow_bit_by_bit_packing(bits):
    cfg = CodecConfig(bits=bits, group_size=32, spikes=True)
    H = 77
    x = torch.randn(3, H)
    L = record_layout(H, cfg)
    rec = encode(x, cfg)
    xf, valid = R._grouped(x, L)
    codes = R.quantize_groups(xf, valid, cfg, torch.bfloat16, None)["codes"].view(3, -1)
    ws = [(p.width, p.shift) for p in L.planes]
    for t in range(3):
        want = slow_pack(codes[t].tolist(), ws, L.padded_hidden)
        for p in L.planes:
            assert bytes(rec[t, p.offset:p.offset + p.nbytes].tolist()) == bytes(want[p.width])
        got = slow_unpack({p.width: bytes(rec[t, p.offset:p.offset + p.nbytes].tolist()) for p in L.planes},
                          ws, L.padded_hidden)
        assert got == codes[t].tolist()
        assert max(got) <= cfg.qmax


def test_worked_example_by_hand():
    """int4, no spikes, one group 0..31: min 0, scale = 31/15 rounded up in bf16."""
    cfg = CodecConfig(bits=4, group_size=32, spikes=False)
    x = torch.arange(32, dtype=torch.float32)[None]
    rec = encode(x, cfg)
    L = record_layout(32, cfg)
    scale = 2.078125  # 31/15 = 2.0667 lies between bf16 neighbours 2.0625 and 2.078125
    meta = R.read_meta(rec, L, False, torch.bfloat16)
    assert meta["scale"].item() == scale and meta["minimum"].item() == 0.0
    codes = [min(15, round(i / scale)) for i in range(32)]  # Python rounds half to even
    packed = [codes[2 * i] | codes[2 * i + 1] << 4 for i in range(16)]
    assert rec[0, :16].tolist() == packed


# ---- edge cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", INT_BITS + ["fp8"])
def test_constant_groups_decode_exactly(bits):
    cfg = CodecConfig(bits=bits, group_size=64)
    x = torch.full((3, 200), 1.5, dtype=torch.bfloat16)
    x[1] = -0.375
    x[2] = 0.0
    assert torch.equal(decode(encode(x, cfg), cfg, 200, x.dtype), x)


@pytest.mark.parametrize("bits", INT_BITS + ["fp8", "bf16"])
def test_empty_batch_and_tiny_hidden(bits):
    cfg = CodecConfig(bits=bits, group_size=32)
    for T, H in ((0, 64), (0, 1), (4, 1), (2, 3)):
        x = torch.randn(T, H, dtype=torch.bfloat16)
        rec = encode(x, cfg)
        assert rec.shape == (T, record_layout(H, cfg).record_bytes) and rec.dtype == torch.uint8
        y = decode(rec, cfg, H, x.dtype)
        assert y.shape == (T, H) and y.dtype == x.dtype
        if T and H <= 2 and bits != "fp8":  # one or two values per group: both are spikes
            assert torch.equal(y, x) or not cfg.spikes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_single_huge_outlier_costs_nothing_with_spikes(bits):
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    x[2, 300] = 3.0e4
    cfg = CodecConfig(bits=bits, spikes=True)
    y = decode(encode(x, cfg), cfg, 1024, x.dtype)
    assert y[2, 300] == x[2, 300]
    base = decode(encode(torch.where(x.abs() > 100, 0, x), cfg), cfg, 1024, x.dtype)
    group = slice(256, 384)
    err_out = (y[2, group].float() - x[2, group].float()).abs().max()
    assert err_out < 4 * (base[2].float() - x[2].float()).abs().max() + 0.05


@pytest.mark.parametrize("bits", INT_BITS + ["fp8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_groups_decode_non_finite_and_stay_local(bits, bad):
    cfg = CodecConfig(bits=bits, group_size=32)
    x = torch.randn(2, 96, dtype=torch.float16)
    x[1, 40] = bad
    y = decode(encode(x, cfg), cfg, 96, x.dtype)
    assert torch.isnan(y[1, 32:64]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :32]).all() and torch.isfinite(y[1, 64:]).all()


def nan_bits(y: torch.Tensor) -> set:
    """The bit patterns (unsigned) of the NaNs in ``y``."""
    ints = y.view(torch.int32 if y.dtype == torch.float32 else torch.int16)
    return {v & ((1 << 8 * y.element_size()) - 1) for v in ints[torch.isnan(y)].tolist()}


def test_canonical_nan_is_the_standard_quiet_nan():
    """The bits docs/wire-format.md states, and what they are as floats."""
    assert R.CANONICAL_NAN == {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00,
                               torch.float32: 0x7FC00000}
    for dtype, bits in R.CANONICAL_NAN.items():
        t = torch.tensor([bits], dtype=torch.int32 if dtype == torch.float32 else torch.int16)
        assert torch.isnan(t.view(dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [CodecConfig(bits=b, group_size=g, spikes=s)
                                 for b, g, s in itertools.product(INT_BITS, (32, 128), (True, False))]
                         + [CodecConfig(bits="fp8", group_size=g) for g in (32, 64, 256)])
def test_every_decoded_nan_has_the_canonical_bits(dtype, cfg):
    """A group with NaN (either sign, any payload) or +-Inf decodes to all NaN, every NaN
    with the one canonical pattern of the output dtype; the metadata stores the canonical
    wire NaN. The CUDA kernels must give the same bits (tests/test_cuda_codec.py)."""
    H = 300  # a partial last group
    x = heavy_tailed(6, H, dtype, seed=3)
    ints = x.view(torch.int32 if dtype == torch.float32 else torch.int16)
    x[0, 5] = float("nan")
    ints[1, 40] = -1                      # a negative NaN with a full payload
    x[2, 299] = float("inf")              # in the partial group
    x[3, 0], x[3, 200] = float("-inf"), float("nan")
    x[4, 64:96] = float("nan")            # a whole group
    y = decode(encode(x, cfg), cfg, H, dtype)
    assert nan_bits(y) == {R.CANONICAL_NAN[dtype]}
    G = cfg.group_size
    for t, i in ((0, 5), (1, 40), (2, 299), (3, 0), (3, 200), (4, 64)):
        g = i // G
        assert torch.isnan(y[t, g * G:min(H, (g + 1) * G)]).all(), (t, i)
    assert torch.isfinite(y[5]).all()
    L = record_layout(H, cfg)
    wire = R.wire_float(dtype)
    scale = R._get(encode(x, cfg), L.scale, L.n_groups, wire)
    assert nan_bits(scale) == {R.CANONICAL_NAN[wire]}


@pytest.mark.parametrize("bits", INT_BITS)
def test_fp16_extremes(bits):
    fmax = torch.finfo(torch.float16).max
    x = torch.randn(3, 256, dtype=torch.float16)
    x[0, :128] = torch.linspace(-fmax, fmax, 128).half()   # widest possible range
    x[1, :128] = torch.randn(128).half() * 1e-6             # subnormals
    x[2, 5], x[2, 9] = fmax, -fmax
    check_int_bound(x, CodecConfig(bits=bits, spikes=False))
    check_int_bound(x, CodecConfig(bits=bits, spikes=True))


def test_range_beyond_wire_float_is_flagged_not_corrupted():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 3.0e38, -3.0e38  # fp32 range the fp32 difference cannot hold
    y = decode(encode(x, CodecConfig(bits=4, group_size=32, spikes=False)), CodecConfig(bits=4, group_size=32, spikes=False), 32, x.dtype)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_relative_error(dtype):
    cfg = CodecConfig(bits="fp8", group_size=128)
    x = heavy_tailed(8, 1000, dtype)
    y = decode(encode(x, cfg), cfg, 1000, dtype).float()
    L = record_layout(1000, cfg)
    scale = R._get(encode(x, cfg), L.scale, L.n_groups, R.wire_float(dtype)).float()
    scale = scale[..., None].expand(8, L.n_groups, 128).reshape(8, -1)[:, :1000]
    bound = x.float().abs() * 2**-4 + scale * 2**-10 + y.abs() * torch.finfo(dtype).eps
    assert ((y - x.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bf16_passthrough(dtype):
    cfg = CodecConfig(bits="bf16")
    x = heavy_tailed(4, 333, dtype)
    y = decode(encode(x, cfg), cfg, 333, dtype)
    want = x if dtype != torch.float32 else x.to(torch.bfloat16).float()
    assert torch.equal(y, want)


# ---- stochastic rounding -------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_and_reproducible():
    cfg = CodecConfig(bits=2, group_size=32, spikes=True, rounding="stochastic")
    x = torch.randn(4, 64)
    rec = encode(x, cfg, seed=11)
    assert torch.equal(rec, encode(x, cfg, seed=11))
    assert not torch.equal(rec, encode(x, cfg, seed=12))
    n = 400
    mean = sum(decode(encode(x, cfg, seed=s), cfg, 64, x.dtype) for s in range(n)) / n
    L = record_layout(64, cfg)
    scale = R.read_meta(rec, L, True, torch.bfloat16)["scale"].float()
    scale = scale[..., None].expand(4, 2, 32).reshape(4, 64)
    # each draw is off by at most one step, so the mean's std is <= scale / (2 sqrt(n))
    z = (mean - x).abs() / (scale / (2 * n**0.5))
    assert z.max() < 5.0
    nearest = decode(encode(x, CodecConfig(bits=2, group_size=32)), cfg, 64, x.dtype)
    assert (mean - x).abs().mean() < (nearest - x).abs().mean() / 3


def test_stochastic_seed_from_generator():
    cfg = CodecConfig(bits=3, rounding="stochastic")
    x = torch.randn(2, 256)
    a = encode(x, cfg, seed=torch.Generator().manual_seed(5))
    b = encode(x, cfg, seed=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="seed"):
        encode(x, cfg, seed="five")


def lowbias32_python(x):
    """The hash in plain Python integers, independent of the int64 emulation."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_counter_hash_matches_plain_integer_arithmetic():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + torch.randint(0, 2**32, (500,)).tolist()
    assert R._lowbias32(torch.tensor(xs)).tolist() == [lowbias32_python(v) for v in xs]
    seed, padded = 1234, 64
    u = R.uniform_noise(seed, 3, padded)
    key = lowbias32_python(seed)
    for t, i in ((0, 0), (1, 5), (2, 63)):
        assert u[t, i].item() == (lowbias32_python((t * padded + i) ^ key) >> 8) * 2.0**-24


# ---- bad input --------------------------------------------------------------------------------
def test_bad_inputs_raise_clearly():
    cfg = CodecConfig()
    with pytest.raises(ValueError, match="2-D"):
        encode(torch.randn(8), cfg)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        encode(torch.randn(2, 8, dtype=torch.float64), cfg)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        encode(torch.ones(2, 8, dtype=torch.int32), cfg)
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode([[1.0]], cfg)
    with pytest.raises(ValueError, match="hidden size"):
        encode(torch.randn(2, 0), cfg)
    rec = encode(torch.randn(2, 256), cfg)
    with pytest.raises(ValueError, match="record_bytes=.*for this codec"):
        decode(rec, cfg, 512)
    with pytest.raises(ValueError, match="uint8"):
        decode(rec.float(), cfg, 256)
    with pytest.raises(TypeError, match="dtype"):
        decode(rec, cfg, 256, torch.float64)


@pytest.mark.parametrize("cfg", [CodecConfig(), CodecConfig(bits="fp8"), CodecConfig(bits="bf16"),
                                 CodecConfig(bits="native")])
def test_meta_and_sparse_tensors_are_refused_early(cfg):
    """A meta tensor (shape only) or a sparse one is a clear ValueError, not a failure deep
    inside torch."""
    x = torch.empty(4, 256, device="meta")
    with pytest.raises(ValueError, match="x is a meta tensor .*no data"):
        encode(x, cfg)
    rb = record_layout(256, cfg, torch.float32).record_bytes
    with pytest.raises(ValueError, match="records is a meta tensor"):
        decode(torch.empty(4, rb, dtype=torch.uint8, device="meta"), cfg, 256, torch.float32)
    with pytest.raises(ValueError, match="CodecConfig.bits"):
        encode(torch.randn(2, 8), {"bits": 1})
    # sparse tensors likewise
    with pytest.raises(ValueError, match="x has layout torch.sparse_coo"):
        encode(torch.randn(4, 256).to_sparse(), cfg)
    with pytest.raises(ValueError, match="records has layout torch.sparse_coo"):
        decode(torch.zeros(4, rb, dtype=torch.uint8).to_sparse(), cfg, 256, torch.float32)


@pytest.mark.parametrize("cfg", [CodecConfig(bits=4, group_size=32), CodecConfig(bits=3, spikes=False),
                                 CodecConfig(bits="fp8"), CodecConfig(bits="bf16"),
                                 CodecConfig(bits="native")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_copies_and_takes_records_at_any_address(cfg, dtype):
    """decode's output never aliases the records (the bf16 passthrough of 16-bit tokens once
    returned a view of them, so refilling a receive buffer changed decoded tokens), and
    records at an odd byte address decode as aligned ones do (the CUDA decode copies them;
    the reference once failed in view(dtype))."""
    x = heavy_tailed(3, 256, dtype)
    rec = encode(x, cfg)
    want = decode(rec.clone(), cfg, 256, dtype)
    for T in (1, 3):
        buf = torch.zeros(T * rec.shape[1] + 1, dtype=torch.uint8)
        shifted = buf[1:].view(T, -1)
        shifted.copy_(rec[:T])
        y = decode(shifted, cfg, 256, dtype)
        assert torch.equal(y.view(torch.uint8), want[:T].view(torch.uint8))
        buf.fill_(0xFF)  # the caller reuses its buffer
        assert torch.equal(y.view(torch.uint8), want[:T].view(torch.uint8))
    y = decode(rec, cfg, 256, dtype)
    rec.zero_()
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))
