// Shared pieces of the codec kernels (codec_encode.cu, codec_decode.cu).
//
// The arithmetic copies moe_flashcomm/codec/reference.py bit for bit, so this code must be
// compiled with --fmad=false --ftz=false (the loader in moe_flashcomm/codec/cuda.py does).
//
// Work split: a thread owns V consecutive values (a "chunk", V = 8, 16 or 32) of one group;
// the L = G / V threads of a group are consecutive lanes of one warp and combine their
// statistics with shuffles over the group's lane mask.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace mfc {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int kBlock = 256;
constexpr float kFltMax = 3.40282346638528859812e+38f;
__device__ __forceinline__ float inf() { return __int_as_float(0x7F800000); }

// ---- wire float: metadata and spikes travel in bf16 (fp16 for fp16 tensors) ----------------
template <typename W> struct Wire;
template <> struct Wire<__nv_bfloat16> {
  static constexpr u16 kNaN = 0x7FC0;  // torch's canonical bf16 NaN
  static __device__ __forceinline__ u16 rn(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ u16 rd(float v) { return __bfloat16_as_ushort(__float2bfloat16_rd(v)); }
  static __device__ __forceinline__ u16 ru(float v) { return __bfloat16_as_ushort(__float2bfloat16_ru(v)); }
  static __device__ __forceinline__ float f(u16 b) { return __uint_as_float((u32)b << 16); }
};
template <> struct Wire<__half> {
  static constexpr u16 kNaN = 0x7E00;  // torch's canonical fp16 NaN
  static __device__ __forceinline__ u16 rn(float v) { return __half_as_ushort(__float2half_rn(v)); }
  static __device__ __forceinline__ u16 rd(float v) { return __half_as_ushort(__float2half_rd(v)); }
  static __device__ __forceinline__ u16 ru(float v) { return __half_as_ushort(__float2half_ru(v)); }
  static __device__ __forceinline__ float f(u16 b) { return __half2float(__ushort_as_half(b)); }
};

// ---- token dtypes: scalar and 8-wide (16-byte aligned) access as fp32 ----------------------
// Stores (put, put8, pair) write every NaN as the dtype's canonical NaN kNaN (the standard quiet
// NaN, reference.CANONICAL_NAN): CUDA's arithmetic and conversions make 0x7FFF... patterns.

// Two 16-bit values packed from fp32 a (low half) and b (high half), NaNs made canonical.
__device__ __forceinline__ u32 canon_pair(u32 packed, float a, float b, u16 nan) {
  if (a != a) packed = (packed & 0xFFFF0000u) | nan;
  if (b != b) packed = (packed & 0x0000FFFFu) | ((u32)nan << 16);
  return packed;
}
template <typename T> struct Val;
template <> struct Val<float> {
  typedef __nv_bfloat16 W;
  static constexpr float kMax = kFltMax;
  static constexpr u32 kNaN = 0x7FC00000u;
  static __device__ __forceinline__ float canon(float v) { return v != v ? __uint_as_float(kNaN) : v; }
  static __device__ __forceinline__ float get(const float* p) { return *p; }
  static __device__ __forceinline__ void get8(const float* p, float* v) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void put(float* p, float v) { *p = canon(v); }
  static __device__ __forceinline__ void put8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(canon(v[0]), canon(v[1]), canon(v[2]), canon(v[3]));
    reinterpret_cast<float4*>(p)[1] = make_float4(canon(v[4]), canon(v[5]), canon(v[6]), canon(v[7]));
  }
};
template <> struct Val<__nv_bfloat16> {
  typedef __nv_bfloat16 W;
  static constexpr float kMax = 3.38953138925153547590e+38f;  // 0x7F7F
  static constexpr u16 kNaN = Wire<__nv_bfloat16>::kNaN;
  static __device__ __forceinline__ float get(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void get8(const __nv_bfloat16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  static __device__ __forceinline__ void unpack(u32 w, float& a, float& b) {
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xFFFF0000u);
  }
  static __device__ __forceinline__ void put(__nv_bfloat16* p, float v) {
    *reinterpret_cast<u16*>(p) = v != v ? kNaN : __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  static __device__ __forceinline__ u32 pair_raw(float a, float b) {  // NaN bits as converted
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const u32*>(&h);
  }
  static __device__ __forceinline__ u32 pair(float a, float b) {
    return canon_pair(pair_raw(a, b), a, b, kNaN);
  }
  static __device__ __forceinline__ void put8(__nv_bfloat16* p, const float* v) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
};
template <> struct Val<__half> {
  typedef __half W;
  static constexpr float kMax = 65504.0f;
  static constexpr u16 kNaN = Wire<__half>::kNaN;
  static __device__ __forceinline__ float get(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void get8(const __half* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void unpack(u32 w, float& a, float& b) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    a = f.x;
    b = f.y;
  }
  static __device__ __forceinline__ void put(__half* p, float v) {
    *reinterpret_cast<u16*>(p) = v != v ? kNaN : __half_as_ushort(__float2half_rn(v));
  }
  static __device__ __forceinline__ u32 pair_raw(float a, float b) {  // NaN bits as converted
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const u32*>(&h);
  }
  static __device__ __forceinline__ u32 pair(float a, float b) {
    return canon_pair(pair_raw(a, b), a, b, kNaN);
  }
  static __device__ __forceinline__ void put8(__half* p, const float* v) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
};

template <typename A, typename B> struct Same { static constexpr bool value = false; };
template <typename A> struct Same<A, A> { static constexpr bool value = true; };
template <typename T> struct UsesBf16 { static constexpr bool value = Same<T, __nv_bfloat16>::value; };

// ---- 16-bit tokens two at a time (bf16x2 / half2 min, max and compare: half the work) ------
template <typename In> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  typedef __nv_bfloat162 T2;
  static __device__ __forceinline__ T2 of(u32 w) { return *reinterpret_cast<const T2*>(&w); }
  static __device__ __forceinline__ u32 bits(T2 a) { return *reinterpret_cast<const u32*>(&a); }
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ T2 splat(float v) { return __float2bfloat162_rn(v); }  // exact here
  static __device__ __forceinline__ float lo(T2 a) { return __low2float(a); }
  static __device__ __forceinline__ float hi(T2 a) { return __high2float(a); }
};
template <> struct Pair<__half> {
  typedef __half2 T2;
  static __device__ __forceinline__ T2 of(u32 w) { return *reinterpret_cast<const T2*>(&w); }
  static __device__ __forceinline__ u32 bits(T2 a) { return *reinterpret_cast<const u32*>(&a); }
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ T2 splat(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ float lo(T2 a) { return __low2float(a); }
  static __device__ __forceinline__ float hi(T2 a) { return __high2float(a); }
};
// The packed path is on unless MFC_SCALAR_STATS is defined (an A/B switch for benchmarks).
template <typename In> struct UsePairs { static constexpr bool value = false; };
#ifndef MFC_SCALAR_STATS
template <> struct UsePairs<__nv_bfloat16> { static constexpr bool value = true; };
template <> struct UsePairs<__half> { static constexpr bool value = true; };
#endif

// ---- arithmetic -----------------------------------------------------------------------------
__device__ __forceinline__ bool finite(float v) { return fabsf(v) <= kFltMax; }  // false for NaN
__device__ __forceinline__ float plus_zero(float v) { return v == 0.0f ? 0.0f : v; }  // -0 -> +0

// min/max that propagate NaN (fminf/fmaxf drop it), so a NaN anywhere marks the group bad.
__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// RN(a / b) given rc = RN(1 / b), for b in [2^-64, 2^64]: Markstein's correction step makes the
// quotient correctly rounded (the residual a - q*b is exact under FMA), so this equals IEEE
// division at a third of its cost. The sign of a zero quotient is not kept.
__device__ __forceinline__ float div_rn_fast(float a, float b, float rc) {
  const float q = __fmul_rn(a, rc);
  const float e = __fmaf_rn(-q, b, a);
  return __fmaf_rn(e, rc, q);
}
__device__ __forceinline__ bool div_fast_ok(float b) { return b >= 0x1p-64f && b <= 0x1p64f; }

// x / d for x < 2^31 (CUTLASS's FastDivmod; mul and shift come from the host).
__device__ __forceinline__ u32 fastdiv(u32 x, u32 mul, u32 shift) { return (__umulhi(x, mul) + x) >> shift; }

// The counter hash of reference.uniform_noise.
__device__ __forceinline__ u32 lowbias32(u32 x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// ---- group-wide reductions over the L lanes in mask (L a power of two <= 32) ----------------
struct MinNaN { __device__ float operator()(float a, float b) const { return min_nan(a, b); } };
struct MaxNaN { __device__ float operator()(float a, float b) const { return max_nan(a, b); } };
struct Min { __device__ float operator()(float a, float b) const { return fminf(a, b); } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// Every lane of the warp takes part (a full mask keeps the shuffles single instructions); xor
// offsets below L stay inside the group.
template <typename Op>
__device__ __forceinline__ float group_reduce(float v, int L, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < L) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
}

// ---- thread -> (token, group, lane) -----------------------------------------------------------
struct Pos {
  bool live;  // false for the padding lanes of the grid's last warp (they compute, never store)
  u32 t;      // token
  int g;      // group in the token
  int lane;   // chunk in the group
  int base;   // first value of the chunk in the (padded) token
  int first;  // warp lane of the group's first thread
  u32 mask;   // warp lanes of the group (from the thread's warp lane, so padding lanes get their own)
};

// Call after leaving when the whole warp is past the end: (item & ~31u) >= total.
template <int V>
__device__ __forceinline__ Pos locate(u32 item, u32 total, u32 ipt, u32 div_mul, u32 div_shift, int log2L) {
  Pos p;
  p.live = item < total;
  if (!p.live) item = total - 1;  // a real chunk to read; results are dropped
  p.t = fastdiv(item, div_mul, div_shift);
  const u32 r = item - p.t * ipt;
  const int L = 1 << log2L;
  p.g = r >> log2L;
  p.lane = r & (L - 1);
  p.base = r * V;
  const int wl = threadIdx.x & 31;
  p.first = wl & ~(L - 1);
  p.mask = L == 32 ? 0xFFFFFFFFu : ((1u << L) - 1u) << p.first;
  return p;
}

// ---- byte-code words --------------------------------------------------------------------------
// Codes live one per byte in u32 words. For the 4/2/1-bit planes a chunk of 8 values is kept as
// E = codes of values 0,2,4,6 and O = values 1,3,5,7, which turns plane packing into a few
// shifts and masks on whole words.

// low bytes of a, b, c, d -> bytes 0..3 of one word
__device__ __forceinline__ u32 pack4(u32 a, u32 b, u32 c, u32 d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}
// 0xFF in each byte whose top bit is set: prmt's sign-replicating selector (not in __byte_perm)
__device__ __forceinline__ u32 sign_bytes(u32 f) {
  u32 r;
  asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(r) : "r"(f));
  return r;
}
// 0xFF in byte i where bit 2i of z is set (i = 0..3): the multiply moves those bits to 8i + 7
__device__ __forceinline__ u32 spread_even(u32 z) { return sign_bytes((z & 0x55u) * 0x02082080u); }
// 0xFF in byte i where bit i of z is set (i = 0..3)
__device__ __forceinline__ u32 spread4(u32 z) { return sign_bytes((z & 0x0Fu) * 0x10204080u); }

// E/O words -> the W-bit plane bits of 8 values ((code >> s) & (2^W - 1), value i at bit i*W)
template <int W> __device__ __forceinline__ u32 plane_pack(u32 E, u32 O, int s);
// (a & m) | (b & ~m) in one LOP3 (nvcc splits the C form into two)
__device__ __forceinline__ u32 bitsel(u32 a, u32 b, u32 m) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xCA;" : "=r"(r) : "r"(m), "r"(a), "r"(b));  // f(m, a, b) = m ? a : b
  return r;
}
template <> __device__ __forceinline__ u32 plane_pack<4>(u32 E, u32 O, int s) {
  return bitsel(E >> s, (O >> s) << 4, 0x0F0F0F0Fu);
}
template <> __device__ __forceinline__ u32 plane_pack<2>(u32 E, u32 O, int s) {
  u32 t = ((E >> s) & 0x03030303u) | (((O >> s) & 0x03030303u) << 2);  // a nibble per byte
  t |= t >> 4;
  return __byte_perm(t, 0, 0x4420);  // bytes 0 and 2
}
template <> __device__ __forceinline__ u32 plane_pack<1>(u32 E, u32 O, int s) {
  u32 t = ((E >> s) & 0x01010101u) | (((O >> s) & 0x01010101u) << 1);  // two bits per byte
  t |= t >> 6;
  t |= t >> 12;
  return t & 0xFFu;
}

// Inverse: the W-bit plane bits of 8 values -> OR into E/O at shift s
template <int W> __device__ __forceinline__ void plane_unpack(u32 p, int s, u32& E, u32& O);
template <> __device__ __forceinline__ void plane_unpack<4>(u32 p, int s, u32& E, u32& O) {
  E |= (p & 0x0F0F0F0Fu) << s;
  O |= ((p >> 4) & 0x0F0F0F0Fu) << s;
}
template <> __device__ __forceinline__ void plane_unpack<2>(u32 p, int s, u32& E, u32& O) {
  u32 t = __byte_perm(p, 0, 0x4140);  // plane bytes 0, 1 -> word bytes 0, 2
  t = (t | (t << 4)) & 0x0F0F0F0Fu;
  E |= (t & 0x03030303u) << s;
  O |= ((t >> 2) & 0x03030303u) << s;
}
template <> __device__ __forceinline__ void plane_unpack<1>(u32 p, int s, u32& E, u32& O) {
  u32 t = (p | (p << 12)) & 0x000F000Fu;
  t = (t | (t << 6)) & 0x03030303u;
  E |= (t & 0x01010101u) << s;
  O |= ((t >> 1) & 0x01010101u) << s;
}

// ---- plane bytes of one thread: N = V * W / 8 bytes at a N-aligned address ---------------------
// words[] holds the bytes little-endian; only sizes 1, 2, 4, 8, 16 and 32 occur.
template <int N>
__device__ __forceinline__ void store_bytes(u8* p, const u32* w) {
  if (N == 1) *p = (u8)w[0];
  else if (N == 2) *reinterpret_cast<u16*>(p) = (u16)w[0];
  else if (N == 4) *reinterpret_cast<u32*>(p) = w[0];
  else if (N == 8) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  else {
#pragma unroll
    for (int i = 0; i < N / 16; ++i)
      reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  }
}
template <int N>
__device__ __forceinline__ void load_bytes(const u8* p, u32* w) {
  if (N == 1) w[0] = *p;
  else if (N == 2) w[0] = *reinterpret_cast<const u16*>(p);
  else if (N == 4) w[0] = *reinterpret_cast<const u32*>(p);
  else if (N == 8) { const uint2 a = *reinterpret_cast<const uint2*>(p); w[0] = a.x; w[1] = a.y; }
  else {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) {
      const uint4 a = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = a.x; w[4 * i + 1] = a.y; w[4 * i + 2] = a.z; w[4 * i + 3] = a.w;
    }
  }
}
// the 8*W/8 = W bytes of chunk c inside those words
template <int W>
__device__ __forceinline__ u32 chunk_bits(const u32* w, int c) {
  if (W == 4) return w[c];
  if (W == 2) return (w[c / 2] >> (16 * (c & 1))) & 0xFFFFu;
  return (w[c / 4] >> (8 * (c & 3))) & 0xFFu;  // W == 1
}
template <int W>
__device__ __forceinline__ void set_chunk_bits(u32* w, int c, u32 bits) {
  if (W == 4) w[c] = bits;
  else if (W == 2) w[c / 2] |= bits << (16 * (c & 1));
  else w[c / 4] |= bits << (8 * (c & 3));
}

// Zero the record's padding bytes: up to four ranges packed as (start << 4) | length.
__device__ __forceinline__ void zero_gaps(u8* rec, const int* gaps) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int start = gaps[i] >> 4, len = gaps[i] & 15;  // even start and length
    for (int k = 0; k < len; k += 2) *reinterpret_cast<u16*>(rec + start + k) = 0;
  }
}

__device__ __forceinline__ u16 ld16(const u8* p) { return *reinterpret_cast<const u16*>(p); }
__device__ __forceinline__ void st16(u8* p, u16 v) { *reinterpret_cast<u16*>(p) = v; }

}  // namespace mfc
