"""moe_flashcomm.Communicator over real gloo process groups: a process group destroyed and made
again with permuted ranks gives correct all-to-all and all-reduce results (no stale state),
close() and ``with``, the default communicators of the thin functions, and ranks that make
different communicators raise instead of hanging or aborting."""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

import moe_flashcomm as mf
from moe_flashcomm.comm import CommunicatorClosedError, ConfigMismatchError
from moe_flashcomm.comm.all_reduce import reference_all_reduce
from moe_flashcomm.comm.communicator import PROCESS
from tests.a2a_cases import expected, make_input
from tests.distributed import free_port, spawn

CODEC = mf.CodecConfig(bits=4)


def _a2a_ok(rank, world, seed):
    S = [[3] * world for _ in range(world)]
    x = make_input(rank, 3 * world, (64,), torch.float32, seed)
    got = mf.all_to_all(x, codec=CODEC, gate=False)
    assert torch.equal(got, expected(rank, world, S, (64,), torch.float32, seed, lambda p: CODEC))


def _ar_ok(rank, world, seed):
    inputs = [make_input(p, 3000, (), torch.float32, seed) for p in range(world)]
    y = inputs[rank].clone()
    mf.all_reduce(y, codec=CODEC, gate=False)
    assert torch.equal(y, reference_all_reduce(inputs, CODEC))


def _reinit(rank, world, port):
    _a2a_ok(rank, world, 1)
    _ar_ok(rank, world, 2)
    old = PROCESS.communicator(None, None, False)
    dist.destroy_process_group()
    new = (rank + 1) % world  # every rank takes another rank's place
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=new,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    _a2a_ok(new, world, 3)
    _ar_ok(new, world, 4)
    fresh = PROCESS.communicator(None, None, False)
    assert fresh is not old and fresh.rank == new and old.closed  # the dead group's was closed


def test_reinit_with_permuted_ranks_gloo_3():
    spawn(_reinit, 3, free_port())


def _lifetime(rank, world):
    x = make_input(rank, 4 * world, (32,), torch.float32, 5)
    with mf.Communicator(codec=8, gate=False) as comm:
        a = comm.all_to_all(x)
        assert torch.equal(a, mf.all_to_all(x, codec=8, gate=False))  # the same exchange
        assert comm.calls["all_to_all"] == 1
    assert comm.closed
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        mf.all_to_all([1.0, 2.0])
    with pytest.raises(CommunicatorClosedError, match="closed"):
        comm.all_to_all(x)
    # a backward that runs after close() raises too (on CUDA its buffers are freed), also
    # through an asynchronous call's handle
    comm = mf.Communicator(codec=8, gate=False)
    leaf = x.clone().requires_grad_()
    ys = [comm.all_to_all(leaf), comm.all_to_all(leaf, async_op=True).wait()]
    comm.close()
    for y in ys:
        with pytest.raises(CommunicatorClosedError, match="closed before the backward"):
            y.sum().backward()
    # a communicator made by the ranks with different settings raises on every rank, quickly
    start = time.monotonic()
    with pytest.raises(ConfigMismatchError, match="codec"):
        mf.Communicator(codec=4 if rank == 0 else 2)
    # environment settings that shape the wire or the peer buffers are part of the check
    for name, values in (("MOE_FLASHCOMM_P2P_MAX_MB", ("4096", "1024")),
                         ("MOE_FLASHCOMM_STAMPS", ("0", "1"))):
        os.environ[name] = values[rank]
        with pytest.raises(ConfigMismatchError, match="p2p" if "P2P" in name else "stamps"):
            mf.Communicator()
        os.environ.pop(name, None)
    # one rank makes a communicator while the others call: both sides raise, no abort
    comm = mf.Communicator(gate=False)
    with pytest.raises(ConfigMismatchError, match="different moe_flashcomm operation"):
        if rank == 0:
            mf.Communicator(gate=False, topology=1)
        else:
            comm.all_to_all(make_input(rank, 4 * world, (48,), torch.float32, 6))
    assert time.monotonic() - start < 10
    # and the group works afterwards
    assert torch.equal(comm.all_to_all(x), mf.all_to_all(x, gate=False))


def _freed_without_gc(rank, world):
    """A communicator dropped by its user is freed at once by reference counting, whatever
    it ran (its caches hold nothing that holds it back), so its buffers (on CUDA, up to
    MOE_FLASHCOMM_P2P_MAX_MB of peer memory) do not wait for the cyclic garbage collector;
    a backward or a handle made before keeps it alive until it has run."""
    import gc
    import weakref
    x = make_input(rank, 4 * world, (32,), torch.float32, 7)
    want = mf.all_to_all(x, codec=8, gate=False)
    gc.collect()
    gc.disable()
    try:
        for uses in ("none", "all_to_all", "backward", "handle", "all_reduce", "counts"):
            comm = mf.Communicator(codec=8, gate=False)
            if uses == "all_to_all":
                assert torch.equal(comm.all_to_all(x), want)
            elif uses == "backward":
                leaf = x.clone().requires_grad_()
                comm.all_to_all(leaf).sum().backward()
            elif uses == "handle":
                leaf = x.clone().requires_grad_()
                comm.all_to_all(leaf, async_op=True).wait().sum().backward()
            elif uses == "all_reduce":
                comm.all_reduce(x.clone())
            elif uses == "counts":
                comm.exchange_counts(torch.arange(2 * world))
            alive = weakref.ref(comm)
            del comm
            assert alive() is None, f"a communicator that ran {uses} outlived its last reference"
        # dropped before its backward / its handle's wait: they keep it until they ran
        comm = mf.Communicator(codec=8, gate=False)
        leaf = x.clone().requires_grad_()
        y, handle = comm.all_to_all(leaf), comm.all_to_all(leaf, async_op=True)
        alive = weakref.ref(comm)
        del comm
        assert torch.equal(handle.wait(), want)
        (y.sum() + handle.wait().sum()).backward()
        assert alive() is not None and torch.equal(leaf.grad, 2 * torch.ones_like(leaf))
        del y, handle
        assert alive() is None
    finally:
        gc.enable()


def test_a_dropped_communicator_is_freed_at_once_gloo_2():
    spawn(_freed_without_gc, 2)


def test_lifetime_and_disagreement_gloo_2():
    spawn(_lifetime, 2)


def _bad_arguments(rank, world):
    # the constructor's own checks name the field and what is allowed, before any collective
    for kwargs, pattern in ((dict(algorithm="ring"), r"algorithm must be one of \('flat'"),
                            (dict(timeout=0),
                             "timeout must be a number of seconds from 0.001 to 1e[+]09, got 0"),
                            (dict(timeout=-3.5), "got -3.5"), (dict(timeout=True), "got True"),
                            (dict(timeout="60"), "got '60'"), (dict(timeout=1e-7), "got 1e-07"),
                            (dict(timeout=float("inf")), "got inf"),
                            (dict(timeout=float("nan")), "got nan")):
        with pytest.raises(ValueError, match=pattern):
            mf.Communicator(**kwargs)
    # bad arguments on one rank only: it raises its own error, the others raise at once too
    # (it takes part in their consistency check, marked), instead of waiting for it
    for kwargs in (dict(timeout=-1), dict(timeout=1e15), dict(algorithm="ring"), dict(codec=9),
                   dict(gate=5)):
        start = time.monotonic()
        if rank == 0:
            with pytest.raises((ValueError, TypeError)):
                mf.Communicator(**kwargs)
        else:
            with pytest.raises(ConfigMismatchError,
                               match=r"ranks \[0\] of the group rejected their arguments"):
                mf.Communicator()
        assert time.monotonic() - start < 10, kwargs
    # a bad environment value on one rank: the same (the settings were read after the check,
    # and the other ranks waited for it until their timeout)
    for name, value in (("MOE_FLASHCOMM_P2P_MAX_MB", "abc"), ("MOE_FLASHCOMM_TIMEOUT_S", "-1"),
                        ("MOE_FLASHCOMM_P2P", "maybe")):
        start = time.monotonic()
        if rank == 0:
            before, os.environ[name] = os.environ.get(name), value
            try:
                with pytest.raises(ValueError, match=name):
                    mf.Communicator()
            finally:
                os.environ.pop(name)
                if before is not None:
                    os.environ[name] = before
        else:
            with pytest.raises(ConfigMismatchError,
                               match=r"ranks \[0\] of the group rejected their arguments"):
                mf.Communicator()
        assert time.monotonic() - start < 10, name
    alone = dist.new_group([0])  # (made by every rank; rank 1 is not in it)
    if rank == 1:
        with pytest.raises(ValueError, match="this process is not a member of `group`"):
            mf.Communicator(alone)
    comm = mf.Communicator(gate=False)
    # tokens of a shape all_to_all cannot route: every rank raises its own error, at once
    for x, pattern in ((torch.ones(8), r"at least 2-D \[tokens, ..., hidden\], got shape \(8,\)"),
                       (torch.ones(4, 0), r"hidden size x.shape\[-1\] >= 1 and < 2\*\*55 .*, "
                                          r"got shape \(4, 0\)"),
                       # (a header cannot hold it: it was blamed on output_split_sizes)
                       (torch.empty(0, 2**60), r"x.shape\[-1\] >= 1 and < 2\*\*55 \(what an "
                                               r"exchange's header holds\), got shape")):
        start = time.monotonic()
        with pytest.raises(ValueError, match=pattern):
            comm.all_to_all(x)
        assert time.monotonic() - start < 10
    x = make_input(rank, 4 * world, (32,), torch.float32, 11)  # and the group works afterwards
    assert torch.equal(comm.all_to_all(x, codec=8),
                       expected(rank, world, [[4] * world] * world, (32,), torch.float32, 11,
                                lambda p: mf.CodecConfig(bits=8)))
    # arguments equal to a call's made before, but of types that are refused, are refused
    # still (they found its cached plan)
    splits = [4] * world
    comm.all_to_all(x, splits, splits, codec=8, chunks=1)
    comm.all_reduce(x.clone(), codec=8, chunks=1)
    for kwargs, pattern in ((dict(output_split_sizes=[4.0] * world), "must be an int, got 4.0"),
                            (dict(codec=8.0), "got float"), (dict(chunks=1.0), "chunks"),
                            (dict(chunks=True), "chunks")):
        args = dict(output_split_sizes=splits, input_split_sizes=splits, codec=8, chunks=1)
        with pytest.raises((ValueError, TypeError), match=pattern):
            comm.all_to_all(x, **{**args, **kwargs})
        if "output_split_sizes" not in kwargs:
            with pytest.raises((ValueError, TypeError), match=pattern):
                comm.all_reduce(x.clone(), **{**dict(codec=8, chunks=1), **kwargs})
    comm.close()


def test_bad_arguments_name_the_field_gloo_2():
    spawn(_bad_arguments, 2, timeout=240, env={"MOE_FLASHCOMM_TIMEOUT_S": 30})


def test_communicator_outside_distributed_says_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        mf.Communicator()


def test_split_sizes_key_the_plan_cache_as_the_check_takes_them():
    """Python and numpy ints (which the split check accepts) key a call's cached plan; a float
    or a bool tensor (which the check refuses) is no key, so its call takes the checking path
    and is refused there."""
    import numpy as np
    from moe_flashcomm.comm.autograd import split_key
    assert split_key([3, 0, 5]) == split_key(np.array([3, 0, 5])) == split_key(torch.tensor([3, 0, 5])) \
        == (3, 0, 5)
    assert all(type(v) is int for v in split_key(np.array([3, 0, 5])))
    for bad in ([3.0, 0, 5], [2.5, 0.5], torch.tensor([1.0]), torch.tensor([True, False])):
        with pytest.raises(TypeError):
            split_key(bad)
