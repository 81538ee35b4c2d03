"""Edge cases of the quantized all-reduce and of the hierarchical (two-level) paths over real
gloo process groups (CPU): what one rank does differently must make every rank raise at once,
never wait out a timeout."""
from __future__ import annotations

import time

import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm.comm import ConfigMismatchError
from tests.distributed import spawn

# a peer that never answers is named after this many seconds; the checks below must be
# far quicker (a disagreement is seen in the first exchange)
TIMEOUT_S = 30
ENV4 = {"LOCAL_WORLD_SIZE": 2, "MOE_FLASHCOMM_TIMEOUT_S": TIMEOUT_S}  # 2 nodes x 2 ranks


def _raises_quickly(fn, what: str) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigMismatchError):
        fn()
    took = time.monotonic() - start
    assert took < TIMEOUT_S / 3, f"{what}: raised after {took:.1f} s (the peers' timeout)"


# ---- the hierarchical all-reduce's stage groups ---------------------------------------------
def _hierarchical_empty_on_one_rank(rank, world):
    """The first hierarchical all-reduce of the job, one rank's tensor empty (numels differ).
    The stage groups (dist.new_group, collective over the job) were made only on the ranks
    with values, after the size decision: they waited in new_group for the rank that took
    the backend's sum, which waited for them in its exchange, until the timeout (then a
    PeerTimeoutError saying the others "did not make this call")."""
    x = torch.ones(0 if rank == 1 else 4097)
    _raises_quickly(lambda: mf.all_reduce(x, codec=4, gate=False, algorithm="hierarchical"),
                    "all_reduce(hierarchical), numel 0 on one rank")
    # and the group works afterwards
    y = torch.full((4097,), float(rank))
    mf.all_reduce(y, codec=4, gate=False, algorithm="hierarchical")
    assert torch.equal(y, torch.full_like(y, 6.0))


def test_hierarchical_all_reduce_empty_on_one_rank_raises_at_once():
    spawn(_hierarchical_empty_on_one_rank, 4, env=ENV4, timeout=150)


# ---- the all-to-all's "auto" algorithm --------------------------------------------------------
def _auto_rows_differ(rank, world):
    """The first all_to_all(algorithm="auto") of the job, even splits, one rank with more rows
    (a caller's error the exchange's headers report). "auto" decides by the per-pair size,
    here this rank's own: rank 3 (4 MiB per pair) took the flat algorithm, the others the
    hierarchical one, whose stage groups they then made alone: they waited in new_group,
    rank 3 in its exchange, until the timeout, and the group was broken afterwards."""
    rows = 2048 if rank == 3 else 1  # per peer; bf16 rows of 1024 values: 4 MiB vs 2 KiB
    x = torch.ones(world * rows, 1024, dtype=torch.bfloat16)
    _raises_quickly(lambda: mf.all_to_all(x, codec="native", algorithm="auto"),
                    "all_to_all(auto), rows differ on one rank")
    y = torch.full((world, 1024), float(rank), dtype=torch.bfloat16)
    out = mf.all_to_all(y, codec="native", algorithm="auto")
    assert torch.equal(out, torch.arange(world, dtype=torch.bfloat16)[:, None].expand(world, 1024))


def test_auto_all_to_all_rows_differ_raises_at_once():
    spawn(_auto_rows_differ, 4, env=ENV4, timeout=150)


# ---- the specification ------------------------------------------------------------------------
def test_reference_all_reduce_checks_its_arguments():
    """reference_all_reduce (the executable specification): a local_size that does not
    divide the number of inputs raised IndexError from deep inside (3 or 5 of 4 inputs) or,
    given 0, ran the hierarchical algorithm with one group of every rank; inputs of other
    numels were summed as if they were one size (a result, no error)."""
    from moe_flashcomm.comm.all_reduce import reference_all_reduce
    xs = [torch.randn(3000) for _ in range(4)]
    for bad in (0, 3, 5, 8, 2.0, True):
        with pytest.raises(ValueError, match="local_size must be None or an int >= 1 dividing"):
            reference_all_reduce(xs, 4, local_size=bad)
    with pytest.raises(ValueError, match="all of one shape and dtype"):
        reference_all_reduce([torch.randn(3), torch.randn(4)], 4)
    with pytest.raises(ValueError, match="all of one shape and dtype"):
        reference_all_reduce([torch.randn(3), torch.randn(3).half()], 4)
    # valid layouts still agree with each other where they must (one group == flat)
    assert torch.equal(reference_all_reduce(xs, 4, local_size=4), reference_all_reduce(xs, 4))
