// Stamp checks for records that another transport (NCCL) carried and that no decode or
// reduction kernel of ours reads: the passthrough codec's records (torch casts encode and
// decode them), records not 16-byte aligned (behind raw rows of odd size), and the
// passthrough all-reduce's torch-defined reduction. One warp compares the stamp in each
// listed slot with the one expected and reports a difference on the error page
// (error_page.cuh); the host raises at its next call. moe_flashcomm/kernels.py mirrors
// StampTable (stamp_check_launches); comm/exchange.py (StampedCall) and comm/all_reduce.py
// launch it.
#include "error_page.cuh"

namespace mfc {

constexpr int kStampChecks = 32;  // slots per launch: one per lane of the warp

struct StampTable {
  u64 offset[kStampChecks];  // slot i: bytes from the base pointer (any alignment)
  u64 want[kStampChecks];    // the stamp expected there
  int peer[kStampChecks];    // the group rank that wrote it (named in a report)
  u64 error_page;            // pinned host memory, mapped
  u64 slot_stamp;            // with a slot to write: its stamp where nothing differed
  int n;                     // slots listed (at most kStampChecks)
  int kind;                  // what a difference is reported as (kErrStamp, kErrReduceStamp)
};

// One block of one warp. ``slot`` (or null): after the check, lane 0 writes a slot of
// kStampBytes there, slot_stamp or kSawDisagreement where a stamp differed or the page holds a
// report (an earlier check of this call), as the fused reduction's check_stamps does.
__global__ void check_stamp_table(const u8* __restrict__ base, u8* __restrict__ slot,
                                  const StampTable t) {
  const int i = threadIdx.x;
  bool differs = false;
  if (i < t.n) {
    const u8* at = base + t.offset[i];
    u64 got = 0;
#pragma unroll
    for (int b = 7; b >= 0; --b) got = got << 8 | at[b];  // little-endian, byte by byte
    if (got != t.want[i]) {
      report_error(t.error_page, t.kind, t.peer[i], got, t.want[i], 0);
      differs = true;
    }
  }
  const bool any = __any_sync(~0u, differs);
  if (slot != nullptr && i == 0) {
    const bool reported = *reinterpret_cast<const volatile u64*>(t.error_page + 8 * kErrSet) != 0;
    u64* s = reinterpret_cast<u64*>(slot);
    s[0] = any || reported ? kSawDisagreement : t.slot_stamp;
    s[1] = 0;
  }
}

}  // namespace mfc
