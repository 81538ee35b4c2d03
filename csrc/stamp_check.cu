// Stamp checks for records that another transport (NCCL) carried and that no launch of
// p2p_exchange decodes: records not 16-byte aligned behind raw rows of odd size, which the
// codec's own kernels decode. One warp compares the stamp in each listed slot with the one
// expected and reports a difference on the error page (error_page.cuh); the host raises at
// its next call. moe_flashcomm/kernels.py mirrors StampTable (stamp_check_launches);
// comm/exchange.py (StampedCall) launches it.
#include "error_page.cuh"

namespace mfc {

constexpr int kStampChecks = 32;  // slots per launch: one per lane of the warp

struct StampTable {
  u64 offset[kStampChecks];  // slot i: bytes from the base pointer (any alignment)
  u64 want[kStampChecks];    // the stamp expected there
  int peer[kStampChecks];    // the group rank that wrote it (named in a report)
  u64 error_page;            // pinned host memory, mapped
  int n;                     // slots listed (at most kStampChecks)
  int kind;                  // what a difference is reported as (kErrStamp, kErrReduceStamp)
};

// One block of one warp, a lane per slot.
__global__ void check_stamp_table(const u8* __restrict__ base, const StampTable t) {
  const int i = threadIdx.x;
  if (i < t.n) {
    const u8* at = base + t.offset[i];
    u64 got = 0;
#pragma unroll
    for (int b = 7; b >= 0; --b) got = got << 8 | at[b];  // little-endian, byte by byte
    if (got != t.want[i]) report_error(t.error_page, t.kind, t.peer[i], got, t.want[i], 0);
  }
}

}  // namespace mfc
