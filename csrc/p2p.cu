// Signalling of the peer-to-peer transport inside one node (moe_flashcomm/comm/p2p.py).
//
// Every rank owns, in device memory its peers map through CUDA IPC, per peer p:
//   landed[p]  the last call whose records from p have landed in our buffer (p writes it);
//   freed[p]   the last call for which p has decoded our records out of its buffer (p writes it);
// and, for itself only, the call counter, one block-completion count per task kind and peer,
// and p2p_exchange's ticket and block counters. Call e = counter + 1 of every rank:
//   * before writing into peer p's buffer, wait until freed[p] >= e - 1;
//   * after our records for p have landed there, publish landed_p[rank] = e (release, system);
//   * before decoding p's records, wait until landed[p] >= e (acquire, system);
//   * after decoding them, publish freed_p[rank] = e; the call's last launch stores counter = e.
// The call number lives on the device, so a captured CUDA graph replays correctly: no host
// state reaches the kernels. The common call is one launch, p2p_exchange_*: it encodes into
// every peer, copies the rows a rank keeps and decodes every peer's records, each pair's waits
// and publications around its own blocks. Where the copy engine moves a pair's records, a
// p2p_exchange launch in kStage mode first encodes them into a local staging buffer (its
// encodes wait for "freed", publish nothing, and the call number stays); after the copies, the
// call's last p2p_exchange publishes "landed" for those pairs from tasks without rows. Calls
// with raw, stochastic or mixed-codec pairs use p2p_sync between their copies and codec
// launches instead; all keep the same per-pair flags. Its LOCAL variant serves exchanges
// that another transport carries (NCCL): one launch encodes every peer's records into a local
// send buffer, each behind its stamp, and one decodes a receive buffer after checking each
// stamp; no flags are used.
// A wait that lasts timeout_ns (a rank died, or the ranks made different calls) gives up and
// is reported on the error page (error_page.cuh); later waits of this rank then give up at
// once, so neither a hang nor an abort follows and the host raises at its next call.
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
#include "error_page.cuh"

namespace mfc {

constexpr int kMaxPeers = 16;
// Word offsets in a rank's flag allocation.
constexpr int kLanded = 0, kFreed = kMaxPeers, kCounter = 2 * kMaxPeers,
              kEncDone = 2 * kMaxPeers + 1, kDecDone = 3 * kMaxPeers + 1,
              kStamp = 4 * kMaxPeers + 1, kTicket = 5 * kMaxPeers + 1, kDone = 5 * kMaxPeers + 2;

struct P2PArgs {
  u64 peer_flags[kMaxPeers];  // device address (in this process) of each rank's flag words
  u64 send_stamp[kMaxPeers];  // this call's stamp of the pair towards each peer
  u64 recv_stamp[kMaxPeers];  // the stamp expected from each peer
  u64 error_page;             // pinned host memory, mapped (kErr* words)
  u64 timeout_ns;
  u64 copy_n16;               // 16-byte words the copy blocks copy (the rows a rank keeps)
  u64 stamp_detail;           // LOCAL: the word after each stamp (the all-reduce's numel; 0)
  int rank, world;
  int mode;                   // p2p_sync: what to do (kWait* / kPublish* bits); p2p_exchange: kStage;
                              // its LOCAL variant: the kind a differing stamp is reported as (0: kErrStamp)
  int advance;                // the call's last launch: store counter = e at its end
};

constexpr int kWaitFreed = 1, kPublishLanded = 2, kWaitLanded = 4, kPublishFreed = 8;
// p2p_exchange's encodes write to y + remote (a staging buffer) and publish nothing
constexpr int kStage = 16;
// In p2p_exchange's LOCAL variant the tasks are local (another transport moves the bytes): an
// encode writes its records at y + remote and, in the kStampBytes before them (error_page.cuh),
// send_stamp[its task]; a decode compares the kStampBytes before x + remote with
// recv_stamp[its task] and decodes the records there. Nothing waits or publishes, and a
// block's index is its ticket.

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
  report_error(a.error_page, kind, p, got, want, call);
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

__device__ __forceinline__ void copy_words(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n16,
                                           u32 block, u32 blocks) {
  const u64 stride = (u64)blocks * blockDim.x;
  for (u64 i = (u64)block * blockDim.x + threadIdx.x; i < n16; i += stride) dst[i] = src[i];
}

// One task of p2p_exchange: the encode of the rows for one peer, or the decode of one peer's
// records.
struct ExchangeTask {
  u64 offset;  // byte offset of the rows in x (encode) or in y (decode)
  u64 remote;  // our region in the peer's buffer (encode), the peer's region in ours (decode)
  u32 items;   // the codec's items (the total of its args); 0: no rows, the flags only
  u32 first;   // the task's first ticket
  u32 blocks;
  int peer;
};

struct ExchangeArgs {
  ExchangeTask task[2 * (kMaxPeers - 1)];  // the encodes, then the decodes, in ticket order
  u64 keep_src, keep_dst;                  // byte offsets in x and y of the rows this rank keeps
  u32 keep_first, keep_blocks;             // the tickets of their copy (a.copy_n16 words)
  int sends, tasks;                        // encode tasks; all tasks
};

// The task that holds ``ticket`` among tasks [lo, hi) (in ticket order).
__device__ __forceinline__ int task_of(const ExchangeArgs& t, u32 ticket, int lo, int hi) {
  int i = lo;
  while (i + 1 < hi && ticket >= t.task[i + 1].first) ++i;
  return i;
}

// A task's blocks end here: the last one to finish publishes ``value`` into the peer's
// ``word`` (none: nullptr), after every block's stores (and, for an encode, our stamp of the
// pair).
__device__ __forceinline__ void finish_task(const P2PArgs& a, u64* done, u32 blocks, u64* word, u64 value,
                                            int stamp_peer) {
  __threadfence_system();  // every thread's stores before the block counts as done
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(reinterpret_cast<unsigned*>(done), 1u) == blocks - 1) {
    *reinterpret_cast<unsigned*>(done) = 0;
    if (word == nullptr) return;
    if (stamp_peer >= 0) stamp_for(a, stamp_peer);
    __threadfence_system();
    publish(word, value);
  }
}

// A whole call in one launch. Blocks take tickets in the order they start: first the encodes
// into each peer's buffer, then the copy of the rows this rank keeps, then the decodes of each
// peer's records. A block that waits (for a peer's "freed" or "landed") never holds back an
// encode of this rank, since every encode ticket went to a block that already runs or ran.
// The launch's last block starts the tickets again at 0 and, in the call's last launch, moves
// the call number on. LOCAL: see kStampBytes (a variant of its own, so that the transport's
// kernels keep their registers).
template <bool LOCAL, typename T, typename Encode, typename Decode>
__device__ __forceinline__ void exchange(const T* x, T* y, const EncArgs& e, const DecArgs& d,
                                         const ExchangeArgs& t, const P2PArgs& a, Encode encode,
                                         Decode decode) {
  __shared__ u32 block_ticket;
  constexpr bool local = LOCAL;
  u64* mine = local ? nullptr : flags_of(a, a.rank);
  if constexpr (!local) {
    if (threadIdx.x == 0) block_ticket = atomicAdd(reinterpret_cast<unsigned*>(mine + kTicket), 1u);
    __syncthreads();
  }
  const u32 ticket = local ? blockIdx.x : block_ticket;
  const u64 call = local ? 0 : call_number(a);
  const char* xb = reinterpret_cast<const char*>(x);
  char* yb = reinterpret_cast<char*>(y);
  if (ticket < t.keep_first) {  // encode (into the peer's buffer, or staging) once the peer is done with it
    const int i = task_of(t, ticket, 0, t.sends);
    const ExchangeTask& k = t.task[i];
    if constexpr (!local) {
      if (threadIdx.x == 0) wait_at_least(mine + kFreed + k.peer, call - 1, a, k.peer, kErrFreedTimeout, call);
      __syncthreads();
    }
    const bool staged = local || (a.mode & kStage);
    u8* rec = staged ? reinterpret_cast<u8*>(yb + k.remote) : reinterpret_cast<u8*>(k.remote);
    if (k.items) {
      EncArgs task = e;  // the codec's arguments for this task's rows
      task.total = k.items;
      encode(reinterpret_cast<const T*>(xb + k.offset), rec, task, ticket - k.first);
    }
    if constexpr (local) {
      if (ticket == k.first && threadIdx.x == 0) {
        u64* slot = reinterpret_cast<u64*>(rec - kStampBytes);
        slot[0] = a.send_stamp[i];
        slot[1] = a.stamp_detail;
      }
    } else {
      finish_task(a, mine + kEncDone + k.peer, k.blocks,
                  staged ? nullptr : flags_of(a, k.peer) + kLanded + a.rank, call, k.peer);
    }
  } else if (ticket < t.keep_first + t.keep_blocks) {
    copy_words(reinterpret_cast<const uint4*>(xb + t.keep_src), reinterpret_cast<uint4*>(yb + t.keep_dst),
               a.copy_n16, ticket - t.keep_first, t.keep_blocks);
  } else {  // decode the peer's records once they have landed
    const int i = task_of(t, ticket, t.sends, t.tasks);
    const ExchangeTask& k = t.task[i];
    const u8* rec = local ? reinterpret_cast<const u8*>(xb + k.remote) : reinterpret_cast<const u8*>(k.remote);
    if constexpr (local) {
      if (ticket == k.first && threadIdx.x == 0) {
        const u64 got = *reinterpret_cast<const u64*>(rec - kStampBytes);
        const u64 want = a.recv_stamp[i - t.sends];
        if (got != want) report(a, a.mode ? a.mode : kErrStamp, k.peer, got, want, 0);
      }
    } else {
      if (threadIdx.x == 0) {
        wait_at_least(mine + kLanded + k.peer, call, a, k.peer, kErrLandedTimeout, call);
        if (ticket == k.first) check_stamp(a, k.peer, call);
      }
      __syncthreads();
    }
    if (k.items) {
      DecArgs task = d;
      task.total = k.items;
      decode(rec, reinterpret_cast<T*>(yb + k.offset), task, ticket - k.first);
    }
    if constexpr (!local) finish_task(a, mine + kDecDone + k.peer, k.blocks, flags_of(a, k.peer) + kFreed + a.rank, call, -1);
  }
  if constexpr (local) return;
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(reinterpret_cast<unsigned*>(mine + kDone), 1u) == gridDim.x - 1) {
    *reinterpret_cast<unsigned*>(mine + kDone) = 0;
    *reinterpret_cast<unsigned*>(mine + kTicket) = 0;
    if (a.advance) mine[kCounter] = call;
  }
}

// The codec's encode and decode of one wire as p2p_exchange's tasks.
template <typename T, int BITS, bool SPIKES, int EV, int EU, int DG, int DV, int DU, bool LOCAL>
__global__ void __launch_bounds__(kBlock, 4) p2p_exchange_int(const T* __restrict__ x, T* __restrict__ y,
                                                              const EncArgs e, const DecArgs d,
                                                              const ExchangeArgs t, const P2PArgs a) {
  exchange<LOCAL>(x, y, e, d, t, a,
           [](const T* src, u8* rec, const EncArgs& task, u32 block) {
             encode_int_items<T, BITS, SPIKES, false, EV, EU, DG>(src, rec, task, block);
           },
           [](const u8* rec, T* dst, const DecArgs& task, u32 block) {
             decode_int_items<T, BITS, SPIKES, DV, DU>(rec, dst, task, block);
           });
}

template <typename T, int EV, int EU, int DV, int DU, bool LOCAL>
__global__ void __launch_bounds__(kBlock, 4) p2p_exchange_fp8(const T* __restrict__ x, T* __restrict__ y,
                                                              const EncArgs e, const DecArgs d,
                                                              const ExchangeArgs t, const P2PArgs a) {
  exchange<LOCAL>(x, y, e, d, t, a,
           [](const T* src, u8* rec, const EncArgs& task, u32 block) { encode_fp8_items<T, EV, EU>(src, rec, task, block); },
           [](const u8* rec, T* dst, const DecArgs& task, u32 block) { decode_fp8_items<T, DV, DU>(rec, dst, task, block); });
}

// The passthrough's casts (encode_cast_items, decode_cast_items) as p2p_exchange's tasks.
template <typename T, bool LOCAL>
__global__ void __launch_bounds__(kBlock, 4) p2p_exchange_cast(const T* __restrict__ x, T* __restrict__ y,
                                                               const EncArgs e, const DecArgs d,
                                                               const ExchangeArgs t, const P2PArgs a) {
  exchange<LOCAL>(x, y, e, d, t, a,
           [](const T* src, u8* rec, const EncArgs& task, u32 block) { encode_cast_items<T>(src, rec, task, block); },
           [](const u8* rec, T* dst, const DecArgs& task, u32 block) { decode_cast_items<T>(rec, dst, task, block); });
}

// For calls with raw, stochastic or mixed-codec pairs: block 0 waits for / publishes to every peer as
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
// CI (tools/check_csrc.sh): the wrappers of the default shapes for 16-bit tokens, both variants (the codec
// bodies themselves are compiled in every variant by the codec files).
namespace mfc {
#define MFC_P2P_INT(T, B, L) \
  (const void*)&p2p_exchange_int<T, B, true, 32, 1, 128, 32, 1, L>, \
  (const void*)&p2p_exchange_int<T, B, true, 32, 1, 0, 32, 1, L>
#define MFC_P2P_WAYS(T, L) \
  MFC_P2P_INT(T, 2, L), MFC_P2P_INT(T, 4, L), MFC_P2P_INT(T, 8, L), (const void*)&p2p_exchange_fp8<T, 32, 1, 8, 2, L>, \
  (const void*)&p2p_exchange_cast<T, L>
#define MFC_P2P_TYPE(T) MFC_P2P_WAYS(T, false), MFC_P2P_WAYS(T, true)
extern const void* const all_p2p_kernels[] = {MFC_P2P_TYPE(__nv_bfloat16), MFC_P2P_TYPE(__half),
                                              (const void*)&p2p_exchange_cast<float, false>,
                                              (const void*)&p2p_exchange_cast<float, true>,
                                              (const void*)&p2p_sync};
}  // namespace mfc
#endif
