// Signalling of the peer-to-peer all-to-all inside one node (moe_flashcomm/comm/p2p.py).
//
// Every rank owns a flag word per sender (u64 [world]) in device memory that its peers map
// through CUDA IPC. Call e of the all-to-all: each rank writes its records straight into
// its peers' receive buffers (the encode kernels, earlier on the same stream), then this
// kernel publishes e into flag[rank] of every peer (release, system scope) and waits until
// every peer has published e into its own flags (acquire): after it, the bytes of call e
// from every peer are visible to the decode kernels that follow on the stream.
// A peer that never arrives (a rank died, or ranks called different collectives) ends the
// wait after timeout_ns with a message and a trap, so the job fails instead of hanging.
#ifndef __CUDACC_RTC__
#include <cstdio>  // printf (NVRTC has it built in)
#endif

namespace mfc {

typedef unsigned long long u64;
constexpr int kMaxPeers = 16;

struct P2PArgs {
  u64 peer_flags[kMaxPeers];  // device address (in this process) of each rank's flag words
  u64 epoch;                  // this call's number, > every earlier one
  u64 timeout_ns;
  int rank, world;
};

__device__ __forceinline__ u64 globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void p2p_barrier(const P2PArgs a) {
  const int p = threadIdx.x;  // one thread per peer
  if (p >= a.world || p == a.rank) return;
  u64* theirs = reinterpret_cast<u64*>(a.peer_flags[p]) + a.rank;
  const u64* mine = reinterpret_cast<const u64*>(a.peer_flags[a.rank]) + p;
  __threadfence_system();  // this rank's writes into peer p's buffer before the flag
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(theirs), "l"(a.epoch) : "memory");
  const u64 start = globaltimer();
  u64 seen;
  do {
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(seen) : "l"(mine) : "memory");
    if (seen >= a.epoch) break;
    if (globaltimer() - start > a.timeout_ns) {
      printf("moe_flashcomm p2p all-to-all: rank %d waited %llu s for rank %d at call %llu "
             "(it saw call %llu): a rank died or the ranks called different collectives\n",
             a.rank, a.timeout_ns / 1000000000ull, p, a.epoch, seen);
      __trap();
    }
  } while (true);
  __threadfence_system();
}

}  // namespace mfc
