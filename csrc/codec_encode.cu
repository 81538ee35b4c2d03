// Encode kernels: tokens [T, H] (fp32/bf16/fp16) -> records [T, record_bytes].
// Bit-identical to moe_flashcomm/codec/reference.py (encode); see codec_common.cuh for the
// work split. One launch covers T * padded_hidden / V threads.
#include "codec_common.cuh"

namespace mfc {

// V values of a row starting at base, as fp32 (0 beyond H: those slots are masked later).
template <typename In, int V>
__device__ __forceinline__ void load_chunk(const In* row, int base, int H, bool vec, float* v, u32* w) {
  if constexpr (sizeof(In) == 2) {  // also keep the raw 16-bit words, two values each
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      const int p = base + 8 * c;
      if (vec && p + 8 <= H) {
        const uint4 u = *reinterpret_cast<const uint4*>(row + p);
        w[4 * c] = u.x; w[4 * c + 1] = u.y; w[4 * c + 2] = u.z; w[4 * c + 3] = u.w;
      } else {
        const u16* r = reinterpret_cast<const u16*>(row);
#pragma unroll
        for (int k = 0; k < 8; k += 2)
          w[4 * c + k / 2] = (p + k < H ? r[p + k] : 0u) | (p + k + 1 < H ? (u32)r[p + k + 1] << 16 : 0u);
      }
    }
#pragma unroll
    for (int i = 0; i < V / 2; ++i) Val<In>::unpack(w[i], v[2 * i], v[2 * i + 1]);
  } else {
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      const int p = base + 8 * c;
      if (vec && p + 8 <= H) {
        Val<In>::get8(row + p, v + 8 * c);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[8 * c + k] = p + k < H ? Val<In>::get(row + p + k) : 0.0f;
      }
    }
  }
}

// Chunk min/max (NaN-propagating) and, with spikes, the second smallest / largest values
// counted with multiplicity: the chunk's min/max once its first min/max slot is removed.
template <int V, bool SPIKES, bool FULL>
__device__ __forceinline__ void chunk_stats(const float* v, int nv, float& mn1, float& mx1,
                                            float& mn2, float& mx2) {
  mn1 = mn2 = inf();
  mx1 = mx2 = -inf();
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (FULL || k < nv) {
      if (SPIKES) {
        mn2 = fminf(mn2, fmaxf(mn1, v[k]));
        mx2 = fmaxf(mx2, fminf(mx1, v[k]));
      }
      mn1 = min_nan(mn1, v[k]);
      mx1 = max_nan(mx1, v[k]);
    }
  }
}

// The same on whole 16-bit words: each half of a pair tracks its own stats, merged at the end.
template <typename In, int V, bool SPIKES>
__device__ __forceinline__ void chunk_stats_pairs(const u32* w, float& mn1, float& mx1,
                                                  float& mn2, float& mx2) {
  typedef Pair<In> P;
  typename P::T2 a1 = P::of(w[0]), b1 = a1, a2 = P::splat(inf()), b2 = P::splat(-inf());
#pragma unroll
  for (int i = 1; i < V / 2; ++i) {
    const typename P::T2 x = P::of(w[i]);
    if (SPIKES) {
      a2 = __hmin2(a2, __hmax2(a1, x));
      b2 = __hmax2(b2, __hmin2(b1, x));
    }
    a1 = __hmin2_nan(a1, x);
    b1 = __hmax2_nan(b1, x);
  }
  const float a1l = P::lo(a1), a1h = P::hi(a1), b1l = P::lo(b1), b1h = P::hi(b1);
  mn1 = min_nan(a1l, a1h);
  mx1 = max_nan(b1l, b1h);
  if (SPIKES) {  // second smallest of the union of the two halves' (min, second) pairs
    mn2 = fminf(fmaxf(a1l, a1h), fminf(P::lo(a2), P::hi(a2)));
    mx2 = fmaxf(fminf(b1l, b1h), fmaxf(P::lo(b2), P::hi(b2)));
  }
}

// First slot equal to target on whole 16-bit words (V if none): one packed compare per pair.
template <typename In, int V>
__device__ __forceinline__ int first_eq_pairs(const u32* w, float target) {
  typedef Pair<In> P;
  const typename P::T2 t = P::splat(target);
  u32 acc[(V + 15) / 16] = {};  // bit k = slot k of each 16 (high halves land at 17 + 2i)
#pragma unroll
  for (int i = 0; i < V / 2; ++i)
    acc[i / 8] |= __heq2_mask(P::of(w[i]), t) & ((1u << (2 * (i % 8))) | (1u << (17 + 2 * (i % 8))));
  int idx = V;
#pragma unroll
  for (int j = (V + 15) / 16 - 1; j >= 0; --j) {
    const u32 bits = (acc[j] & 0xFFFFu) | (acc[j] >> 16);
    if (bits) idx = 16 * j + __ffs(bits) - 1;
  }
  return idx;
}

// First slot of the chunk equal to target (-0 == +0), V if none.
template <int V, bool FULL>
__device__ __forceinline__ int first_eq(const float* v, int nv, float target) {
  int idx = V;
#pragma unroll
  for (int k = V - 1; k >= 0; --k)
    if ((FULL || k < nv) && v[k] == target) idx = k;
  return idx;
}

// Bit splitting: the 4/2/1-bit planes of the chunk's codes.
template <int BITS, int V>
__device__ __forceinline__ void store_planes(u8* rec, int base, const u32* s, u32 z, int o4, int o2, int o1) {
  u32 E[V / 8], O[V / 8];
#pragma unroll
  for (int c = 0; c < V / 8; ++c) {
    const u32* q = s + 8 * c;
    E[c] = pack4(q[0], q[2], q[4], q[6]) & ~spread_even(z >> (8 * c));
    O[c] = pack4(q[1], q[3], q[5], q[7]) & ~spread_even(z >> (8 * c + 1));
  }
  if constexpr ((BITS & 4) != 0) {
    u32 w[V / 8];
#pragma unroll
    for (int c = 0; c < V / 8; ++c) w[c] = plane_pack<4>(E[c], O[c], BITS - 4);
    store_bytes<V / 2>(rec + o4 + base / 2, w);
  }
  if constexpr ((BITS & 2) != 0) {
    u32 w[(V + 15) / 16] = {};
#pragma unroll
    for (int c = 0; c < V / 8; ++c) set_chunk_bits<2>(w, c, plane_pack<2>(E[c], O[c], BITS & 1));
    store_bytes<V / 4>(rec + o2 + base / 4, w);
  }
  if constexpr ((BITS & 1) != 0) {
    u32 w[(V + 31) / 32] = {};
#pragma unroll
    for (int c = 0; c < V / 8; ++c) set_chunk_bits<1>(w, c, plane_pack<1>(E[c], O[c], 0));
    store_bytes<V / 8>(rec + o1 + base / 8, w);
  }
}

// Store the chunk's codes (low byte of s[k]; bit k of z set = code 0) into its plane bytes.
template <int BITS, int V>
__device__ __forceinline__ void store_codes(u8* rec, int base, const u32* s, u32 z, int o4, int o2, int o1) {
  if constexpr (BITS == 8) {  // o4 is the 8-bit plane
    u32 w[V / 4];
#pragma unroll
    for (int c = 0; c < V / 4; ++c)
      w[c] = pack4(s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]) & ~spread4(z >> (4 * c));
    store_bytes<V>(rec + o4 + base, w);
  } else {
    store_planes<BITS, V>(rec, base, s, z, o4, o2, o1);
  }
}

// Integer widths (2..8 bits), spikes on/off, nearest or stochastic rounding.
template <typename In, int BITS, bool SPIKES, bool SR, int V>
__global__ void __launch_bounds__(kBlock) encode_int(
    const In* __restrict__ x, u8* __restrict__ rec, int H, int log2L, int padded, int rec_bytes,
    u32 ipt, u32 div_mul, u32 div_shift, u32 total, int o4, int o2, int o1, int o_scale,
    int o_min, int o_lov, int o_hiv, int o_loi, int o_hii, int gap0, int gap1, int gap2, int gap3,
    u32 seed_key, u32 counter0, int vec) {
  typedef typename Val<In>::W W;
  constexpr int QMAX = (1 << BITS) - 1;
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if ((item & ~31u) >= total) return;  // shuffles below need every lane of a warp
  const Pos P = locate<V>(item, total, ipt, div_mul, div_shift, log2L);
  const int L = 1 << log2L, G = L * V;
  const In* row = x + (size_t)P.t * H;
  u8* out = rec + (size_t)P.t * rec_bytes;

  constexpr bool PAIRS = UsePairs<In>::value;
  float v[V];
  u32 w[V / 2];
  load_chunk<In, V>(row, P.base, H, vec != 0, v, w);
  const int nv = min(max(H - P.base, 0), V);  // real values in the chunk
  const bool full = nv == V;

  float mn1, mx1, mn2, mx2;
  if (!full) chunk_stats<V, SPIKES, false>(v, nv, mn1, mx1, mn2, mx2);
  else if constexpr (PAIRS) chunk_stats_pairs<In, V, SPIKES>(w, mn1, mx1, mn2, mx2);
  else chunk_stats<V, SPIKES, true>(v, nv, mn1, mx1, mn2, mx2);
  const float lo = plus_zero(group_reduce(mn1, L, MinNaN()));
  const float hi = plus_zero(group_reduce(mx1, L, MaxNaN()));
  bool bad = !(finite(lo) && finite(hi));  // a NaN or Inf among the group's values

  float rest_lo = lo, rest_hi = hi;
  int lo_idx = 0, hi_idx = 0;
  if (SPIKES) {
    // The first index of lo lies in the lowest lane whose chunk min equals lo.
    const u32 bl = __ballot_sync(~0u, mn1 == lo) & P.mask, bh = __ballot_sync(~0u, mx1 == hi) & P.mask;
    const int ll = bl ? __ffs(bl) - 1 : P.first, lh = bh ? __ffs(bh) - 1 : P.first;
    int fl, fh;
    if (!full) {
      fl = first_eq<V, false>(v, nv, lo);
      fh = first_eq<V, false>(v, nv, hi);
    } else if constexpr (PAIRS) {
      fl = first_eq_pairs<In, V>(w, lo);
      fh = first_eq_pairs<In, V>(w, hi);
    } else {
      fl = first_eq<V, true>(v, nv, lo);
      fh = first_eq<V, true>(v, nv, hi);
    }
    lo_idx = (ll - P.first) * V + __shfl_sync(~0u, fl, ll);
    hi_idx = (lh - P.first) * V + __shfl_sync(~0u, fh, lh);
    // Rest range: every rest value lies in [lo, hi], so min(rest) is the group min without the
    // lo slot, i.e. the spike lane's second smallest value (likewise for the max).
    const int wl = threadIdx.x & 31;
    const float rmn = group_reduce(wl == ll ? mn2 : mn1, L, Min());
    const float rmx = group_reduce(wl == lh ? mx2 : mx1, L, Max());
    const int count = min(G, H - P.g * G);  // real values in the group
    if (count > (lo_idx == hi_idx ? 1 : 2)) {
      rest_lo = plus_zero(rmn);
      rest_hi = plus_zero(rmx);
    } else {
      rest_hi = lo;  // nothing left besides the spikes: the range collapses onto the min
    }
  }

  const u16 mn_w = Wire<W>::rd(rest_lo);
  const float mnf = Wire<W>::f(mn_w);
  const u16 sc_w = Wire<W>::ru(__fdiv_rn(__fsub_rn(rest_hi, mnf), (float)QMAX));
  const float scf = Wire<W>::f(sc_w);
  bad = bad || !finite(mnf) || !finite(scf);

  // t = (x - minimum) / scale; codes from the magic add (low byte of s[k]).
  float q[V];
  if (div_fast_ok(scf)) {
    const float rc = __frcp_rn(scf);
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = div_rn_fast(__fsub_rn(v[k], mnf), scf, rc);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = scf == 0.0f ? 0.0f : __fdiv_rn(__fsub_rn(v[k], mnf), scf);
  }
  // x + 1.5 * 2^23 leaves rint(x) (round-half-even; floor with a round-down add) in the low
  // mantissa bits for 0 <= x < 2^22: a rounding and an integer conversion in one add.
  constexpr float kMagic = 12582912.0f;
  u32 s[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (SR) {
      const u32 h = lowbias32((counter0 + P.t * (u32)padded + (u32)(P.base + k)) ^ seed_key);
      const float u = __fmul_rn(__uint2float_rn(h >> 8), 0x1p-24f);
      // clamp(floor(t + u), 0, qmax) == floor(min(t + u, qmax)) since qmax is an integer
      s[k] = __float_as_uint(__fadd_rd(fminf(__fadd_rn(q[k], u), (float)QMAX), kMagic));
    } else {  // rest values have t <= qmax + 2^-17 (scale is rounded up): no clamp needed
      s[k] = __float_as_uint(__fadd_rn(q[k], kMagic));
    }
  }

  // Code 0 at padding, spike slots and in bad groups.
  u32 z = full ? 0u : ~0u << nv;
  if (SPIKES) {
    const u32 jl = (u32)(lo_idx - P.lane * V), jh = (u32)(hi_idx - P.lane * V);
    if (jl < (u32)V) z |= 1u << jl;
    if (jh < (u32)V) z |= 1u << jh;
  }
  if (bad) z = ~0u;
  if (!P.live) return;
  store_codes<BITS, V>(out, P.base, s, z, o4, o2, o1);

  if (P.lane == 0) {
    const u16 nan = Wire<W>::kNaN;
    st16(out + o_scale + 2 * P.g, bad ? nan : sc_w);
    st16(out + o_min + 2 * P.g, bad ? nan : mn_w);
    if (SPIKES) {
      st16(out + o_lov + 2 * P.g, bad ? nan : Wire<W>::rn(lo));
      st16(out + o_hiv + 2 * P.g, bad ? nan : Wire<W>::rn(hi));
      out[o_loi + P.g] = bad ? 0 : (u8)lo_idx;
      out[o_hii + P.g] = bad ? 0 : (u8)hi_idx;
    }
  }
  if (P.g == 0 && P.lane == 0) zero_gaps(out, gap0, gap1, gap2, gap3);
}

// fp8 e4m3: scale = round_up(amax / 448), code = e4m3(clamp(x / scale, +-448)).
template <typename In, int V>
__global__ void __launch_bounds__(kBlock) encode_fp8(
    const In* __restrict__ x, u8* __restrict__ rec, int H, int log2L, int rec_bytes, u32 ipt,
    u32 div_mul, u32 div_shift, u32 total, int o8, int o_scale, int gap0, int gap1, int gap2,
    int gap3, int vec) {
  typedef typename Val<In>::W W;
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if ((item & ~31u) >= total) return;
  const Pos P = locate<V>(item, total, ipt, div_mul, div_shift, log2L);
  const int L = 1 << log2L;
  const In* row = x + (size_t)P.t * H;
  u8* out = rec + (size_t)P.t * rec_bytes;

  float v[V];
  u32 raw[V / 2];
  load_chunk<In, V>(row, P.base, H, vec != 0, v, raw);
  const int nv = min(max(H - P.base, 0), V);

  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (k < nv) amax = max_nan(amax, fabsf(v[k]));
  amax = group_reduce(amax, L, MaxNaN());
  const u16 sc_w = Wire<W>::ru(__fdiv_rn(amax, 448.0f));
  const float scf = Wire<W>::f(sc_w);
  const bool bad = !finite(amax) || !finite(scf);

  float y[V];
  if (div_fast_ok(scf)) {
    const float rc = __frcp_rn(scf);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = copysignf(div_rn_fast(v[k], scf, rc), v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = scf == 0.0f ? 0.0f : __fdiv_rn(v[k], scf);
  }
  u32 w[V / 4];
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    float a = fminf(fmaxf(y[k], -448.0f), 448.0f), b = fminf(fmaxf(y[k + 1], -448.0f), 448.0f);
    if (bad || k >= nv) a = 0.0f;
    if (bad || k + 1 >= nv) b = 0.0f;
    const u32 pair = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    if (k % 4 == 0) w[k / 4] = pair;
    else w[k / 4] |= pair << 16;
  }
  if (!P.live) return;
  store_bytes<V>(out + o8 + P.base, w);

  if (P.lane == 0) st16(out + o_scale + 2 * P.g, bad ? Wire<W>::kNaN : sc_w);
  if (P.g == 0 && P.lane == 0) zero_gaps(out, gap0, gap1, gap2, gap3);
}

}  // namespace mfc

#ifdef MFC_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): compile every variant the loader may request.
namespace mfc {
#define MFC_ENC_INT(T, B, S, V) \
  (const void*)&encode_int<T, B, S, false, V>, (const void*)&encode_int<T, B, S, true, V>
#define MFC_ENC_BITS(T, S, V) \
  MFC_ENC_INT(T, 2, S, V), MFC_ENC_INT(T, 3, S, V), MFC_ENC_INT(T, 4, S, V), MFC_ENC_INT(T, 5, S, V), \
  MFC_ENC_INT(T, 6, S, V), MFC_ENC_INT(T, 7, S, V), MFC_ENC_INT(T, 8, S, V)
#define MFC_ENC_TYPE(T, V) MFC_ENC_BITS(T, false, V), MFC_ENC_BITS(T, true, V), (const void*)&encode_fp8<T, V>
#define MFC_ENC_V(V) MFC_ENC_TYPE(float, V), MFC_ENC_TYPE(__nv_bfloat16, V), MFC_ENC_TYPE(__half, V)
extern const void* const all_encode_kernels[] = {MFC_ENC_V(8), MFC_ENC_V(16), MFC_ENC_V(32)};
}  // namespace mfc
#endif
