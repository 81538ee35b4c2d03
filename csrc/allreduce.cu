// Fused reduction of moe_flashcomm.all_reduce (moe_flashcomm/comm/all_reduce.py,
// reduce_chunk): for each value of the owned chunk, decode the world - 1 peers' records,
// sum them with the rank's own value in fp32 in rank order 0..world-1, round the sum to the
// tensor's dtype, and re-encode it (REQUANT) or store it (the hierarchy's first stage), in
// one pass. Bit-identical to reduce_chunk's torch definition: each peer through
// reference.decode (to the tensor's dtype), the terms added with IEEE fp32 adds in rank
// order (the first term taken as is), ``.to(dtype)``, reference.encode.
//
// One thread owns V values of one group of one row (codec_common.cuh's work split, the
// encoder's geometry); the peers' records have the output's layout, so the thread's decode
// reads exactly the bytes its encode writes. Integer widths (round to nearest) and fp8;
// the passthrough (reduce_cast, below) sums the wire floats 8 at a time.
//
// Stamps (exchanges NCCL carries): each peer's records follow a slot of kStampBytes holding the
// sender's stamp of the pair (codec, rows, dtype; moe_flashcomm/comm/p2p.py packs it) and the
// call's numel; the first warp compares every peer's with the ones expected, after its own
// work, reports a difference on the error page (the host raises at its next call), and may
// mark its own output (write_slot). error_page 0: no stamps.
//
// The codec's own device code is reused: ChunkIn (decode loads), load_raw / value (token
// loads), encode_chunk / encode_fp8_chunk (group statistics, metadata, codes) and
// store_chunk; peer_values below mirrors decode_chunk / decode_fp8 with the values kept in
// registers (decode_chunk stores them; the two share chunk_values).
#ifdef MFC_INSTANTIATE_ALL  // the codec files' own instantiations are not needed here
#define MFC_AR_INSTANTIATE_ALL
#undef MFC_INSTANTIATE_ALL
#endif
#include "codec_encode.cu"
#include "codec_decode.cu"
#include "error_page.cuh"

namespace mfc {

// Kernel arguments (one struct, by value; moe_flashcomm/kernels.py mirrors it). enc
// describes the output records and the geometry (H, groups, items); dec the peers' records,
// which have the same layout.
struct ReduceArgs {
  EncArgs enc;
  DecArgs dec;
  int world, rank;
  int peer_base, peer_step;  // peer p is rank peer_base + p * peer_step of the page's group
  int write_slot;            // REQUANT: write the kStampBytes slot before rec (below)
  u64 stamp;       // the stamp expected from every peer
  u64 error_page;  // pinned host memory, mapped (error_page.cuh); 0: no stamps
  u64 slot_stamp;  // the stamp the slot carries when this call saw no disagreement
  u64 numel;       // the second word expected in every peer's slot (the call's numel)
};

// The first warp of block 0: every peer's stamp (in the slot before its records) against the
// one expected, and the numel in the slot's second word. With write_slot (the hierarchical
// all-reduce's second stage) it then writes the slot before its output records: slot_stamp,
// or kSawDisagreement where a stamp differed here or the error page holds a report (the first
// stage's check, earlier in this call: the host clears the page before a call), so that every
// rank that decodes the output learns of it. Called after the warp's own work: at the
// kernel's start it made block 0 ~5.5 us slower (H100, 1 MiB; docs/notes.md, "Stamps over
// NCCL").
__device__ __forceinline__ void check_stamps(const u8* peers, unsigned long long peer_stride,
                                             u8* rec, const ReduceArgs& a) {
  bool differs = false;
  for (int i = threadIdx.x; i < a.world - 1; i += 32) {
    const u64* slot = reinterpret_cast<const u64*>(peers + (size_t)i * peer_stride - kStampBytes);
    const u64 got = slot[0], numel = slot[1];
    const int peer = a.peer_base + (i + (i >= a.rank)) * a.peer_step;
    if (got != a.stamp) {
      report_error(a.error_page, kErrReduceStamp, peer, got, a.stamp, 0);
      differs = true;
    } else if (numel != a.numel) {  // (the stamp holds the numel mod 2^14 only)
      report_error(a.error_page, kErrReduceNumel, peer, numel, a.numel, 0);
      differs = true;
    }
  }
  const bool any = __any_sync(~0u, differs);  // (every lane of the warp is here)
  if (a.write_slot && threadIdx.x == 0) {
    const bool reported = *reinterpret_cast<const volatile u64*>(a.error_page + 8 * kErrSet) != 0;
    u64* slot = reinterpret_cast<u64*>(rec - kStampBytes);
    slot[0] = any || reported ? kSawDisagreement : a.slot_stamp;
    slot[1] = 0;
  }
}

// fp32 -> T -> fp32: the rounding of torch's .to(T) (nearest even; overflow to infinity).
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ float round_to<__half>(float v) {
  return __half2float(__float2half_rn(v));
}

// fp32 values (already representable in In) -> the raw words load_raw would have read.
template <typename In, int V>
__device__ __forceinline__ void pack_raw(const float* v, u32* w) {
  if constexpr (sizeof(In) == 4) {
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = __float_as_uint(v[k]);
  } else if constexpr (UsesBf16<In>::value) {
#pragma unroll
    for (int k = 0; k < V; k += 2)
      w[k / 2] = (__float_as_uint(v[k]) >> 16) | (__float_as_uint(v[k + 1]) & 0xFFFF0000u);
  } else {
#pragma unroll
    for (int k = 0; k < V; k += 2)
      w[k / 2] = (u32)__half_as_ushort(__float2half_rn(v[k]))
                 | ((u32)__half_as_ushort(__float2half_rn(v[k + 1])) << 16);
  }
}

// A peer's V decoded values of the thread's chunk as reference.decode gives them in dtype
// Out (saturated, spikes restored, rounded to Out), as fp32: decode_chunk's arithmetic.
template <typename Out, int BITS, bool SPIKES, int V>
__device__ __forceinline__ void peer_values(const u8* in, const Pos& P, const DecArgs& a, float* o) {
  typedef typename Val<Out>::W W;
  ChunkIn<BITS, SPIKES, V> c;
  c.load(in, P, a);
  const float scf = Wire<W>::f(c.scale), mnf = Wire<W>::f(c.minimum);
  chunk_values(c, mnf, scf, o);
  if (SPIKES) {  // the spike slots hold the exact extremes (hi written last, as decode does)
    const int jl = c.li - P.lane * V, jh = c.hi - P.lane * V;
    const float lov = Wire<W>::f(c.lov), hiv = Wire<W>::f(c.hiv);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = k == jh ? hiv : (k == jl ? lov : o[k]);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) o[k] = round_to<Out>(saturate<Out>(o[k]));
}

// fp8: e4m3(code) * scale, saturated and rounded to Out (decode_fp8's arithmetic).
template <typename Out, int V>
__device__ __forceinline__ void peer_values_fp8(const u8* in, const Pos& P, const DecArgs& a, float* o) {
  typedef typename Val<Out>::W W;
  u32 w[V / 4];
  load_bytes<V>(in + a.o4 + P.base, w);
  const float scf = Wire<W>::f(ld16(in + a.o_scale + 2 * P.g));
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    const __half2 h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[k / 4] >> (16 * ((k / 2) & 1))), __NV_E4M3);
    const float2 f = __half22float2(h);
    o[k] = round_to<Out>(saturate<Out>(__fmul_rn(f.x, scf)));
    o[k + 1] = round_to<Out>(saturate<Out>(__fmul_rn(f.y, scf)));
  }
}

// The thread's V values of the sum, rounded to In (0 beyond H).
template <typename In, int BITS, bool SPIKES, bool FP8, int V>
__device__ __forceinline__ void reduced(const u8* __restrict__ peers, unsigned long long peer_stride,
                                        const In* __restrict__ own, const Pos& P,
                                        const ReduceArgs& a, float* acc) {
  const int H = a.enc.H;
  for (int p = 0; p < a.world; ++p) {
    float t[V];
    if (p == a.rank) {
      u32 w[raw_words<In, V>()];
      load_raw<In, V>(own + (size_t)P.t * H, P.base, H, a.enc.vec != 0, w);
#pragma unroll
      for (int k = 0; k < V; ++k) t[k] = value<In>(w, k);
    } else {
      const u8* in = peers + (size_t)(p - (p > a.rank)) * peer_stride + (size_t)P.t * a.dec.rec_bytes;
      if constexpr (FP8) peer_values_fp8<In, V>(in, P, a.dec, t);
      else peer_values<In, BITS, SPIKES, V>(in, P, a.dec, t);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = p == 0 ? t[k] : __fadd_rn(acc[k], t[k]);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = P.base + k < H ? round_to<In>(acc[k]) : 0.0f;
}

// REQUANT: records of the sum into rec; else the sum (dtype In) into sum. BITS 0: fp8.
template <typename In, int BITS, bool SPIKES, int V, bool REQUANT>
__global__ void __launch_bounds__(kBlock) reduce_chunk(
    const u8* __restrict__ peers, unsigned long long peer_stride, const In* __restrict__ own,
    u8* __restrict__ rec, In* __restrict__ sum, const ReduceArgs a) {
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if ((item & ~31u) >= a.enc.total) return;  // warp-uniform: the encode's shuffles need every lane
  const EncArgs& e = a.enc;
  // lanes past the end compute on the last item and store nothing
  const Pos P = locate<V>(min(item, e.total - 1), e.total, e.ipt, e.div_mul, e.div_shift, e.log2L);
  float acc[V];
  reduced<In, BITS, SPIKES, BITS == 0, V>(peers, peer_stride, own, P, a, acc);
  if constexpr (REQUANT) {
    u32 w[raw_words<In, V>()];
    pack_raw<In, V>(acc, w);
    if constexpr (BITS == 0) encode_fp8_chunk<In, V>(w, item, rec, e);
    else encode_chunk<In, BITS, SPIKES, false, V>(w, item, rec, e);
  } else {
    if (item < e.total) store_chunk<In, V>(sum + (size_t)P.t * e.H, P.base, e.H, e.vec != 0, acc);
  }
  // (warp 0 of block 0 always gets here: item 0 exists)
  if (a.error_page && blockIdx.x == 0 && threadIdx.x < 32)
    check_stamps(peers, peer_stride, rec, a);
}

// The passthrough ("bf16"): the peers' records are the wire floats themselves (bf16; fp16 for
// fp16 tensors), so a thread sums 8 values of a row straight from them, with reduce_chunk's
// sum, rounding and NaNs, and re-encodes the sum as encode_cast_items does (REQUANT) or stores
// it. An item is 8 values of a row (a.enc.ipt = H / 8 per row); H is a multiple of 8 and
// every pointer 16-byte aligned (rows of ROW values).
template <typename In, bool REQUANT>
__global__ void __launch_bounds__(kBlock) reduce_cast(
    const u8* __restrict__ peers, unsigned long long peer_stride, const In* __restrict__ own,
    u8* __restrict__ rec, In* __restrict__ sum, const ReduceArgs a) {
  typedef typename Val<In>::W W;
  const EncArgs& e = a.enc;
  const u32 item = blockIdx.x * kBlock + threadIdx.x;
  if (item < e.total) {
    const u32 t = item / e.ipt, c = item - t * e.ipt;
    float acc[8];
    for (int p = 0; p < a.world; ++p) {
      float v[8];
      if (p == a.rank) {
        Val<In>::get8(own + (size_t)t * e.H + 8 * c, v);
      } else {
        const u8* in = peers + (size_t)(p - (p > a.rank)) * peer_stride + (size_t)t * a.dec.rec_bytes + 16 * c;
        Val<W>::get8(reinterpret_cast<const W*>(in), v);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = p == 0 ? v[k] : __fadd_rn(acc[k], v[k]);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = round_to<In>(acc[k]);
    if constexpr (REQUANT) {
      Val<W>::put8(reinterpret_cast<W*>(rec + (size_t)t * a.dec.rec_bytes + 16 * c), acc);
    } else {
      Val<In>::put8(sum + (size_t)t * e.H + 8 * c, acc);
    }
  }
  if (a.error_page && blockIdx.x == 0 && threadIdx.x < 32)  // (item 0 exists: the whole warp)
    check_stamps(peers, peer_stride, rec, a);
}

}  // namespace mfc

#ifdef MFC_AR_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): compile every variant the loader may request (REDUCE_V in
// moe_flashcomm/comm/all_reduce.py: V = min(16, group size)).
namespace mfc {
#define MFC_AR_R(T, B, S, V) \
  (const void*)&reduce_chunk<T, B, S, V, true>, (const void*)&reduce_chunk<T, B, S, V, false>
#define MFC_AR_BITS(T, S, V) \
  MFC_AR_R(T, 2, S, V), MFC_AR_R(T, 3, S, V), MFC_AR_R(T, 4, S, V), MFC_AR_R(T, 5, S, V), \
  MFC_AR_R(T, 6, S, V), MFC_AR_R(T, 7, S, V), MFC_AR_R(T, 8, S, V)
#define MFC_AR_TYPE(T, V) MFC_AR_BITS(T, false, V), MFC_AR_BITS(T, true, V), MFC_AR_R(T, 0, false, V)
#define MFC_AR_V(V) MFC_AR_TYPE(float, V), MFC_AR_TYPE(__nv_bfloat16, V), MFC_AR_TYPE(__half, V)
extern const void* const all_reduce_kernels[] = {MFC_AR_V(16)};
#define MFC_AR_CAST(T) (const void*)&reduce_cast<T, true>, (const void*)&reduce_cast<T, false>
extern const void* const all_cast_reduce_kernels[] = {
  MFC_AR_CAST(float), MFC_AR_CAST(__nv_bfloat16), MFC_AR_CAST(__half)};
}  // namespace mfc
#endif
