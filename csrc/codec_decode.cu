// Decode kernels: records [T, record_bytes] -> tokens [T, H] (fp32/bf16/fp16).
// Bit-identical to moe_flashcomm/codec/reference.py (decode); see codec_common.cuh for the
// work split. One launch covers T * padded_hidden / (V * U) threads.
#ifndef MFC_CODEC_DECODE_CU  // included by allreduce.cu and p2p.cu too
#define MFC_CODEC_DECODE_CU
#include "codec_common.cuh"

// (V, U) shapes instantiated for CI; keep in sync with DECODE_SHAPES in codec/cuda.py.
#define MFC_DEC_SHAPES MFC_DEC(8, 2), MFC_DEC(8, 4), MFC_DEC(16, 1), MFC_DEC(16, 2), MFC_DEC(32, 1)

namespace mfc {

// Saturate to the output dtype's finite range, keeping NaN (fminf/fmaxf would drop it); the
// stores (Val<Out>::put / put8 / pair) write every NaN as the canonical one.
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

// Kernel arguments (one struct, passed by value; moe_flashcomm/codec/cuda.py mirrors it).
struct DecArgs {
  int H, log2L, rec_bytes;
  u32 ipt, div_mul, div_shift, total;  // items (chunks) per token, its fastdiv, all items
  int o4, o2, o1;                      // plane offsets (o4: the 8-bit plane for 8 bits, fp8 codes)
  int o_scale, o_min, o_lov, o_hiv, o_loi, o_hii;
  int vec;                             // H % 8 == 0: 16-byte stores
  int dense;                           // padded_hidden == H: item i is values [i*V, i*V + V) of y
};

// What one chunk reads from its record, loaded for all U chunks before any work.
template <int BITS, bool SPIKES, int V>
struct ChunkIn {
  u32 p4[(BITS & 4) || BITS == 8 ? (BITS == 8 ? V / 4 : V / 8) : 1];  // 4-bit (or 8-bit) plane
  u32 p2[(V + 15) / 16], p1[(V + 31) / 32];
  u16 scale, minimum, lov, hiv;
  int li, hi;

  __device__ __forceinline__ void load(const u8* in, const Pos& P, const DecArgs& a) {
    const u32 g = P.g, b = P.base;  // unsigned offsets: cheaper address arithmetic
    if constexpr (BITS == 8) load_bytes<V>(in + ((u32)a.o4 + b), p4);
    if constexpr (BITS != 8 && (BITS & 4)) load_bytes<V / 2>(in + ((u32)a.o4 + b / 2), p4);
    if constexpr (BITS != 8 && (BITS & 2)) load_bytes<V / 4>(in + ((u32)a.o2 + b / 4), p2);
    if constexpr (BITS != 8 && (BITS & 1)) load_bytes<V / 8>(in + ((u32)a.o1 + b / 8), p1);
    scale = ld16(in + ((u32)a.o_scale + 2 * g));
    minimum = ld16(in + ((u32)a.o_min + 2 * g));
    if (SPIKES) {
      lov = ld16(in + ((u32)a.o_lov + 2 * g));
      hiv = ld16(in + ((u32)a.o_hiv + 2 * g));
      li = in[(u32)a.o_loi + g];
      hi = in[(u32)a.o_hii + g];
    }
  }
};

// Output staging: a chunk wider than 16 bytes would be stored by each thread as several 16-byte
// pieces 16 * pieces bytes apart across the warp (half-empty sectors per instruction). When the
// output is one dense stream of chunks the warp instead writes its pieces to shared memory and
// stores the warp's whole span with fully coalesced 16-byte stores.
template <typename Out, int V>
struct Staging {
  static constexpr int kPieces = V * (int)sizeof(Out) / 16;  // 16-byte pieces per chunk
  static constexpr bool kOn = kPieces > 1;
  // XOR swizzle of 16-byte slots: conflict-free for the per-lane writes and the per-piece reads
  static __device__ __forceinline__ int slot(int s) { return s ^ ((s >> 3) & 7); }
};

// V values -> V*size/4 words. A value decodes to NaN only when its group's scale or minimum
// is not finite (a group that held NaN or Inf travels with NaN metadata; finite ones give
// finite values or saturate): only such chunks pay the per-value canonical-NaN test.
template <typename Out, int V>
__device__ __forceinline__ void pack_out(const float* o, u32* w, bool finite_group) {
  if constexpr (sizeof(Out) == 4) {
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = __float_as_uint(finite_group ? o[k] : Val<float>::canon(o[k]));
  } else if (finite_group) {
#pragma unroll
    for (int k = 0; k < V; k += 2) w[k / 2] = Val<Out>::pair_raw(o[k], o[k + 1]);
  } else {
#pragma unroll
    for (int k = 0; k < V; k += 2) w[k / 2] = Val<Out>::pair(o[k], o[k + 1]);
  }
}

// An integer chunk's V values, minimum + code * scale (mnf, scf: as fp32), before saturation
// and spikes; decode_chunk and the all-reduce's peer_values share it.
template <int BITS, bool SPIKES, int V>
__device__ __forceinline__ void chunk_values(const ChunkIn<BITS, SPIKES, V>& c, float mnf, float scf,
                                             float* o) {
  if constexpr (BITS == 8) {
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = __fadd_rn(mnf, __fmul_rn(code_at(c.p4[k / 4], k % 4), scf));
  } else {
    u32 E[V / 8], O[V / 8];
#pragma unroll
    for (int j = 0; j < V / 8; ++j) {
      E[j] = O[j] = 0;
      if constexpr ((BITS & 4) != 0) plane_unpack<4>(chunk_bits<4>(c.p4, j), BITS - 4, E[j], O[j]);
      if constexpr ((BITS & 2) != 0) plane_unpack<2>(chunk_bits<2>(c.p2, j), BITS & 1, E[j], O[j]);
      if constexpr ((BITS & 1) != 0) plane_unpack<1>(chunk_bits<1>(c.p1, j), 0, E[j], O[j]);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const u32 w = (k & 1) ? O[k / 8] : E[k / 8];
      o[k] = __fadd_rn(mnf, __fmul_rn(code_at(w, (k % 8) / 2), scf));  // two roundings
    }
  }
}

template <typename Out, int BITS, bool SPIKES, int V>
__device__ __forceinline__ void decode_chunk(const ChunkIn<BITS, SPIKES, V>& c, const Pos& P, u32 item,
                                             Out* __restrict__ y, const DecArgs& a, uint4* stage) {
  typedef typename Val<Out>::W W;
  typedef Staging<Out, V> S;
  Out* row = y + (size_t)P.t * a.H;
  const float scf = Wire<W>::f(c.scale), mnf = Wire<W>::f(c.minimum);
  float o[V];
  chunk_values(c, mnf, scf, o);
#pragma unroll
  for (int k = 0; k < V; ++k) o[k] = saturate<Out>(o[k]);
  // the spike slots (jl, jh: their place in this chunk, >= V if elsewhere); hi wins a tie
  const u32 jl = SPIKES ? (u32)(c.li - P.lane * V) : V, jh = SPIKES ? (u32)(c.hi - P.lane * V) : V;

  if constexpr (S::kOn) {
    if (a.dense) {  // warp-uniform
      const int lane = threadIdx.x & 31;
      u32 w[V * sizeof(Out) / 4];
      pack_out<Out, V>(o, w, finite(scf) && finite(mnf));
      __syncwarp();  // the previous round's reads are done
#pragma unroll
      for (int k = 0; k < S::kPieces; ++k)
        stage[S::slot(lane * S::kPieces + k)] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
      if (SPIKES) {
        constexpr int per = 16 / sizeof(Out);  // values per piece
        if (jl < (u32)V) {
          Out* piece = reinterpret_cast<Out*>(&stage[S::slot(lane * S::kPieces + jl / per)]);
          Val<Out>::put(piece + jl % per, saturate<Out>(Wire<W>::f(c.lov)));
        }
        if (jh < (u32)V) {
          Out* piece = reinterpret_cast<Out*>(&stage[S::slot(lane * S::kPieces + jh / per)]);
          Val<Out>::put(piece + jh % per, saturate<Out>(Wire<W>::f(c.hiv)));
        }
      }
      __syncwarp();
      const u32 first = item - lane;  // the warp's first item of this round
      uint4* dst = reinterpret_cast<uint4*>(y + (size_t)first * V);
#pragma unroll
      for (int k = 0; k < S::kPieces; ++k) {
        const int p = lane + 32 * k;
        if (first + p / S::kPieces < a.total) dst[p] = stage[S::slot(p)];
      }
      return;
    }
  }
  if (!P.live) return;
  store_chunk<Out, V>(row, P.base, a.H, a.vec != 0, o);
  if (SPIKES) {  // overwrite the spike slots; same thread, after the chunk store: ordered
    if (jl < (u32)V && P.base + (int)jl < a.H) Val<Out>::put(row + P.base + jl, saturate<Out>(Wire<W>::f(c.lov)));
    if (jh < (u32)V && P.base + (int)jh < a.H) Val<Out>::put(row + P.base + jh, saturate<Out>(Wire<W>::f(c.hiv)));
  }
}

// Integer widths: out = minimum + code * scale, spikes restored. A thread decodes U chunks of
// V values, kBlock items apart, all record loads issued first; ``block`` as for the encode.
template <typename Out, int BITS, bool SPIKES, int V, int U>
__device__ __forceinline__ void decode_int_items(const u8* __restrict__ rec, Out* __restrict__ y,
                                                 const DecArgs& a, const u32 block) {
  typedef Staging<Out, V> S;
  __shared__ uint4 stage[S::kOn ? kBlock * S::kPieces : 1];
  const u32 item0 = block * (kBlock * U) + threadIdx.x;
  ChunkIn<BITS, SPIKES, V> c[U];
  Pos P[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    P[u] = locate<V>(min(item0 + u * kBlock, a.total - 1), a.total, a.ipt, a.div_mul, a.div_shift, a.log2L);
    c[u].load(rec + (u64)P[u].t * (u32)a.rec_bytes, P[u], a);
  }
  uint4* warp_stage = stage + (S::kOn ? (threadIdx.x & ~31) * S::kPieces : 0);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const u32 item = item0 + u * kBlock;
    if ((item & ~31u) >= a.total) return;  // warp-uniform (staging syncs the warp)
    P[u].live = item < a.total;
    decode_chunk<Out, BITS, SPIKES, V>(c[u], P[u], item, y, a, warp_stage);
  }
}

template <typename Out, int BITS, bool SPIKES, int V, int U>
__global__ void __launch_bounds__(kBlock) decode_int(const u8* __restrict__ rec, Out* __restrict__ y,
                                                     const DecArgs a) {
  decode_int_items<Out, BITS, SPIKES, V, U>(rec, y, a, blockIdx.x);
}

// fp8: out = e4m3(code) * scale.
template <typename Out, int V, int U>
__device__ __forceinline__ void decode_fp8_items(const u8* __restrict__ rec, Out* __restrict__ y,
                                                 const DecArgs& a, const u32 block) {
  typedef typename Val<Out>::W W;
  const u32 item0 = block * (kBlock * U) + threadIdx.x;
  u32 w[U][V / 4];
  u16 sc[U];
  Pos P[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    P[u] = locate<V>(min(item0 + u * kBlock, a.total - 1), a.total, a.ipt, a.div_mul, a.div_shift, a.log2L);
    const u8* in = rec + (size_t)P[u].t * a.rec_bytes;
    load_bytes<V>(in + a.o4 + P[u].base, w[u]);
    sc[u] = ld16(in + a.o_scale + 2 * P[u].g);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (item0 + u * kBlock >= a.total) return;
    const float scf = Wire<W>::f(sc[u]);
    float o[V];
#pragma unroll
    for (int k = 0; k < V; k += 2) {
      const __half2 h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[u][k / 4] >> (16 * ((k / 2) & 1))), __NV_E4M3);
      const float2 f = __half22float2(h);
      o[k] = saturate<Out>(__fmul_rn(f.x, scf));
      o[k + 1] = saturate<Out>(__fmul_rn(f.y, scf));
    }
    store_chunk<Out, V>(y + (size_t)P[u].t * a.H, P[u].base, a.H, a.vec != 0, o);
  }
}

template <typename Out, int V, int U>
__global__ void __launch_bounds__(kBlock) decode_fp8(const u8* __restrict__ rec, Out* __restrict__ y,
                                                     const DecArgs a) {
  decode_fp8_items<Out, V, U>(rec, y, a, blockIdx.x);
}

// The passthrough: the wire floats as Out, as reference.decode's ``.to(dtype)`` gives them: the
// same bits for 16-bit tokens (their wire is their dtype), bf16 bits shifted into fp32 (exact,
// NaN payloads kept). An item is 16 bytes of a record, 8 values of a row (encode_cast_items).
template <typename Out>
__device__ __forceinline__ void decode_cast_items(const u8* __restrict__ rec, Out* __restrict__ y,
                                                  const DecArgs& a, const u32 block) {
  const u32 item = block * kBlock + threadIdx.x;
  if (item >= a.total) return;
  const u32 t = item / a.ipt, c = item - t * a.ipt;
  const int base = (int)c * 8, n = min(8, a.H - base);
  const uint4 q = *reinterpret_cast<const uint4*>(rec + (size_t)t * a.rec_bytes + 16 * c);
  const u32 w[4] = {q.x, q.y, q.z, q.w};
  Out* row = y + (size_t)t * a.H + base;
  if constexpr (sizeof(Out) == 2) {
    if (a.vec) {
      *reinterpret_cast<uint4*>(row) = q;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k < n) reinterpret_cast<u16*>(row)[k] = (u16)(w[k / 2] >> (16 * (k & 1)));
    }
  } else {
    u32 o[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = (k & 1) ? (w[k / 2] & 0xFFFF0000u) : (w[k / 2] << 16);
    if (a.vec) {
      reinterpret_cast<uint4*>(row)[0] = make_uint4(o[0], o[1], o[2], o[3]);
      reinterpret_cast<uint4*>(row)[1] = make_uint4(o[4], o[5], o[6], o[7]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k < n) reinterpret_cast<u32*>(row)[k] = o[k];
    }
  }
}

template <typename Out>
__global__ void __launch_bounds__(kBlock) decode_cast(const u8* __restrict__ rec, Out* __restrict__ y,
                                                      const DecArgs a) {
  decode_cast_items<Out>(rec, y, a, blockIdx.x);
}

}  // namespace mfc

#ifdef MFC_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): compile every variant the loader may request (cuda.DECODE_SHAPES).
namespace mfc {
#define MFC_DEC_BITS(T, S, V, U) \
  (const void*)&decode_int<T, 2, S, V, U>, (const void*)&decode_int<T, 3, S, V, U>, \
  (const void*)&decode_int<T, 4, S, V, U>, (const void*)&decode_int<T, 5, S, V, U>, \
  (const void*)&decode_int<T, 6, S, V, U>, (const void*)&decode_int<T, 7, S, V, U>, \
  (const void*)&decode_int<T, 8, S, V, U>
#define MFC_DEC_TYPE(T, V, U) \
  MFC_DEC_BITS(T, false, V, U), MFC_DEC_BITS(T, true, V, U), (const void*)&decode_fp8<T, V, U>
#define MFC_DEC(V, U) MFC_DEC_TYPE(float, V, U), MFC_DEC_TYPE(__nv_bfloat16, V, U), MFC_DEC_TYPE(__half, V, U)
extern const void* const all_decode_kernels[] = {MFC_DEC_SHAPES};
extern const void* const all_cast_decode_kernels[] = {
  (const void*)&decode_cast<float>, (const void*)&decode_cast<__nv_bfloat16>, (const void*)&decode_cast<__half>};
}  // namespace mfc
#endif
#endif  // MFC_CODEC_DECODE_CU
