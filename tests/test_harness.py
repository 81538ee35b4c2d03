"""tests/distributed.spawn itself: what passes, what fails, and what is only a warning."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import spawn


def _sum(rank, world):
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [world, world]


def _raise_on_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 then fails too: the connection closes


def _abort_after_passing(rank, world):
    dist.barrier()
    import atexit
    atexit.register(os.abort)  # as DeepSpeed's CPU teardown sometimes does


def _abort_before_passing(rank, world):
    dist.barrier()
    if rank == 0:
        os.abort()


def _hang(rank, world):
    time.sleep(60)


def test_a_passing_function_passes():
    spawn(_sum, 3)


def test_an_exception_fails_with_the_first_failing_rank_first():
    with pytest.raises(AssertionError, match=r"(?s)^rank 1 of 2 failed.*boom on rank 1"):
        spawn(_raise_on_1, 2)


def test_an_abort_in_teardown_after_passing_is_a_warning():
    with pytest.warns(UserWarning, match="passed, then ended with SIGABRT in interpreter teardown"):
        spawn(_abort_after_passing, 2)


def test_an_abort_before_passing_fails():
    with pytest.raises(RuntimeError, match="rank 0 ended with SIGABRT before it passed"):
        spawn(_abort_before_passing, 2)


def test_a_hang_fails_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        spawn(_hang, 2, timeout=5)
    assert time.monotonic() - start < 30
