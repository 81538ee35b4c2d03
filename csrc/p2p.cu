// Signalling of the peer-to-peer transport inside one node (moe_flashcomm/comm/p2p.py).
//
// Every rank owns, in device memory its peers map through CUDA IPC, per peer p:
//   landed[p]  the last call whose records from p have landed in our buffer (p writes it);
//   freed[p]   the last call for which p has decoded our records out of its buffer (p writes it);
// and, for itself only, the call counter and one block-completion count per launch kind and
// peer. Call e = counter + 1 of every rank:
//   * before writing into peer p's buffer, wait until freed[p] >= e - 1;
//   * after our records for p have landed there, publish landed_p[rank] = e (release, system);
//   * before decoding p's records, wait until landed[p] >= e (acquire, system);
//   * after decoding them, publish freed_p[rank] = e; the call's last launch stores counter = e.
// The call number lives on the device, so a captured CUDA graph replays correctly: no host
// state reaches the kernels. The common call is two launches per peer: p2p_encode_* waits
// and publishes around the codec's encode (its extra blocks copy the rows a rank keeps),
// p2p_decode_* around the decode. Calls with raw or copy-engine pairs use p2p_sync between
// their copies instead. A wait that lasts timeout_ns (a rank died, or the ranks made different
// calls) gives up and is reported on the error page below; later waits of this rank then give
// up at once, so neither a hang nor an abort follows and the host raises at its next call.
//
// Agreement: with "landed" a sender also stores its stamp of the pair (codec, rows, dtype,
// hidden: moe_flashcomm/comm/p2p.py packs it) into the receiver's stamp[sender]; the receiver
// compares it with the stamp it expects once the records have landed. A difference is written
// to the error page (pinned host memory this rank's host reads before its next call) and the
// call goes on, so the flags stay in step and both ranks of the pair raise there.
#ifdef MFC_INSTANTIATE_ALL  // the codec files' own instantiations are not needed here
#define MFC_P2P_INSTANTIATE_ALL
#undef MFC_INSTANTIATE_ALL
#endif
#include "codec_encode.cu"
#include "codec_decode.cu"

namespace mfc {

constexpr int kMaxPeers = 16;
// Word offsets in a rank's flag allocation.
constexpr int kLanded = 0, kFreed = kMaxPeers, kCounter = 2 * kMaxPeers,
              kEncDone = 2 * kMaxPeers + 1, kDecDone = 3 * kMaxPeers + 1,
              kStamp = 4 * kMaxPeers + 1;
// The error page's words: claimed, then peer, the word seen, the word expected, call, kind;
// "reported" last (the host reads the others once it is set). Kinds: a stamp that differs, a
// wait for "freed" or for "landed" that timed out.
constexpr int kErrClaim = 0, kErrPeer = 1, kErrGot = 2, kErrWant = 3, kErrCall = 4, kErrKind = 5,
              kErrSet = 6;
constexpr int kErrStamp = 1, kErrFreedTimeout = 2, kErrLandedTimeout = 3;

struct P2PArgs {
  u64 peer_flags[kMaxPeers];  // device address (in this process) of each rank's flag words
  u64 send_stamp[kMaxPeers];  // this call's stamp of the pair towards each peer
  u64 recv_stamp[kMaxPeers];  // the stamp expected from each peer
  u64 error_page;             // pinned host memory, mapped (kErr* words)
  u64 timeout_ns;
  u64 copy_n16;               // 16-byte words the extra blocks copy (the rows a rank keeps)
  int rank, world;
  int peer;                   // p2p_encode / p2p_decode: the pair's peer
  int mode;                   // p2p_sync: what to do (kWait* / kPublish* / kAdvance bits)
  int work_blocks;            // p2p_encode: blocks that encode; the rest copy
  int advance;                // the call's last launch: store counter = e at its end
};

constexpr int kWaitFreed = 1, kPublishLanded = 2, kWaitLanded = 4, kPublishFreed = 8;

__device__ __forceinline__ u64 globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ u64* flags_of(const P2PArgs& a, int r) {
  return reinterpret_cast<u64*>(a.peer_flags[r]);
}

// This call's number: the counter is advanced only by the call's last launch, after every
// launch of the call has read it.
__device__ __forceinline__ u64 call_number(const P2PArgs& a) {
  return *reinterpret_cast<volatile const u64*>(flags_of(a, a.rank) + kCounter) + 1;
}

// The first problem this rank meets (until its host has read it) goes to the error page.
__device__ __forceinline__ void report(const P2PArgs& a, int kind, int p, u64 got, u64 want, u64 call) {
  u64* page = reinterpret_cast<u64*>(a.error_page);
  if (atomicCAS(reinterpret_cast<unsigned long long*>(page + kErrClaim), 0ull, 1ull) != 0ull) return;
  page[kErrPeer] = (u64)p;
  page[kErrGot] = got;
  page[kErrWant] = want;
  page[kErrCall] = call;
  page[kErrKind] = (u64)kind;
  __threadfence_system();
  *reinterpret_cast<volatile u64*>(page + kErrSet) = 1;
}

// Whether a wait of this rank has timed out already (the host keeps that report): the flags
// are out of step, so waiting again would only add another timeout.
__device__ __forceinline__ bool timed_out_before(const P2PArgs& a) {
  const volatile u64* page = reinterpret_cast<const volatile u64*>(a.error_page);
  if (page[kErrSet] == 0) return false;
  const u64 kind = page[kErrKind];
  return kind == kErrFreedTimeout || kind == kErrLandedTimeout;
}

// Wait until *word >= want (call ``call``'s wait of kind ``kind`` for peer ``peer``). A wait
// that lasts past kPageCheckNs (far longer than a flag takes when the peer keeps up) reads the
// error page once, so the hot path never touches host memory.
constexpr u64 kPageCheckNs = 1000000;
__device__ __forceinline__ void wait_at_least(const u64* word, u64 want, const P2PArgs& a, int peer,
                                              int kind, u64 call) {
  const u64 start = globaltimer();
  bool page_read = false;
  u64 seen;
  while (true) {
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(seen) : "l"(word) : "memory");
    if (seen >= want) return;
    const u64 waited = globaltimer() - start;
    if (!page_read && waited > kPageCheckNs) {
      if (timed_out_before(a)) return;
      page_read = true;
    }
    if (waited > a.timeout_ns) break;
  }
  report(a, kind, peer, seen, want, call);
}

__device__ __forceinline__ void publish(u64* word, u64 value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(word), "l"(value) : "memory");
}

// Before publishing "landed" to peer p: our stamp of the pair, into p's stamp[rank].
__device__ __forceinline__ void stamp_for(const P2PArgs& a, int p) {
  flags_of(a, p)[kStamp + a.rank] = a.send_stamp[p];
}

// After "landed" from peer p (acquired): its stamp against ours.
__device__ __forceinline__ void check_stamp(const P2PArgs& a, int p, u64 call) {
  const u64 got = *reinterpret_cast<volatile const u64*>(flags_of(a, a.rank) + kStamp + p);
  if (got != a.recv_stamp[p]) report(a, kErrStamp, p, got, a.recv_stamp[p], call);
}

// Every block ends here: the last one to finish publishes ``value`` into ``word`` (this
// launch's stores are then visible to the peer) and, for the call's last launch, advances the
// counter. ``done`` counts finished blocks and is reset for the next launch of its kind.
__device__ __forceinline__ void finish(const P2PArgs& a, u64* done, u64* word, u64 value,
                                       bool stamp = false) {
  __threadfence_system();  // every thread's stores before the block counts as done
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned prev = atomicAdd(reinterpret_cast<unsigned*>(done), 1u);
    if (prev == gridDim.x - 1) {
      *reinterpret_cast<unsigned*>(done) = 0;
      if (stamp) stamp_for(a, a.peer);
      __threadfence_system();
      if (word != nullptr) publish(word, value);
      if (a.advance) flags_of(a, a.rank)[kCounter] = value;
    }
  }
}

__device__ __forceinline__ void copy_words(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n16,
                                           u32 block, u32 blocks) {
  const u64 stride = (u64)blocks * blockDim.x;
  for (u64 i = (u64)block * blockDim.x + threadIdx.x; i < n16; i += stride) dst[i] = src[i];
}

// The peer may take new records once it has decoded our previous call's.
__device__ __forceinline__ void wait_freed(const P2PArgs& a, u64 e) {
  if (threadIdx.x == 0) wait_at_least(flags_of(a, a.rank) + kFreed + a.peer, e - 1, a, a.peer, kErrFreedTimeout, e);
  __syncthreads();
}

__device__ __forceinline__ void wait_landed(const P2PArgs& a, u64 e) {
  if (threadIdx.x == 0) {
    wait_at_least(flags_of(a, a.rank) + kLanded + a.peer, e, a, a.peer, kErrLandedTimeout, e);
    if (blockIdx.x == 0) check_stamp(a, a.peer, e);
  }
  __syncthreads();
}

// An encode into peer a.peer's buffer once the peer is done with it, "landed" published by
// the last block; blocks past work_blocks copy the rows this rank keeps (src -> dst) meanwhile.
template <typename Encode>
__device__ __forceinline__ void encode_framed(const P2PArgs& a, const uint4* __restrict__ src,
                                              uint4* __restrict__ dst, Encode encode) {
  const u64 call = call_number(a);
  if ((int)blockIdx.x >= a.work_blocks) {
    copy_words(src, dst, a.copy_n16, blockIdx.x - a.work_blocks, gridDim.x - a.work_blocks);
  } else {
    wait_freed(a, call);
    encode();
  }
  finish(a, flags_of(a, a.rank) + kEncDone + a.peer, flags_of(a, a.peer) + kLanded + a.rank, call,
         true);
}

// A decode of peer a.peer's records out of our buffer once they have landed, "freed" published
// by the last block.
template <typename Decode>
__device__ __forceinline__ void decode_framed(const P2PArgs& a, Decode decode) {
  const u64 call = call_number(a);
  wait_landed(a, call);
  decode();
  finish(a, flags_of(a, a.rank) + kDecDone + a.peer, flags_of(a, a.peer) + kFreed + a.rank, call);
}

template <typename In, int BITS, bool SPIKES, bool SR, int V, int U, int DG>
__global__ void __launch_bounds__(kBlock) p2p_encode_int(const In* __restrict__ x, u8* __restrict__ rec,
                                                         const EncArgs e, const P2PArgs a,
                                                         const uint4* __restrict__ src, uint4* __restrict__ dst) {
  encode_framed(a, src, dst, [&] { encode_int_items<In, BITS, SPIKES, SR, V, U, DG>(x, rec, e); });
}

template <typename In, int V, int U>
__global__ void __launch_bounds__(kBlock) p2p_encode_fp8(const In* __restrict__ x, u8* __restrict__ rec,
                                                         const EncArgs e, const P2PArgs a,
                                                         const uint4* __restrict__ src, uint4* __restrict__ dst) {
  encode_framed(a, src, dst, [&] { encode_fp8_items<In, V, U>(x, rec, e); });
}

template <typename Out, int BITS, bool SPIKES, int V, int U>
__global__ void __launch_bounds__(kBlock) p2p_decode_int(const u8* __restrict__ rec, Out* __restrict__ y,
                                                         const DecArgs d, const P2PArgs a) {
  decode_framed(a, [&] { decode_int_items<Out, BITS, SPIKES, V, U>(rec, y, d); });
}

template <typename Out, int V, int U>
__global__ void __launch_bounds__(kBlock) p2p_decode_fp8(const u8* __restrict__ rec, Out* __restrict__ y,
                                                         const DecArgs d, const P2PArgs a) {
  decode_framed(a, [&] { decode_fp8_items<Out, V, U>(rec, y, d); });
}

// For calls with raw or copy-engine pairs: block 0 waits for / publishes to every peer as
// a.mode says (one thread per peer); blocks 1 and up copy copy_n16 words meanwhile. With
// a.advance the counter moves on at the end (the call's last step).
__global__ void p2p_sync(const P2PArgs a, const uint4* __restrict__ src, uint4* __restrict__ dst) {
  if (blockIdx.x > 0) {
    copy_words(src, dst, a.copy_n16, blockIdx.x - 1, gridDim.x - 1);
    return;
  }
  const u64 call = call_number(a);
  __syncthreads();  // every thread has read the counter before it can move
  const int p = threadIdx.x;
  if (p < a.world && p != a.rank) {
    u64* mine = flags_of(a, a.rank);
    u64* theirs = flags_of(a, p);
    if (a.mode & kWaitFreed) wait_at_least(mine + kFreed + p, call - 1, a, p, kErrFreedTimeout, call);
    __threadfence_system();  // this rank's earlier writes into p's buffer before the flags
    if (a.mode & kPublishLanded) {
      stamp_for(a, p);
      __threadfence_system();
      publish(theirs + kLanded + a.rank, call);
    }
    if (a.mode & kWaitLanded) {
      wait_at_least(mine + kLanded + p, call, a, p, kErrLandedTimeout, call);
      check_stamp(a, p, call);
    }
    if (a.mode & kPublishFreed) publish(theirs + kFreed + a.rank, call);
  }
  __syncthreads();
  if (threadIdx.x == 0 && a.advance) flags_of(a, a.rank)[kCounter] = call;
}

}  // namespace mfc

#ifdef MFC_P2P_INSTANTIATE_ALL
// CI (tools/check_csrc.sh): the wrappers of the default shapes for 16-bit tokens (the codec
// bodies themselves are compiled in every variant by the codec files).
namespace mfc {
#define MFC_P2P_INT(T, B) \
  (const void*)&p2p_encode_int<T, B, true, false, 32, 1, 128>, (const void*)&p2p_encode_int<T, B, true, false, 32, 1, 0>, \
  (const void*)&p2p_decode_int<T, B, true, 32, 1>
#define MFC_P2P_TYPE(T) \
  MFC_P2P_INT(T, 2), MFC_P2P_INT(T, 4), MFC_P2P_INT(T, 8), (const void*)&p2p_encode_fp8<T, 32, 1>, \
  (const void*)&p2p_decode_fp8<T, 8, 2>
extern const void* const all_p2p_kernels[] = {MFC_P2P_TYPE(__nv_bfloat16), MFC_P2P_TYPE(__half),
                                              (const void*)&p2p_sync};
}  // namespace mfc
#endif
