// Signalling of the peer-to-peer transport inside one node (moe_flashcomm/comm/p2p.py).
//
// Every rank owns a flag word per sender (u64 [world]) in device memory that its peers map
// through CUDA IPC, and a call counter of its own in the same allocation. Each barrier
// takes the next number e = counter + 1, publishes it into flag[rank] of every peer
// (release, system scope), waits until every peer has published e into its own flags
// (acquire), and stores e back into the counter. The number lives on the device, so a
// captured CUDA graph replays correctly: no host state reaches the kernel.
// A call of the all-to-all runs two barriers: before its stores into the peers' buffers
// (every peer has decoded the previous call out of the receive buffer) and after them
// (every peer's records for us have landed).
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
  u64 counter;                // device address of this rank's barrier counter
  u64 timeout_ns;
  int rank, world;
};

__device__ __forceinline__ u64 globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Block 0: the barrier, one thread per peer. Blocks 1 and up (when the launch has them) copy
// n16 16-byte words from src to dst meanwhile: the rows a rank keeps, which cost no launch of
// their own this way and overlap the wait for the peers.
__global__ void p2p_barrier(const P2PArgs a, const uint4* __restrict__ src, uint4* __restrict__ dst,
                            u64 n16) {
  if (blockIdx.x > 0) {
    const u64 stride = (u64)(gridDim.x - 1) * blockDim.x;
    for (u64 i = (u64)(blockIdx.x - 1) * blockDim.x + threadIdx.x; i < n16; i += stride) dst[i] = src[i];
    return;
  }
  u64* counter = reinterpret_cast<u64*>(a.counter);
  const u64 epoch = *counter + 1;
  __syncthreads();  // every thread has read the counter before it moves on
  const int p = threadIdx.x;
  if (p < a.world && p != a.rank) {
    u64* theirs = reinterpret_cast<u64*>(a.peer_flags[p]) + a.rank;
    const u64* mine = reinterpret_cast<const u64*>(a.peer_flags[a.rank]) + p;
    __threadfence_system();  // this rank's writes into peer p's buffer before the flag
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(theirs), "l"(epoch) : "memory");
    const u64 start = globaltimer();
    u64 seen;
    do {
      asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(seen) : "l"(mine) : "memory");
      if (seen >= epoch) break;
      if (globaltimer() - start > a.timeout_ns) {
        printf("moe_flashcomm peer-to-peer: rank %d waited %llu s for rank %d at barrier %llu "
               "(it saw %llu): a rank died or the ranks called different collectives\n",
               a.rank, a.timeout_ns / 1000000000ull, p, epoch, seen);
        __trap();
      }
    } while (true);
    __threadfence_system();
  }
  if (threadIdx.x == 0) *counter = epoch;
}

}  // namespace mfc
