// Decode kernels: records [T, record_bytes] -> tokens [T, H] (fp32/bf16/fp16).
// Bit-identical to moe_flashcomm/codec/reference.py (decode); see codec_common.cuh for the
// work split. One launch covers T * padded_hidden / V threads.
#include "codec_common.cuh"

namespace mfc {

// Saturate to the output dtype's finite range, keeping NaN (fminf/fmaxf would drop it).
template <typename Out>
__device__ __forceinline__ float saturate(float v) {
  return max_nan(min_nan(v, Val<Out>::kMax), -Val<Out>::kMax);
}

// Store the V values of a chunk (positions base.. of a row), dropping those beyond H.
template <typename Out, int V>
__device__ __forceinline__ void store_chunk(Out* row, int base, int H, bool vec, const float* o) {
#pragma unroll
  for (int c = 0; c < V / 8; ++c) {
    const int p = base + 8 * c;
    if (vec && p + 8 <= H) {
      Val<Out>::put8(row + p, o + 8 * c);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (p + k < H) Val<Out>::put(row + p + k, o[8 * c + k]);
    }
  }
}

// code -> fp32 exactly: byte b of word w becomes the float 2^23 + code, minus 2^23.
__device__ __forceinline__ float code_at(u32 w, int b) {
  return __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 | b)), 8388608.0f);
}

template <typename Out, int BITS, bool SPIKES, int V>
__global__ void __launch_bounds__(kBlock) decode_int(
    const u8* __restrict__ rec, Out* __restrict__ y, int H, int log2L, int rec_bytes, u32 ipt,
    u32 div_mul, u32 div_shift, u32 total, int o4, int o2, int o1, int o_scale, int o_min,
    int o_lov, int o_hiv, int o_loi, int o_hii, int vec) {
  typedef typename Val<Out>::W W;
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if (item >= total) return;
  const Pos P = locate<V>(item, total, ipt, div_mul, div_shift, log2L);
  const u8* in = rec + (size_t)P.t * rec_bytes;
  Out* row = y + (size_t)P.t * H;

  const float scf = Wire<W>::f(ld16(in + o_scale + 2 * P.g));
  const float mnf = Wire<W>::f(ld16(in + o_min + 2 * P.g));
  float o[V];
  if constexpr (BITS == 8) {  // o4: the 8-bit plane
    u32 w[V / 4];
    load_bytes<V>(in + o4 + P.base, w);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = __fadd_rn(mnf, __fmul_rn(code_at(w[k / 4], k % 4), scf));
  } else {
    u32 E[V / 8], O[V / 8];
#pragma unroll
    for (int c = 0; c < V / 8; ++c) E[c] = O[c] = 0;
    if constexpr ((BITS & 4) != 0) {
      u32 w[V / 8];
      load_bytes<V / 2>(in + o4 + P.base / 2, w);
#pragma unroll
      for (int c = 0; c < V / 8; ++c) plane_unpack<4>(chunk_bits<4>(w, c), BITS - 4, E[c], O[c]);
    }
    if constexpr ((BITS & 2) != 0) {
      u32 w[(V + 15) / 16];
      load_bytes<V / 4>(in + o2 + P.base / 4, w);
#pragma unroll
      for (int c = 0; c < V / 8; ++c) plane_unpack<2>(chunk_bits<2>(w, c), BITS & 1, E[c], O[c]);
    }
    if constexpr ((BITS & 1) != 0) {
      u32 w[(V + 31) / 32];
      load_bytes<V / 8>(in + o1 + P.base / 8, w);
#pragma unroll
      for (int c = 0; c < V / 8; ++c) plane_unpack<1>(chunk_bits<1>(w, c), 0, E[c], O[c]);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const u32 w = (k & 1) ? O[k / 8] : E[k / 8];
      o[k] = __fadd_rn(mnf, __fmul_rn(code_at(w, (k % 8) / 2), scf));  // two roundings
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) o[k] = saturate<Out>(o[k]);
  store_chunk<Out, V>(row, P.base, H, vec != 0, o);

  if (SPIKES) {  // overwrite the spike slots; same thread, after the chunk store: ordered
    const u32 jl = (u32)(in[o_loi + P.g] - P.lane * V), jh = (u32)(in[o_hii + P.g] - P.lane * V);
    if (jl < (u32)V && P.base + (int)jl < H)
      Val<Out>::put(row + P.base + jl, saturate<Out>(Wire<W>::f(ld16(in + o_lov + 2 * P.g))));
    if (jh < (u32)V && P.base + (int)jh < H)
      Val<Out>::put(row + P.base + jh, saturate<Out>(Wire<W>::f(ld16(in + o_hiv + 2 * P.g))));
  }
}

template <typename Out, int V>
__global__ void __launch_bounds__(kBlock) decode_fp8(
    const u8* __restrict__ rec, Out* __restrict__ y, int H, int log2L, int rec_bytes, u32 ipt,
    u32 div_mul, u32 div_shift, u32 total, int o8, int o_scale, int vec) {
  typedef typename Val<Out>::W W;
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if (item >= total) return;
  const Pos P = locate<V>(item, total, ipt, div_mul, div_shift, log2L);
  const u8* in = rec + (size_t)P.t * rec_bytes;
  Out* row = y + (size_t)P.t * H;

  const float scf = Wire<W>::f(ld16(in + o_scale + 2 * P.g));
  u32 w[V / 4];
  load_bytes<V>(in + o8 + P.base, w);
  float o[V];
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    const __half2 h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[k / 4] >> (16 * ((k / 2) & 1))), __NV_E4M3);
    const float2 f = __half22float2(h);
    o[k] = saturate<Out>(__fmul_rn(f.x, scf));
    o[k + 1] = saturate<Out>(__fmul_rn(f.y, scf));
  }
  store_chunk<Out, V>(row, P.base, H, vec != 0, o);
}

}  // namespace mfc

#ifdef MFC_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): compile every variant the loader may request.
namespace mfc {
#define MFC_DEC_BITS(T, S, V) \
  (const void*)&decode_int<T, 2, S, V>, (const void*)&decode_int<T, 3, S, V>, (const void*)&decode_int<T, 4, S, V>, \
  (const void*)&decode_int<T, 5, S, V>, (const void*)&decode_int<T, 6, S, V>, (const void*)&decode_int<T, 7, S, V>, \
  (const void*)&decode_int<T, 8, S, V>
#define MFC_DEC_TYPE(T, V) MFC_DEC_BITS(T, false, V), MFC_DEC_BITS(T, true, V), (const void*)&decode_fp8<T, V>
#define MFC_DEC_V(V) MFC_DEC_TYPE(float, V), MFC_DEC_TYPE(__nv_bfloat16, V), MFC_DEC_TYPE(__half, V)
extern const void* const all_decode_kernels[] = {MFC_DEC_V(8), MFC_DEC_V(16), MFC_DEC_V(32)};
}  // namespace mfc
#endif
