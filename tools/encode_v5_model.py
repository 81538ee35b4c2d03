"""CPU model of the v5 integer encode's group statistics (csrc/codec_encode.cu, encode_chunk_v5),
checked against moe_flashcomm.codec.reference on random bf16 groups (G = 128, V = 32: 4 lanes),
with ties, +-0 (either operand returned on ties), NaN/Inf, subnormals, huge values and partial
groups. It models the algorithm (pairwise lane statistics, ballots, the split first-index search,
the rest range), not the float arithmetic of the quantization, which v5 keeps from v4; then the
bit tricks (first-slot folding, plane-word slot clearing, lop3 select). No GPU needed:

    PYTHONPATH=$PWD python tools/encode_v5_model.py [seed]
"""
import math
import random
import sys
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from moe_flashcomm import CodecConfig, record_layout
from moe_flashcomm.codec import reference as R

NAN = float("nan")
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
def isnan(x): return x != x
def mnn(a, b):  # min.NaN; +-0 tie: random operand
    if isnan(a) or isnan(b): return NAN
    if a == b: return rng.choice([a, b])
    return min(a, b)
def mxn(a, b):
    if isnan(a) or isnan(b): return NAN
    if a == b: return rng.choice([a, b])
    return max(a, b)
def mn(a, b):  # min (NaN dropped)
    if isnan(a): return b
    if isnan(b): return a
    if a == b: return rng.choice([a, b])
    return min(a, b)
def mx(a, b):
    if isnan(a): return b
    if isnan(b): return a
    if a == b: return rng.choice([a, b])
    return max(a, b)
def fminf(a, b): return mn(a, b)
def fmaxf(a, b): return mx(a, b)
def pz(x): return x + 0.0 if not isnan(x) else x  # -0 + +0 = +0

def lane_stats_full(v):  # v: 32 values; per half (even / odd)
    out = []
    for par in (0, 1):
        x = v[par::2]  # 16 values of this half, word order
        a1 = mnn(x[0], x[1]); b1 = mxn(x[0], x[1]); a2 = b1; b2 = a1
        for i in range(2, 16, 2):
            l = mnn(x[i], x[i + 1]); h = mxn(x[i], x[i + 1])
            a2 = mn(mn(a2, h), mx(a1, l)); b2 = mx(mx(b2, l), mn(b1, h))
            a1 = mnn(a1, l); b1 = mxn(b1, h)
        out.append((a1, a2, b1, b2))
    (a1l, a2l, b1l, b2l), (a1h, a2h, b1h, b2h) = out
    A = (a1l, -b1l); B = (a1h, -b1h)
    s1 = (mnn(A[0], B[0]), mnn(A[1], B[1]))
    mxAB = (mx(A[0], B[0]), mx(A[1], B[1]))
    s2 = (mn(mxAB[0], mn(a2l, a2h)), mn(mxAB[1], mn(-b2l, -b2h)))
    return s1, s2

def lane_stats_partial(v, nv):  # v4 chunk_stats (scalar), then pack (mn, -mx)
    inf = math.inf
    mn1, mn2, mx1, mx2 = inf, inf, -inf, -inf
    for k in range(nv):
        x = v[k]
        mn2 = fminf(mn2, fmaxf(mn1, x)); mx2 = fmaxf(mx2, fminf(mx1, x))
        mn1 = mnn(mn1, x); mx1 = mxn(mx1, x)
    return (mn1, -mx1), (mn2, -mx2)

def first_eq(v, nv, t):
    for k in range(nv):
        if v[k] == t: return k
    return 32

def emulate_group(vals, count):  # vals: 128 (zeros beyond count)
    L, V, G = 4, 32, 128
    chunks = [vals[j * V:(j + 1) * V] for j in range(L)]
    nvs = [min(max(count - j * V, 0), V) for j in range(L)]
    st = [lane_stats_full(c) if nv == V else lane_stats_partial(c, nv) for c, nv in zip(chunks, nvs)]
    s1 = [s[0] for s in st]; s2 = [s[1] for s in st]
    g1 = (s1[0][0], s1[0][1])
    for j in range(1, L): g1 = (mnn(g1[0], s1[j][0]), mnn(g1[1], s1[j][1]))
    lo_raw, nhi_raw = g1
    lo, hi = pz(lo_raw), pz(-nhi_raw)
    bad = not (math.isfinite(lo) and math.isfinite(hi))
    if bad: return dict(bad=True)
    gfull = count >= G
    ll = next((j for j in range(L) if s1[j][0] == lo_raw), 31)
    lh = next((j for j in range(L) if s1[j][1] == nhi_raw), 31)
    if gfull:
        kl = []; kh = []
        for j in range(L):  # lane j searches words 4j..4j+3 = slots 8j..8j+7 of ll's / lh's chunk
            fl = next((k for k in range(8) if chunks[ll][8 * j + k] == lo), None)
            fh = next((k for k in range(8) if chunks[lh][8 * j + k] == hi), None)
            kl.append(0xFFFF if fl is None else 8 * j + fl); kh.append(0xFFFF if fh is None else 8 * j + fh)
        lo_idx = ll * V + min(kl); hi_idx = lh * V + min(kh)
    else:
        kl = []; kh = []
        for j in range(L):
            fl = first_eq(chunks[j], nvs[j], lo); fh = first_eq(chunks[j], nvs[j], hi)
            kl.append(j * V + fl if fl < V else 0xFFFF); kh.append(j * V + fh if fh < V else 0xFFFF)
        lo_idx = min(kl); hi_idx = min(kh)
    r = [((s2[j][0] if j == ll else s1[j][0]), (s2[j][1] if j == lh else s1[j][1])) for j in range(L)]
    g2 = r[0]
    for j in range(1, L): g2 = (mn(g2[0], r[j][0]), mn(g2[1], r[j][1]))
    if gfull or count > (1 if lo_idx == hi_idx else 2):
        rest_lo, rest_hi = pz(g2[0]), pz(-g2[1])
    else:
        rest_lo, rest_hi = lo, lo
    return dict(bad=False, lo=lo, hi=hi, lo_idx=lo_idx, hi_idx=hi_idx, rest_lo=rest_lo, rest_hi=rest_hi)

def rand_vals(n):
    kind = rng.random()
    pool = [0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-3, 3.0, -3.0, 3.3e38, -3.3e38, 1e-40, -1e-40]
    out = []
    for _ in range(n):
        u = rng.random()
        if kind < 0.4: x = rng.choice(pool)           # many ties
        elif kind < 0.8: x = rng.gauss(0, 1) * (30 if rng.random() < 0.02 else 1)
        else: x = rng.choice([0.0, -0.0, 5.0])          # nearly constant
        out.append(x)
    if rng.random() < 0.05: out[rng.randrange(n)] = rng.choice([NAN, math.inf, -math.inf])
    return out

cfg = CodecConfig(bits=4, group_size=128, spikes=True)
checked = 0
for trial in range(3000):
    H = rng.choice([128, 256, 130, 200, 129, 250, 1, 2, 3, 33])
    vals = rand_vals(H)
    x = torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16).view(1, H)
    L_ = record_layout(H, cfg)
    xf, valid = R._grouped(x, L_)
    q = R.quantize_groups(xf, valid, cfg, torch.bfloat16, None)
    xb = x.float().view(-1).tolist()
    for g in range(L_.n_groups):
        count = min(128, H - g * 128)
        gv = xb[g * 128:g * 128 + count] + [0.0] * (128 - count)
        e = emulate_group(gv, H - g * 128)
        ref_bad = math.isnan(q["scale"][0, g].float().item())
        if e["bad"]:
            assert ref_bad, (H, g, gv)
            continue
        # v5's bad also needs the scale finite: compute the scale as the reference does
        mnw = torch.tensor(e["rest_lo"]).to(torch.bfloat16)  # exact (16-bit value)
        assert mnw.float().item() == e["rest_lo"]
        sc = R.round_to_wire((torch.tensor(e["rest_hi"]) - mnw.float()) / cfg.qmax, torch.bfloat16, "up")
        if not math.isfinite(sc.float().item()):
            assert ref_bad; continue
        assert not ref_bad, (H, g)
        assert e["lo_idx"] == q["lo_index"][0, g].item(), (H, g, e, q["lo_index"][0, g])
        assert e["hi_idx"] == q["hi_index"][0, g].item(), (H, g, e, q["hi_index"][0, g])
        assert torch.tensor(e["lo"]).to(torch.bfloat16).view(torch.int16) == q["lo_value"][0, g].view(torch.int16)
        assert torch.tensor(e["hi"]).to(torch.bfloat16).view(torch.int16) == q["hi_value"][0, g].view(torch.int16)
        assert mnw.view(torch.int16) == q["minimum"][0, g].view(torch.int16), (H, g, e, q["minimum"][0, g])
        assert sc.view(torch.int16) == q["scale"][0, g].view(torch.int16), (H, g, e, q["scale"][0, g])
        checked += 1
print("ok, groups checked:", checked)


# ---- bit tricks -------------------------------------------------------------------------------
M=0xFFFFFFFF
def brev(x): return int(f"{x:032b}"[::-1],2)
def clz_or_max(x): return M if x==0 else 32-x.bit_length()
def part_first(flags):  # flags: list of 2*WP bools (slot order), WP words
    WP=len(flags)//2; acc=[0]*((WP+7)//8)
    for k in range(WP):
        e,o=flags[2*k],flags[2*k+1]
        m=(0xFFFF if e else 0)|(0xFFFF0000 if o else 0)
        acc[k//8]|=m&((1<<(2*(k%8)))|(1<<(17+2*(k%8))))
    f=(acc[0]+(acc[0]>>16))&M
    if WP>8: f=(f&0xFFFF)|(((acc[1]+(acc[1]>>16))&0xFFFF)<<16)
    return clz_or_max(brev(f))
def first_slot_v5(flags, V):  # V slots, words V/2; acc per 16 words: bit i and 16+i
    NA=(V+31)//32; acc=[0]*NA
    for i in range(V//2):
        e,o=flags[2*i],flags[2*i+1]
        m=(0xFFFF if e else 0)|(0xFFFF0000 if o else 0)
        acc[i//16]|=m&(0x10001<<(i%16))
    idx=M
    for j in range(NA-1,-1,-1):
        b=brev(acc[j])
        f=min((2*clz_or_max(b))&M, (2*clz_or_max((b<<16)&M)+1)&M)
        if NA==1: idx=f
        elif f<32: idx=32*j+f
    return idx
for trial in range(20000):
    WP=random.choice([1,2,4,8,16]); n=2*WP
    p=random.random()*0.3
    fl=[random.random()<p for _ in range(n)]
    want=fl.index(True) if any(fl) else None
    got=part_first(fl)
    if want is None: assert got==M,(fl,got)
    else: assert got==want,(fl,got,want)
    key=got|(3*2*WP)  # lane 3
    assert (key&0xFFFF)==(0xFFFF if want is None else 6*WP+want)
    V=random.choice([16,32,64]); fl=[random.random()<p for _ in range(V)]
    want=fl.index(True) if any(fl) else None
    got=first_slot_v5(fl,V)
    if want is not None: assert got==want,(V,fl,got,want)
    else: assert got>=V, (V, got)
def shl_clamp(x,n): return 0 if n>=32 else (x<<n)&M
for trial in range(20000):
    W=random.choice([1,2,4,8]); V=random.choice([16,32,64]); NW=(V*W+31)//32
    words=[random.getrandbits(32) for _ in range(NW)]
    if V*W<32: words[0]&=(1<<(V*W))-1
    jl=random.choice([random.randrange(V), random.randrange(V,300), (-random.randrange(1,300))&M, M])
    jh=random.choice([random.randrange(V), random.randrange(V,300), (-random.randrange(1,300))&M, M])
    bl,bh=(jl*W)&M,(jh*W)&M
    got=[w & ~(shl_clamp((1<<W)-1,(bl-32*c)&M)|shl_clamp((1<<W)-1,(bh-32*c)&M)) & M for c,w in enumerate(words)]
    big=sum(w<<(32*c) for c,w in enumerate(words))
    for j in (jl,jh):
        if j < V: big&=~(((1<<W)-1)<<(W*j))
    want=[(big>>(32*c))&M for c in range(NW)]
    assert got==want,(W,V,jl,jh)
def bitsel(a,b,m):  # lop3 0xCA with operands (m, a, b)
    r=0
    for i in range(32):
        A=(m>>i)&1;B=(a>>i)&1;C=(b>>i)&1
        idx=(A<<2)|(B<<1)|C
        r|=((0xCA>>idx)&1)<<i
    return r
for t in range(2000):
    a,b,m=(random.getrandbits(32) for _ in range(3))
    assert bitsel(a,b,m)==((a&m)|(b&~m&M))
# second min with multiplicity via pairwise merging
import math
for t in range(20000):
    n=random.choice([4,8,16,32]); vals=[random.choice([random.randint(-3,3), random.random()]) for _ in range(n)]
    a1=min(vals[0],vals[1]); a2=max(vals[0],vals[1]); b1=a2; b2=a1
    for i in range(2,n,2):
        x,y=vals[i],vals[i+1]; l,h=min(x,y),max(x,y)
        a2=min(min(a2,h),max(a1,l)); b2=max(max(b2,l),min(b1,h)); a1=min(a1,l); b1=max(b1,h)
    s=sorted(vals); assert (a1,a2,b1,b2)==(s[0],s[1],s[-1],s[-2]),(vals)
print("bit tricks ok")
