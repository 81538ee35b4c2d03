// Encode kernels: tokens [T, H] (fp32/bf16/fp16) -> records [T, record_bytes].
// Bit-identical to moe_flashcomm/codec/reference.py (encode); see codec_common.cuh for the
// work split. One launch covers T * padded_hidden / (V * U) threads.
#ifndef MFC_CODEC_ENCODE_CU  // included by allreduce.cu and p2p.cu too
#define MFC_CODEC_ENCODE_CU
#include "codec_common.cuh"

// (V, U) shapes instantiated for CI; keep in sync with ENCODE_SHAPES in codec/cuda.py.
// MFC_INSTANTIATE_HALF=1 or 2: half of them, so that CI compiles the halves in parallel.
#if !defined(MFC_INSTANTIATE_HALF)
#define MFC_ENC_SHAPES MFC_ENC(16, 1), MFC_ENC(32, 1), MFC_ENC(32, 2), MFC_ENC(64, 1)
#elif MFC_INSTANTIATE_HALF == 1
#define MFC_ENC_SHAPES MFC_ENC(16, 1), MFC_ENC(32, 1)
#else
#define MFC_ENC_SHAPES MFC_ENC(32, 2), MFC_ENC(64, 1)
#endif

namespace mfc {

// The raw bits of the V values of a row starting at base (two 16-bit values per word, or one
// fp32 per word); 0 beyond H (those slots are masked later).
// DENSE: the caller knows the chunk is inside an aligned row (vec, base + V <= H).
template <typename In, int V, bool DENSE = false>
__device__ __forceinline__ void load_raw(const In* row, int base, int H, bool vec, u32* w) {
#pragma unroll
  for (int c = 0; c < V / 8; ++c) {
    const int p = base + 8 * c;
    if constexpr (sizeof(In) == 2) {
      if (DENSE || (vec && p + 8 <= H)) {
        const uint4 u = *reinterpret_cast<const uint4*>(row + p);
        w[4 * c] = u.x; w[4 * c + 1] = u.y; w[4 * c + 2] = u.z; w[4 * c + 3] = u.w;
      } else {
        const u16* r = reinterpret_cast<const u16*>(row);
#pragma unroll
        for (int k = 0; k < 8; k += 2)
          w[4 * c + k / 2] = (p + k < H ? r[p + k] : 0u) | (p + k + 1 < H ? (u32)r[p + k + 1] << 16 : 0u);
      }
    } else {
      if (DENSE || (vec && p + 8 <= H)) {
        const uint4 u = reinterpret_cast<const uint4*>(row + p)[0], t = reinterpret_cast<const uint4*>(row + p)[1];
        w[8 * c] = u.x; w[8 * c + 1] = u.y; w[8 * c + 2] = u.z; w[8 * c + 3] = u.w;
        w[8 * c + 4] = t.x; w[8 * c + 5] = t.y; w[8 * c + 6] = t.z; w[8 * c + 7] = t.w;
      } else {
        const u32* r = reinterpret_cast<const u32*>(row);
#pragma unroll
        for (int k = 0; k < 8; ++k) w[8 * c + k] = p + k < H ? r[p + k] : 0u;
      }
    }
  }
}
template <typename In, int V>
__host__ __device__ constexpr int raw_words() { return sizeof(In) == 2 ? V / 2 : V; }

// Value k of a chunk as fp32 (k is a compile-time constant after unrolling).
template <typename In>
__device__ __forceinline__ float value(const u32* w, int k) {
  if constexpr (sizeof(In) == 4) return __uint_as_float(w[k]);
  else if constexpr (UsesBf16<In>::value) return __uint_as_float(k & 1 ? w[k / 2] & 0xFFFF0000u : w[k / 2] << 16);
  else return __half2float(__ushort_as_half((u16)(w[k / 2] >> (16 * (k & 1)))));
}

// Chunk min/max (NaN-propagating) and, with spikes, the second smallest / largest values
// counted with multiplicity: the chunk's min/max once its first min/max slot is removed.
template <typename In, int V, bool SPIKES, bool FULL>
__device__ __forceinline__ void chunk_stats(const u32* w, int nv, float& mn1, float& mx1,
                                            float& mn2, float& mx2) {
  mn1 = mn2 = inf();
  mx1 = mx2 = -inf();
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (FULL || k < nv) {
      const float x = value<In>(w, k);
      if (SPIKES) {
        mn2 = fminf(mn2, fmaxf(mn1, x));
        mx2 = fmaxf(mx2, fminf(mx1, x));
      }
      mn1 = min_nan(mn1, x);
      mx1 = max_nan(mx1, x);
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
template <typename In, int V, bool FULL>
__device__ __forceinline__ int first_eq(const u32* w, int nv, float target) {
  int idx = V;
#pragma unroll
  for (int k = V - 1; k >= 0; --k)
    if ((FULL || k < nv) && value<In>(w, k) == target) idx = k;
  return idx;
}

// Bit splitting: the 4/2/1-bit planes of the chunk's codes.
template <int BITS, int V>
__device__ __forceinline__ void store_planes(u8* rec, int base, const u32* s, u64 z, int o4, int o2, int o1) {
  u32 E[V / 8], O[V / 8];
#pragma unroll
  for (int c = 0; c < V / 8; ++c) {
    const u32* q = s + 8 * c;
    E[c] = pack4(q[0], q[2], q[4], q[6]) & ~spread_even((u32)(z >> (8 * c)));
    O[c] = pack4(q[1], q[3], q[5], q[7]) & ~spread_even((u32)(z >> (8 * c + 1)));
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
__device__ __forceinline__ void store_codes(u8* rec, int base, const u32* s, u64 z, int o4, int o2, int o1) {
  if constexpr (BITS == 8) {  // o4 is the 8-bit plane
    u32 w[V / 4];
#pragma unroll
    for (int c = 0; c < V / 4; ++c)
      w[c] = pack4(s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]) & ~spread4((u32)(z >> (4 * c)));
    store_bytes<V>(rec + o4 + base, w);
  } else {
    store_planes<BITS, V>(rec, base, s, z, o4, o2, o1);
  }
}

// Group-wide (min, max) of the lanes' (mn, mx); NaN-propagating if nan. For 16-bit tokens the
// values are exact in that type, so (mn, -mx) travel as one packed pair: one shuffle and one
// packed min per step instead of two each.
template <typename In>
__device__ __forceinline__ void group_min_max(float mn, float mx, int L, bool nan, float& lo, float& hi) {
  if constexpr (UsePairs<In>::value) {
    typedef Pair<In> P;
    typename P::T2 p = P::pack(mn, -mx);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      if (off < L) {
        const typename P::T2 q = P::of(__shfl_xor_sync(0xFFFFFFFFu, P::bits(p), off));
        p = nan ? __hmin2_nan(p, q) : __hmin2(p, q);
      }
    }
    lo = P::lo(p);
    hi = -P::hi(p);
  } else {
    lo = nan ? group_reduce(mn, L, MinNaN()) : group_reduce(mn, L, Min());
    hi = nan ? group_reduce(mx, L, MaxNaN()) : group_reduce(mx, L, Max());
  }
}

// Kernel arguments (one struct, passed by value; moe_flashcomm/codec/cuda.py mirrors it).
struct EncArgs {
  int H, log2L, padded, rec_bytes;
  u32 ipt, div_mul, div_shift, total;  // items (chunks) per token, its fastdiv, all items
  int o4, o2, o1;                      // plane offsets (o4: the 8-bit plane for 8 bits, fp8 codes)
  int o_scale, o_min, o_lov, o_hiv, o_loi, o_hii;
  int gap[4];                          // padding ranges to zero, (start << 4) | length
  u32 seed_key, counter0;              // stochastic rounding: lowbias32(seed), first counter
  int vec;                             // rows are 16-byte aligned (H % 8 == 0, aligned base)
};

// Load the raw chunks of the thread's U items (items item0 + u * kBlock) before any work, so
// that U loads are in flight per thread.
template <typename In, int V, int U, bool DENSE>
__device__ __forceinline__ void load_items(const In* x, u32 item0, const EncArgs& a, u32 (*w)[raw_words<In, V>()]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const u32 item = min(item0 + u * kBlock, a.total - 1);  // past-the-end lanes read real data
    const Pos P = locate<V>(item, a.total, a.ipt, a.div_mul, a.div_shift, a.log2L);
    load_raw<In, V, DENSE>(x + (size_t)P.t * a.H, P.base, a.H, a.vec != 0, w[u]);
  }
}

#ifndef MFC_ENC_V4
// ---- v5: the integer encode of 16-bit tokens (bf16 / fp16) ------------------------------------
// Same results as the v4 body of encode_chunk below (build with -DMFC_ENC_V4 for it), fewer
// instructions per value; see docs/kernel-notes.md "v5". Only the 16-bit inputs take this
// path (UsePairs); fp32 keeps v4.

// Packed pair ops on raw u32 words (PTX min/max on bf16x2 / f16x2, sm_80+): the intrinsics'
// struct types made nvcc split and re-pack the halves with extra PRMTs.
template <typename In> struct PX;
template <> struct PX<__nv_bfloat16> {
  static __device__ __forceinline__ u32 mn(u32 a, u32 b) { u32 r; asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mx(u32 a, u32 b) { u32 r; asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mnn(u32 a, u32 b) { u32 r; asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mxn(u32 a, u32 b) { u32 r; asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ float lo(u32 a) { return __uint_as_float(a << 16); }
  static __device__ __forceinline__ float hi(u32 a) { return __uint_as_float(a & 0xFFFF0000u); }
};
template <> struct PX<__half> {
  static __device__ __forceinline__ u32 mn(u32 a, u32 b) { u32 r; asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mx(u32 a, u32 b) { u32 r; asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mnn(u32 a, u32 b) { u32 r; asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ u32 mxn(u32 a, u32 b) { u32 r; asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r; }
  static __device__ __forceinline__ float lo(u32 a) { return __half2float(__ushort_as_half((u16)a)); }
  static __device__ __forceinline__ float hi(u32 a) { return __half2float(__ushort_as_half((u16)(a >> 16))); }
};

// Lane statistics of a full chunk on packed pairs: per half of the words, the min and second
// min (a1, a2) and max and second max (b1, b2), counted with multiplicity; a1 and b1 propagate
// NaN. Two new words x, y at a time: l = min(x, y), h = max(x, y), then the second smallest
// of the merged sorted lists (a1, a2) and (l, h) is min(max(a1, l), a2, h).
template <typename In, int V, bool SPIKES>
__device__ __forceinline__ void lane_stats_v5(const u32* w, u32& s1, u32& s2) {
  typedef PX<In> X;
  u32 a1 = X::mnn(w[0], w[1]), b1 = X::mxn(w[0], w[1]);
  u32 a2 = b1, b2 = a1;
#pragma unroll
  for (int i = 2; i < V / 2; i += 2) {
    const u32 l = X::mnn(w[i], w[i + 1]), h = X::mxn(w[i], w[i + 1]);
    if (SPIKES) {
      a2 = X::mn(X::mn(a2, h), X::mx(a1, l));
      b2 = X::mx(X::mx(b2, l), X::mn(b1, h));
    }
    a1 = X::mnn(a1, l);
    b1 = X::mxn(b1, h);
  }
  // (min, -max) of the two halves in one packed op: A = (a1.lo, -b1.lo), B = (a1.hi, -b1.hi)
  const u32 nb1 = b1 ^ 0x80008000u;
  const u32 A = __byte_perm(a1, nb1, 0x5410), B = __byte_perm(a1, nb1, 0x7632);
  s1 = X::mnn(A, B);
  if (SPIKES) {  // (second min, -second max): min(max(a1.lo, a1.hi), a2.lo, a2.hi), likewise
    const u32 nb2 = b2 ^ 0x80008000u;
    s2 = X::mn(X::mx(A, B), X::mn(__byte_perm(a2, nb2, 0x5410), __byte_perm(a2, nb2, 0x7632)));
  } else {
    s2 = s1;
  }
}

// First slots equal to lo and to hi (-0 == +0) of a full chunk: one packed compare per word and
// target; word i sets bits i and 16 + i (i < 16) of its target's word, i.e. even slots in the
// low half and odd slots in the high half. V or more if none.
// Leading zeros of x, 0xFFFFFFFF for x == 0 (one FLO, where __clz adds a subtraction).
__device__ __forceinline__ u32 clz_or_max(u32 x) {
  u32 r;
  asm("bfind.shiftamt.u32 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}
// The first slot flagged in acc (V words, see first_eq2_v5); >= V if none.
template <int V>
__device__ __forceinline__ u32 first_slot_v5(const u32* acc) {
  u32 idx = 0xFFFFFFFFu;
#pragma unroll
  for (int j = (V + 31) / 32 - 1; j >= 0; --j) {
    const u32 b = __brev(acc[j]);
    // even slots: 2 * ctz(low half); odd: 2 * ctz(high half) + 1. Without an even flag,
    // clz(b) >= 16 and the odd one wins; without either, both are >= 0xFFFFFFFE.
    const u32 f = min(2u * clz_or_max(b), 2u * clz_or_max(b << 16) + 1u);
    if ((V + 31) / 32 == 1) idx = f;
    else if (f < 32u) idx = 32u * j + f;
  }
  return idx;
}
template <typename In, int V>
__device__ __forceinline__ void first_eq2_v5(const u32* w, float lo, float hi, int& fl, int& fh) {
  typedef Pair<In> P;
  const typename P::T2 tl = P::splat(lo), th = P::splat(hi);
  u32 al[(V + 31) / 32] = {}, ah[(V + 31) / 32] = {};
#pragma unroll
  for (int i = 0; i < V / 2; ++i) {
    al[i / 16] |= __heq2_mask(P::of(w[i]), tl) & (0x10001u << (i % 16));
    ah[i / 16] |= __heq2_mask(P::of(w[i]), th) & (0x10001u << (i % 16));
  }
  fl = (int)first_slot_v5<V>(al);
  fh = (int)first_slot_v5<V>(ah);
}

// First slot equal to t (-0 == +0) among the 2 * WP values of the words x[WP] (WP <= 16): word
// k sets bits 2k (even slot) and 17 + 2k (odd slot) of acc[k / 8]; acc + (acc >> 16) then
// holds the slots in order in its low 16 bits. 0xFFFFFFFF if none.
template <typename In, int WP>
__device__ __forceinline__ u32 part_first(const u32* x, float t) {
  typedef Pair<In> P;
  const typename P::T2 tt = P::splat(t);
  u32 acc[(WP + 7) / 8] = {};
#pragma unroll
  for (int k = 0; k < WP; ++k)
    acc[k / 8] |= __heq2_mask(P::of(x[k]), tt) & ((1u << (2 * (k % 8))) | (1u << (17 + 2 * (k % 8))));
  u32 f = acc[0] + (acc[0] >> 16);  // disjoint bits: no carries
  if constexpr (WP > 8) f = __byte_perm(f, acc[1] + (acc[1] >> 16), 0x5410);
  return clz_or_max(__brev(f));
}

// lo_idx / hi_idx: the first slots of the group (G = V << LG values) equal to lo / hi. In a
// full group (gfull) lane j of the group searches words j * WP .. j * WP + WP - 1 of the chunks
// of lanes ll and lh (the lowest lanes whose chunk min / max is lo / hi), staged in shared
// memory; in a partial group each lane searches its own chunk. Either way the group's answer
// is the min over its lanes of the lanes' keys (slot in the group, 0xFFFF for none), both
// targets in one packed u16x2 reduction.
__device__ __forceinline__ u32 stage_col(u32 t, int r) { return t ^ (u32)(r & 3); }

template <typename In, int V, int LG>
__device__ __forceinline__ void first_idx_shared(const u32* w, int nv, const Pos& P, bool gfull, int ll, int lh,
                                                 float lo, float hi, int& lo_idx, int& hi_idx) {
  constexpr int WP = (V / 2) >> LG;  // words per lane
  static_assert(WP >= 1 && WP <= 16 && (WP & (WP - 1)) == 0, "part size");
  // A thread's 16-byte row r at [r][tid ^ (r & 3)]: the group's lanes read rows 0..3 of one
  // column at once, which the XOR spreads over four bank quads (unswizzled: a 4-way conflict).
  __shared__ uint4 stage[V / 8][kBlock];
  __syncwarp();  // the previous chunk's reads are done (U > 1)
#pragma unroll
  for (int r = 0; r < V / 8; ++r) stage[r][stage_col(threadIdx.x, r)] = make_uint4(w[4 * r], w[4 * r + 1], w[4 * r + 2], w[4 * r + 3]);
  __syncwarp();
  u32 kl, kh;
  if (gfull) {
    const u32 wb = threadIdx.x & ~31u;
    u32 xl[WP], xh[WP];
    if constexpr (WP % 4 == 0) {
#pragma unroll
      for (int r = 0; r < WP / 4; ++r) {
        const int row = P.lane * (WP / 4) + r;
        const uint4 u = stage[row][stage_col(wb | ll, row)], v = stage[row][stage_col(wb | lh, row)];
        xl[4 * r] = u.x; xl[4 * r + 1] = u.y; xl[4 * r + 2] = u.z; xl[4 * r + 3] = u.w;
        xh[4 * r] = v.x; xh[4 * r + 1] = v.y; xh[4 * r + 2] = v.z; xh[4 * r + 3] = v.w;
      }
    } else {
      const u32* st = reinterpret_cast<const u32*>(&stage[0][0]);
#pragma unroll
      for (int k = 0; k < WP; ++k) {
        const int q = P.lane * WP + k;
        xl[k] = st[((q / 4) * kBlock + stage_col(wb | ll, q / 4)) * 4 + q % 4];
        xh[k] = st[((q / 4) * kBlock + stage_col(wb | lh, q / 4)) * 4 + q % 4];
      }
    }
    const u32 part = (u32)P.lane * (2 * WP);  // first slot of the part; f < 2 * WP or all ones
    kl = part_first<In, WP>(xl, lo) | part;
    kh = part_first<In, WP>(xh, hi) | part;
  } else {
    const int fl = first_eq<In, V, false>(w, nv, lo), fh = first_eq<In, V, false>(w, nv, hi);
    kl = fl < V ? P.lane * V + fl : 0xFFFFu;
    kh = fh < V ? P.lane * V + fh : 0xFFFFu;
  }
  u32 k2 = __byte_perm(kl, kh, 0x5410);
#pragma unroll
  for (int off = (1 << LG) / 2; off > 0; off >>= 1) k2 = __vminu2(k2, __shfl_xor_sync(0xFFFFFFFFu, k2, off));
  lo_idx = (gfull ? (ll - P.first) * V : 0) + (int)(k2 & 0xFFFFu);
  hi_idx = (gfull ? (lh - P.first) * V : 0) + (int)(k2 >> 16);
}

// x << n, 0 for n >= 32 (PTX clamps shift amounts; in C++ they would be undefined).
__device__ __forceinline__ u32 shl_clamp(u32 x, u32 n) {
  u32 r;
  asm("shl.b32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(n));
  return r;
}

// Clear the W-bit fields of slots jl and jh (no-op for slots >= V) in the plane words
// pw[V * W / 32]: field j of word c starts at bit W * j - 32 * c (negative: huge, cleared 0).
template <int W, int V>
__device__ __forceinline__ void clear_slots(u32* pw, u32 jl, u32 jh) {
  constexpr int NW = (V * W + 31) / 32;
  constexpr u32 M = (1u << W) - 1u;
  const u32 bl = jl * W, bh = jh * W;
#pragma unroll
  for (int c = 0; c < NW; ++c) pw[c] &= ~(shl_clamp(M, bl - 32u * c) | shl_clamp(M, bh - 32u * c));
}

// Codes (low byte of s[k]) -> plane words, spike slots jl, jh cleared, stored (zeros if bad).
template <int BITS, int V>
__device__ __forceinline__ void store_codes_v5(u8* rec, int base, const u32* s, u32 jl, u32 jh, bool bad,
                                               int o4, int o2, int o1) {
  if constexpr (BITS == 8) {
    u32 w[V / 4];
#pragma unroll
    for (int c = 0; c < V / 4; ++c) w[c] = pack4(s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]);
    clear_slots<8, V>(w, jl, jh);
#pragma unroll
    for (int c = 0; c < V / 4; ++c) w[c] = bad ? 0u : w[c];
    store_bytes<V>(rec + ((u32)o4 + (u32)base), w);
  } else {
    u32 E[V / 8], O[V / 8];
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      const u32* q = s + 8 * c;
      E[c] = pack4(q[0], q[2], q[4], q[6]);
      O[c] = pack4(q[1], q[3], q[5], q[7]);
    }
    if constexpr ((BITS & 4) != 0) {
      u32 w[V / 8];
#pragma unroll
      for (int c = 0; c < V / 8; ++c) w[c] = plane_pack<4>(E[c], O[c], BITS - 4);
      clear_slots<4, V>(w, jl, jh);
#pragma unroll
      for (int c = 0; c < V / 8; ++c) w[c] = bad ? 0u : w[c];
      store_bytes<V / 2>(rec + ((u32)o4 + (u32)base / 2), w);
    }
    if constexpr ((BITS & 2) != 0) {
      u32 w[(V + 15) / 16] = {};
#pragma unroll
      for (int c = 0; c < V / 8; ++c) set_chunk_bits<2>(w, c, plane_pack<2>(E[c], O[c], BITS & 1));
      clear_slots<2, V>(w, jl, jh);
#pragma unroll
      for (int c = 0; c < (V + 15) / 16; ++c) w[c] = bad ? 0u : w[c];
      store_bytes<V / 4>(rec + ((u32)o2 + (u32)base / 4), w);
    }
    if constexpr ((BITS & 1) != 0) {
      u32 w[(V + 31) / 32] = {};
#pragma unroll
      for (int c = 0; c < V / 8; ++c) set_chunk_bits<1>(w, c, plane_pack<1>(E[c], O[c], 0));
      clear_slots<1, V>(w, jl, jh);
#pragma unroll
      for (int c = 0; c < (V + 31) / 32; ++c) w[c] = bad ? 0u : w[c];
      store_bytes<V / 8>(rec + ((u32)o1 + (u32)base / 8), w);
    }
  }
}

// Group-wide packed min over the L lanes (NaN-propagating if PROP).
template <typename In, bool PROP>
__device__ __forceinline__ u32 group_min2(u32 v, int L) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < L) {
      const u32 b = __shfl_xor_sync(0xFFFFFFFFu, v, off);
      v = PROP ? PX<In>::mnn(v, b) : PX<In>::mn(v, b);
    }
  }
  return v;
}

// Field k of a group's metadata (0 scale, 1 minimum, 2 lo_value, 3 hi_value) and, for k < 2,
// index k (lo_index, hi_index); NaN values and index 0 for bad groups. The 16-bit arrays are
// consecutive, 2n bytes apart, and so are the two index arrays, n apart (format.py; checked
// by cuda._layout_fields).
template <typename W, bool SPIKES>
__device__ __forceinline__ void store_meta_v5(u8* out, u32 g, int k, const EncArgs& a, bool bad, u16 sc_w,
                                              u16 mn_w, float lo, float hi, int lo_idx, int hi_idx) {
  u32 pair = sc_w | (u32)mn_w << 16;
  if (SPIKES && k >= 2) pair = Wire<W>::rn(lo) | (u32)Wire<W>::rn(hi) << 16;
  const u16 v = (u16)(pair >> (16 * (k & 1)));
  st16(out + ((u32)a.o_scale + (u32)k * (u32)(a.o_min - a.o_scale) + 2 * g), bad ? Wire<W>::kNaN : v);
  if (SPIKES && k < 2)
    out[(u32)a.o_loi + (u32)k * (u32)(a.o_hii - a.o_loi) + g] = bad ? 0 : (u8)(k == 0 ? lo_idx : hi_idx);
}

// LG: log2 of the lanes per group when known at compile time (a.log2L == LG), else -1.
// DENSE: every chunk and group of the row is full (H a multiple of the group size).
template <typename In, int BITS, bool SPIKES, bool SR, int V, int LG, bool DENSE>
__device__ __forceinline__ void encode_chunk_v5(const u32* w, u32 item, u8* __restrict__ rec, const EncArgs& a) {
  typedef typename Val<In>::W W;
  typedef Pair<In> PR;
  constexpr int QMAX = (1 << BITS) - 1;
  const int log2L = LG >= 0 ? LG : a.log2L;
  const Pos P = locate<V>(item, a.total, a.ipt, a.div_mul, a.div_shift, log2L);
  const int L = 1 << log2L, G = L * V;
  u8* out = rec + (u64)P.t * (u32)a.rec_bytes;
  const int nv = DENSE ? V : min(max(a.H - P.base, 0), V);  // real values in the chunk
  const bool full = nv == V;

  // lane statistics as packed (min, -max) and (second min, -second max)
  u32 s1, s2;
  if (full) {
    lane_stats_v5<In, V, SPIKES>(w, s1, s2);
  } else {
    float mn1, mx1, mn2, mx2;
    chunk_stats<In, V, SPIKES, false>(w, nv, mn1, mx1, mn2, mx2);
    s1 = PR::bits(PR::pack(mn1, -mx1));  // exact: 16-bit values and infinities
    s2 = PR::bits(PR::pack(mn2, -mx2));
  }
  const u32 g1 = group_min2<In, true>(s1, L);
  const float lo_raw = PX<In>::lo(g1), nhi_raw = PX<In>::hi(g1);
  // + 0 makes a zero +0 (-0 + +0 = +0 when rounding to nearest), as the reference's "+ 0.0"
  const float lo = __fadd_rn(lo_raw, 0.0f), hi = __fadd_rn(-nhi_raw, 0.0f);
  const int count = a.H - P.g * G;  // real values in the group (>= G: a full group)
  const bool gfull = DENSE || count >= G;
  bool bad = !(finite(lo) && finite(hi));  // a NaN or Inf among the group's values

  float rest_lo = lo, rest_hi = hi;
  int lo_idx = 0, hi_idx = 0;
  if (SPIKES) {
    // The first index of lo lies in the lowest lane whose chunk min equals lo.
    // (No such lane only with NaN, a bad group: then lane 31, a valid lane to read.)
    const u32 bl = (__ballot_sync(~0u, PX<In>::lo(s1) == lo_raw) & P.mask) | 0x80000000u;
    const u32 bh = (__ballot_sync(~0u, PX<In>::hi(s1) == nhi_raw) & P.mask) | 0x80000000u;
    const int ll = (int)clz_or_max(__brev(bl)), lh = (int)clz_or_max(__brev(bh));
    if constexpr (LG >= 0) {
      // The group's lanes search the spike lane's chunk together, each one part of it, read
      // back from shared memory; then the group's min over the lanes' (index) keys.
      first_idx_shared<In, V, LG>(w, nv, P, gfull, ll, lh, lo, hi, lo_idx, hi_idx);
    } else {
      int fl, fh;
      if (full) {
        first_eq2_v5<In, V>(w, lo, hi, fl, fh);
      } else {
        fl = first_eq<In, V, false>(w, nv, lo);
        fh = first_eq<In, V, false>(w, nv, hi);
      }
      lo_idx = (ll - P.first) * V + __shfl_sync(~0u, fl, ll);
      hi_idx = (lh - P.first) * V + __shfl_sync(~0u, fh, lh);
    }
    // Rest range: every rest value lies in [lo, hi], so min(rest) is the group min without the
    // lo slot, i.e. the spike lane's second smallest value (likewise for the max).
    const int wl = threadIdx.x & 31;
    const u32 r = __byte_perm(wl == ll ? s2 : s1, wl == lh ? s2 : s1, 0x7610);
    const u32 g2 = group_min2<In, false>(r, L);
    if (gfull || count > (lo_idx == hi_idx ? 1 : 2)) {
      rest_lo = __fadd_rn(PX<In>::lo(g2), 0.0f);
      rest_hi = __fadd_rn(-PX<In>::hi(g2), 0.0f);
    } else {
      rest_hi = lo;  // nothing left besides the spikes: the range collapses onto the min
    }
  }

  const u16 mn_w = Wire<W>::rd(rest_lo);
  const float mnf = Wire<W>::f(mn_w);
  const u16 sc_w = Wire<W>::ru(__fdiv_rn(__fsub_rn(rest_hi, mnf), (float)QMAX));
  const float scf = Wire<W>::f(sc_w);
  // (v4 also tests mnf: here it equals rest_lo, a 16-bit value of the group in [lo, hi], as
  // the wire float is the input's type, so it is finite whenever lo and hi are.)
  bad = bad || !finite(scf);

  // t = (x - minimum) / scale, exactly rounded (Markstein when the scale allows).
  float q[V];
  if (div_fast_ok(scf)) {
    const float rc = __frcp_rn(scf);
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = div_rn_fast(__fsub_rn(value<In>(w, k), mnf), scf, rc);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = scf == 0.0f ? 0.0f : __fdiv_rn(__fsub_rn(value<In>(w, k), mnf), scf);
  }
  constexpr float kMagic = 12582912.0f;  // see encode_chunk
  u32 s[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (SR) {
      const u32 h = lowbias32((a.counter0 + P.t * (u32)a.padded + (u32)(P.base + k)) ^ a.seed_key);
      const float u = __fmul_rn(__uint2float_rn(h >> 8), 0x1p-24f);
      s[k] = __float_as_uint(__fadd_rd(fminf(__fadd_rn(q[k], u), (float)QMAX), kMagic));
    } else {
      s[k] = __float_as_uint(__fadd_rn(q[k], kMagic));
    }
  }
  if (!P.live) return;
  if (!full) {  // code 0 at padding: clear slots nv..V-1 (rare: the last chunk of a row)
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k >= nv) s[k] = 0u;
  }
  // code 0 at the spike slots (out of range for the other lanes) and in bad groups
  u32 jl = ~0u, jh = ~0u;
  if (SPIKES) {
    jl = (u32)(lo_idx - P.lane * V);
    jh = (u32)(hi_idx - P.lane * V);
  }
  store_codes_v5<BITS, V>(out, P.base, s, jl, jh, bad, a.o4, a.o2, a.o1);

  // Metadata: the group's lanes share the stores (every lane holds the group's values); lane
  // k of the group stores field k (scale, minimum, lo_value, hi_value) and index k (lo, hi).
  constexpr int NF = SPIKES ? 4 : 2;
  if (L >= NF) {
    if (P.lane < NF) store_meta_v5<W, SPIKES>(out, P.g, P.lane, a, bad, sc_w, mn_w, lo, hi, lo_idx, hi_idx);
  } else {  // groups of one or two chunks
    for (int k = P.lane; k < NF; k += L) store_meta_v5<W, SPIKES>(out, P.g, k, a, bad, sc_w, mn_w, lo, hi, lo_idx, hi_idx);
  }
  if (P.g == 0 && P.lane == 0) zero_gaps(out, a.gap);
}
#endif  // MFC_ENC_V4

// One chunk of an integer-width encode: group statistics over the group's lanes, metadata,
// codes. Every lane of the warp must call it (shuffles); lanes past the end store nothing.
// DG: 0 (any row), or the group size of a dense row (see encode_int).
template <typename In, int BITS, bool SPIKES, bool SR, int V, int DG = 0>
__device__ __forceinline__ void encode_chunk(const u32* w, u32 item, u8* __restrict__ rec, const EncArgs& a) {
#ifndef MFC_ENC_V4
  if constexpr (UsePairs<In>::value) {  // groups of 128 values get their own copy (L constant)
    constexpr int LG = V == 16 ? 3 : V == 32 ? 2 : V == 64 ? 1 : -1;
    if constexpr (DG == 128 && LG >= 0) encode_chunk_v5<In, BITS, SPIKES, SR, V, LG, true>(w, item, rec, a);
    else if (LG >= 0 && a.log2L == LG) encode_chunk_v5<In, BITS, SPIKES, SR, V, LG, false>(w, item, rec, a);
    else encode_chunk_v5<In, BITS, SPIKES, SR, V, -1, false>(w, item, rec, a);
    return;
  }
#endif
  typedef typename Val<In>::W W;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr bool PAIRS = UsePairs<In>::value;
  const Pos P = locate<V>(item, a.total, a.ipt, a.div_mul, a.div_shift, a.log2L);
  const int L = 1 << a.log2L, G = L * V;
  u8* out = rec + (u64)P.t * (u32)a.rec_bytes;
  const int nv = min(max(a.H - P.base, 0), V);  // real values in the chunk
  const bool full = nv == V;

  float mn1, mx1, mn2, mx2;
  if (!full) chunk_stats<In, V, SPIKES, false>(w, nv, mn1, mx1, mn2, mx2);
  else if constexpr (PAIRS) chunk_stats_pairs<In, V, SPIKES>(w, mn1, mx1, mn2, mx2);
  else chunk_stats<In, V, SPIKES, true>(w, nv, mn1, mx1, mn2, mx2);
  float lo, hi;
  group_min_max<In>(mn1, mx1, L, true, lo, hi);
  lo = plus_zero(lo);
  hi = plus_zero(hi);
  bool bad = !(finite(lo) && finite(hi));  // a NaN or Inf among the group's values

  float rest_lo = lo, rest_hi = hi;
  int lo_idx = 0, hi_idx = 0;
  if (SPIKES) {
    // The first index of lo lies in the lowest lane whose chunk min equals lo.
    const u32 bl = __ballot_sync(~0u, mn1 == lo) & P.mask, bh = __ballot_sync(~0u, mx1 == hi) & P.mask;
    const int ll = bl ? __ffs(bl) - 1 : P.first, lh = bh ? __ffs(bh) - 1 : P.first;
    int fl, fh;
    if (!full) {
      fl = first_eq<In, V, false>(w, nv, lo);
      fh = first_eq<In, V, false>(w, nv, hi);
    } else if constexpr (PAIRS) {
      fl = first_eq_pairs<In, V>(w, lo);
      fh = first_eq_pairs<In, V>(w, hi);
    } else {
      fl = first_eq<In, V, true>(w, nv, lo);
      fh = first_eq<In, V, true>(w, nv, hi);
    }
    lo_idx = (ll - P.first) * V + __shfl_sync(~0u, fl, ll);
    hi_idx = (lh - P.first) * V + __shfl_sync(~0u, fh, lh);
    // Rest range: every rest value lies in [lo, hi], so min(rest) is the group min without the
    // lo slot, i.e. the spike lane's second smallest value (likewise for the max).
    const int wl = threadIdx.x & 31;
    float rmn, rmx;
    group_min_max<In>(wl == ll ? mn2 : mn1, wl == lh ? mx2 : mx1, L, false, rmn, rmx);
    const int count = min(G, a.H - P.g * G);  // real values in the group
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

  // t = (x - minimum) / scale, exactly rounded (Markstein when the scale allows).
  float q[V];
  if (div_fast_ok(scf)) {
    const float rc = __frcp_rn(scf);
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = div_rn_fast(__fsub_rn(value<In>(w, k), mnf), scf, rc);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) q[k] = scf == 0.0f ? 0.0f : __fdiv_rn(__fsub_rn(value<In>(w, k), mnf), scf);
  }
  // t + 1.5 * 2^23 leaves rint(t) (round-half-even; floor with a round-down add) in the low
  // mantissa bits for 0 <= t < 2^22: the rounding and the integer conversion in one add.
  constexpr float kMagic = 12582912.0f;
  u32 s[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (SR) {
      const u32 h = lowbias32((a.counter0 + P.t * (u32)a.padded + (u32)(P.base + k)) ^ a.seed_key);
      const float u = __fmul_rn(__uint2float_rn(h >> 8), 0x1p-24f);
      // clamp(floor(t + u), 0, qmax) == floor(min(t + u, qmax)) since qmax is an integer
      s[k] = __float_as_uint(__fadd_rd(fminf(__fadd_rn(q[k], u), (float)QMAX), kMagic));
    } else {  // rest values have t <= qmax + 2^-17 (scale is rounded up): no clamp needed
      s[k] = __float_as_uint(__fadd_rn(q[k], kMagic));
    }
  }

  // Code 0 at padding, spike slots and in bad groups.
  u64 z = full ? 0ull : ~0ull << nv;
  if (SPIKES) {
    const u32 jl = (u32)(lo_idx - P.lane * V), jh = (u32)(hi_idx - P.lane * V);
    if (jl < (u32)V) z |= 1ull << jl;
    if (jh < (u32)V) z |= 1ull << jh;
  }
  if (bad) z = ~0ull;
  if (!P.live) return;
  store_codes<BITS, V>(out, P.base, s, z, a.o4, a.o2, a.o1);

  if (P.lane == 0) {
    const u16 nan = Wire<W>::kNaN;
    const u32 g = P.g;  // unsigned offsets: cheaper address arithmetic
    st16(out + ((u32)a.o_scale + 2 * g), bad ? nan : sc_w);
    st16(out + ((u32)a.o_min + 2 * g), bad ? nan : mn_w);
    if (SPIKES) {
      st16(out + ((u32)a.o_lov + 2 * g), bad ? nan : Wire<W>::rn(lo));
      st16(out + ((u32)a.o_hiv + 2 * g), bad ? nan : Wire<W>::rn(hi));
      out[(u32)a.o_loi + g] = bad ? 0 : (u8)lo_idx;
      out[(u32)a.o_hii + g] = bad ? 0 : (u8)hi_idx;
    }
  }
  if (P.g == 0 && P.lane == 0) zero_gaps(out, a.gap);
}

// Integer widths (2..8 bits), spikes on/off, nearest or stochastic rounding. A thread encodes
// U chunks of V values, kBlock items apart (each load instruction stays coalesced); ``block``
// numbers the block's items (blockIdx.x, or its place in a task of p2p_exchange).
// DG = 128: dense rows (16-byte aligned, H a multiple of 128) in groups of 128, the usual case.
// That copy holds no code for partial chunks, unaligned loads or other group sizes, which in
// the general copy (DG = 0) cost ~40 instructions per chunk on the common path
// (docs/kernel-notes.md, "v6: dense rows").
template <typename In, int BITS, bool SPIKES, bool SR, int V, int U, int DG>
__device__ __forceinline__ void encode_int_items(const In* __restrict__ x, u8* __restrict__ rec,
                                                 const EncArgs& a, const u32 block) {
  static_assert(DG == 0 || DG == 128, "DG: 0 or 128");
#ifdef MFC_NO_DENSE  // A/B: the dense-row copy compiled as the general one
  constexpr int D = 0;
#else
  constexpr int D = DG;
#endif
  const u32 item0 = block * (kBlock * U) + threadIdx.x;
  u32 w[U][raw_words<In, V>()];
  load_items<In, V, U, D != 0>(x, item0, a, w);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const u32 item = item0 + u * kBlock;
    if ((item & ~31u) >= a.total) return;  // warp-uniform: the shuffles need every lane
    encode_chunk<In, BITS, SPIKES, SR, V, D>(w[u], item, rec, a);
  }
}

template <typename In, int BITS, bool SPIKES, bool SR, int V, int U, int DG>
__global__ void __launch_bounds__(kBlock) encode_int(const In* __restrict__ x, u8* __restrict__ rec,
                                                     const EncArgs a) {
  encode_int_items<In, BITS, SPIKES, SR, V, U, DG>(x, rec, a, blockIdx.x);
}

// fp8 e4m3: scale = round_up(amax / 448), code = e4m3(clamp(x / scale, +-448)).
template <typename In, int V>
__device__ __forceinline__ void encode_fp8_chunk(const u32* w, u32 item, u8* __restrict__ rec, const EncArgs& a) {
  typedef typename Val<In>::W W;
  const Pos P = locate<V>(item, a.total, a.ipt, a.div_mul, a.div_shift, a.log2L);
  const int L = 1 << a.log2L;
  u8* out = rec + (size_t)P.t * a.rec_bytes;
  const int nv = min(max(a.H - P.base, 0), V);

  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (k < nv) amax = max_nan(amax, fabsf(value<In>(w, k)));
  amax = group_reduce(amax, L, MaxNaN());
  const u16 sc_w = Wire<W>::ru(__fdiv_rn(amax, 448.0f));
  const float scf = Wire<W>::f(sc_w);
  const bool bad = !finite(amax) || !finite(scf);

  float y[V];
  if (div_fast_ok(scf)) {
    const float rc = __frcp_rn(scf);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = copysignf(div_rn_fast(value<In>(w, k), scf, rc), value<In>(w, k));
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = scf == 0.0f ? 0.0f : __fdiv_rn(value<In>(w, k), scf);
  }
  u32 c[V / 4];
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    float lo = fminf(fmaxf(y[k], -448.0f), 448.0f), hi = fminf(fmaxf(y[k + 1], -448.0f), 448.0f);
    if (bad || k >= nv) lo = 0.0f;
    if (bad || k + 1 >= nv) hi = 0.0f;
    const u32 pair = __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
    if (k % 4 == 0) c[k / 4] = pair;
    else c[k / 4] |= pair << 16;
  }
  if (!P.live) return;
  store_bytes<V>(out + a.o4 + P.base, c);
  if (P.lane == 0) st16(out + a.o_scale + 2 * P.g, bad ? Wire<W>::kNaN : sc_w);
  if (P.g == 0 && P.lane == 0) zero_gaps(out, a.gap);
}

template <typename In, int V, int U>
__device__ __forceinline__ void encode_fp8_items(const In* __restrict__ x, u8* __restrict__ rec,
                                                 const EncArgs& a, const u32 block) {
  const u32 item0 = block * (kBlock * U) + threadIdx.x;
  u32 w[U][raw_words<In, V>()];
  load_items<In, V, U, false>(x, item0, a, w);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const u32 item = item0 + u * kBlock;
    if ((item & ~31u) >= a.total) return;
    encode_fp8_chunk<In, V>(w[u], item, rec, a);
  }
}

template <typename In, int V, int U>
__global__ void __launch_bounds__(kBlock) encode_fp8(const In* __restrict__ x, u8* __restrict__ rec,
                                                     const EncArgs a) {
  encode_fp8_items<In, V, U>(x, rec, a, blockIdx.x);
}

// The passthrough ("bf16"): each value as the wire float (bf16; fp16 for fp16 tokens), rounded
// to nearest even, NaN as the canonical NaN, the record padded with zeros to 16 bytes
// (reference.encode's passthrough). An item is 8 values of a row, 16 bytes of its record:
// a.ipt items per row (ceil(H / 8)), a.vec for 16-byte aligned rows with H a multiple of 8.
template <typename In>
__device__ __forceinline__ void encode_cast_items(const In* __restrict__ x, u8* __restrict__ rec,
                                                  const EncArgs& a, const u32 block) {
  typedef typename Val<In>::W W;
  const u32 item = block * kBlock + threadIdx.x;
  if (item >= a.total) return;
  const u32 t = item / a.ipt, c = item - t * a.ipt;
  const int base = (int)c * 8, n = min(8, a.H - base);
  const In* row = x + (size_t)t * a.H + base;
  float v[8];
  if (a.vec) {
    Val<In>::get8(row, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = k < n ? Val<In>::get(row + k) : 0.0f;
  }
  Val<W>::put8(reinterpret_cast<W*>(rec + (size_t)t * a.rec_bytes + 16 * c), v);  // (0.0f pads)
}

template <typename In>
__global__ void __launch_bounds__(kBlock) encode_cast(const In* __restrict__ x, u8* __restrict__ rec,
                                                      const EncArgs a) {
  encode_cast_items<In>(x, rec, a, blockIdx.x);
}

}  // namespace mfc

#ifdef MFC_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): compile every variant the loader may request (cuda.ENCODE_SHAPES).
namespace mfc {
#ifndef MFC_INSTANTIATE_DG
#define MFC_INSTANTIATE_DG 0
#endif
#define MFC_ENC_INT(T, B, S, V, U) \
  (const void*)&encode_int<T, B, S, false, V, U, MFC_INSTANTIATE_DG>, \
  (const void*)&encode_int<T, B, S, true, V, U, MFC_INSTANTIATE_DG>
#define MFC_ENC_BITS(T, S, V, U) \
  MFC_ENC_INT(T, 2, S, V, U), MFC_ENC_INT(T, 3, S, V, U), MFC_ENC_INT(T, 4, S, V, U), \
  MFC_ENC_INT(T, 5, S, V, U), MFC_ENC_INT(T, 6, S, V, U), MFC_ENC_INT(T, 7, S, V, U), \
  MFC_ENC_INT(T, 8, S, V, U)
#define MFC_ENC_TYPE(T, V, U) \
  MFC_ENC_BITS(T, false, V, U), MFC_ENC_BITS(T, true, V, U), (const void*)&encode_fp8<T, V, U>
#define MFC_ENC(V, U) MFC_ENC_TYPE(float, V, U), MFC_ENC_TYPE(__nv_bfloat16, V, U), MFC_ENC_TYPE(__half, V, U)
extern const void* const all_encode_kernels[] = {MFC_ENC_SHAPES};
extern const void* const all_cast_encode_kernels[] = {
  (const void*)&encode_cast<float>, (const void*)&encode_cast<__nv_bfloat16>, (const void*)&encode_cast<__half>};
}  // namespace mfc
#endif
#endif  // MFC_CODEC_ENCODE_CU
