// The error page: pinned host memory, mapped into the device, where a kernel reports the first
// problem it meets (a stamp that differs, a wait that timed out); the host reads it with no
// synchronisation before its next call and raises. moe_flashcomm/kernels.py mirrors the words
// (P2P_ERROR_*) and moe_flashcomm/comm/p2p.py's ErrorPage owns the memory.
#pragma once
#include "codec_common.cuh"

namespace mfc {

// Words: claimed, then peer, the word seen, the word expected, call, kind; "reported" last
// (the host reads the others once it is set).
constexpr int kErrClaim = 0, kErrPeer = 1, kErrGot = 2, kErrWant = 3, kErrCall = 4, kErrKind = 5,
              kErrSet = 6;
// Kinds: a stamp that differs (an all-to-all), a wait for "freed" or for "landed" that timed
// out (peer-to-peer), a stamp that differs in an all-reduce's reduce-scatter, the same stamp
// there with another numel in the slot's second word.
constexpr int kErrStamp = 1, kErrFreedTimeout = 2, kErrLandedTimeout = 3, kErrReduceStamp = 4,
              kErrReduceNumel = 5;
// Exchanges another transport carries (NCCL) put each pair's records behind a slot of
// kStampBytes: the stamp, then a second word (the all-reduce's numel, else 0), so that the
// records stay 16-byte aligned.
constexpr int kStampBytes = 16;
// In place of a stamp: "the rank that wrote this saw ranks disagree in this call" (the
// hierarchical all-reduce passes it on to every rank; no stamp has all bits set).
constexpr u64 kSawDisagreement = ~0ull;

// The first problem (until the host has read it) goes to the page at ``page_address``.
__device__ __forceinline__ void report_error(u64 page_address, int kind, int p, u64 got, u64 want,
                                             u64 call) {
  u64* page = reinterpret_cast<u64*>(page_address);
  if (atomicCAS(reinterpret_cast<unsigned long long*>(page + kErrClaim), 0ull, 1ull) != 0ull) return;
  page[kErrPeer] = (u64)p;
  page[kErrGot] = got;
  page[kErrWant] = want;
  page[kErrCall] = call;
  page[kErrKind] = (u64)kind;
  __threadfence_system();
  *reinterpret_cast<volatile u64*>(page + kErrSet) = 1;
}

}  // namespace mfc
