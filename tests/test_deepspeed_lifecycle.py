"""The life of a patched DeepSpeed model across calls of enable_deepspeed: a call that changes
one layer's gate keeps the communicator the other layers share, a call that raises leaves the
model as it was, pipeline stages without MoE layers take part, and a pickled model carries
its gate's tables. Each check here failed before its fix.

CPU only (gloo, 2 ranks), one spawn: the machine running CI has 2 cores.
"""
from __future__ import annotations

import datetime
import io
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

pytest.importorskip("deepspeed")

import moe_flashcomm as mf  # noqa: E402
from moe_flashcomm.comm.gate import SizeGate  # noqa: E402
from moe_flashcomm.integrations import exchange_stats  # noqa: E402
from tests.distributed import free_port, spawn  # noqa: E402
from tests.test_deepspeed import (H, PASS, Stack, assert_identical, init_deepspeed,  # noqa: E402
                                  make_moe, mlp, run, tokens)

_ATTR = "_moe_flashcomm"


def _states(model: nn.Module) -> list:
    return [vars(m)[_ATTR] for m in model.modules() if _ATTR in vars(m)]


def check_one_layer_changes_its_gate(tag: str) -> None:
    """Two layers of one expert-parallel group share a communicator. Enabled again between a
    forward and its backward with a rule that gives one of them another gate, the other keeps
    the shared communicator (README: kept while its gate stays), so the backward runs. With
    the first layer's gate changed, its old communicator was closed when it got its new one,
    before the second layer kept that very object: CommunicatorClosedError."""
    ep = dist.get_world_size()
    model = Stack([make_moe(2 * ep, ep, 2, True, seed=1), make_moe(2 * ep, ep, 2, True, seed=2)])
    x = tokens((2, 8, H), seed=10 + dist.get_rank())
    ref = run(model, x)
    for index in (0, 1):
        mf.enable_deepspeed(model, PASS)
        shared = _states(model)[0].comm
        assert all(s.comm is shared for s in _states(model)), tag
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_()
        y, aux = model(xg)
        mf.enable_deepspeed(model, {**PASS, "layers": [{"index": index, "gate": False}]})
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        ((y.float() * w).sum() + aux).backward()  # raised CommunicatorClosedError (index 0)
        got = (y.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()
                                     if p.grad is not None})
        assert_identical(ref, got, f"{tag} layer {index} with another gate")
        changed, kept = _states(model)[index], _states(model)[1 - index]
        assert kept.comm is shared and not shared.closed, (tag, index)
        assert changed.comm is not shared and not changed.comm.closed, (tag, index)
        assert_identical(ref, run(model, x), f"{tag} layer {index}, next step")
        mf.disable_deepspeed(model)
        assert shared.closed and changed.comm.closed, (tag, index)


def check_a_failed_call_changes_nothing(tag: str) -> None:
    """A call that raises after the ranks agreed (here: making a communicator, with
    MOE_FLASHCOMM_P2P set on one rank only) leaves the model as it was: stock where it was
    stock, else patched as before, with the same state, config, counters and open
    communicator. The layers stayed patched, and the next forward raised again."""
    ep, rank = dist.get_world_size(), dist.get_rank()
    moe = make_moe(2 * ep, ep, 1, True, seed=3)
    x = tokens((2, 8, H), seed=20 + rank)
    ref = run(moe, x)

    def failing(config):
        if rank == 1:
            os.environ["MOE_FLASHCOMM_P2P"] = "0"
        try:
            with pytest.raises(mf.comm.ConfigMismatchError, match="ranks of the group disagree"):
                mf.enable_deepspeed(moe, config)
        finally:
            os.environ.pop("MOE_FLASHCOMM_P2P", None)

    failing(PASS)
    assert exchange_stats(moe) == {} and not _states(moe), tag
    assert "forward" not in vars(moe.deepspeed_moe), tag
    assert_identical(ref, run(moe, x), f"{tag} stock after a failed enable")

    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
    assert_identical(ref, run(moe, x), f"{tag} enabled")
    (state,) = _states(moe)
    config, comm = state.config, state.comm
    failing({**PASS, "dispatch": 8, "gate": False})  # another gate: a new communicator
    assert _states(moe) == [state] and state.config == config, tag
    assert state.comm is comm and not comm.closed and state.owns_comm, tag
    assert exchange_stats(moe) == {"deepspeed_moe": stats} and stats.exchanges == 4, tag
    assert_identical(ref, run(moe, x), f"{tag} enabled as before after a failed enable")
    assert stats.quantized_exchanges == 0, tag
    mf.disable_deepspeed(moe)
    assert comm.closed, tag


def check_pipeline_stages_with_other_moe_layers(tag: str) -> None:
    """Pipeline stages hold different layers: rank 0 none, or fewer MoE layers than rank 1.
    A stage without MoE layers takes part and enables nothing, and an index rule counts the
    MoE layers of each stage's own model: it is an error only past the last MoE layer of
    every rank (raised on every rank), and so is a job with no MoE layer at all. Both made
    every rank raise ("holds no DeepSpeed MoE layer", "index ... out of range")."""
    rank = dist.get_rank()
    x = tokens((2, 8, H), seed=30 + rank)
    # (DeepSpeed makes its expert-parallel groups job-wide: every rank builds each layer)
    moe = make_moe(2, 1, 1, True, seed=4)
    model = nn.Sequential(mlp(H)) if rank == 0 else nn.Sequential(moe)
    ref = run(moe, x)
    enabled = mf.enable_deepspeed(model, PASS)
    assert list(enabled) == ([] if rank == 0 else ["0.deepspeed_moe"]), tag
    if rank == 1:
        assert_identical(ref, run(moe, x), f"{tag} the stage with the MoE layer")
    mf.disable_deepspeed(model)

    a, b = make_moe(2, 1, 1, True, seed=5), make_moe(2, 1, 1, True, seed=6)
    stage = Stack([a]) if rank == 0 else Stack([a, b])
    enabled = mf.enable_deepspeed(stage, {**PASS, "layers": [{"index": 1, "dispatch": 8}]})
    assert len(enabled) == 1 + rank, tag
    dispatch = [s.config.dispatch for s in _states(stage)]
    assert dispatch == [mf.LinkCodecs("bf16", "bf16"), mf.LinkCodecs(8, 8)][:1 + rank], tag
    with pytest.raises(mf.config.ConfigError,
                       match=r"layers\[0\]\.index: 2 is out of range, no rank's model has more "
                             r"than 2 DeepSpeed MoE layer\(s\)"):
        mf.enable_deepspeed(stage, {**PASS, "layers": [{"index": 2, "dispatch": 8}]})
    # one rank's rule past every rank's last layer: that rank names it, the others raise too
    rules = [{"index": 3, "dispatch": 8}] if rank == 0 else []
    with pytest.raises(mf.comm.ConfigMismatchError if rank else mf.config.ConfigError,
                       match=r"failed on rank\(s\) \[0\]|index: 3 is out of range"):
        mf.enable_deepspeed(stage, {**PASS, "layers": rules})
    assert [s.config.dispatch for s in _states(stage)] == dispatch, tag  # as it was
    mf.disable_deepspeed(stage)
    with pytest.raises(ValueError, match="Linear holds no DeepSpeed MoE layer .*, nor does the "
                                         "model of any other rank"):
        mf.enable_deepspeed(nn.Linear(H, H), PASS)


def check_a_deleted_model_is_freed_at_once(tag: str) -> None:
    """A patched model deleted after a forward and backward is freed by reference counting,
    as a stock one is: its layers and weights, and the communicator enable_deepspeed made
    for them (on CUDA, its peer memory), without waiting for the cyclic garbage collector.
    (A patched method held its layer, and a communicator its calls and framing held.)"""
    import gc
    import weakref
    ep = dist.get_world_size()
    gc.collect()
    gc.disable()
    try:
        model = Stack([make_moe(2 * ep, ep, 2, True, seed=s) for s in (30, 31)])
        mf.enable_deepspeed(model, {"dispatch": 8, "combine": 8, "gate": False})
        run(model, tokens((2, 8, H), seed=300 + dist.get_rank()))
        comms = {id(s.comm): weakref.ref(s.comm) for s in _states(model)}
        assert len(comms) == 1, tag  # one communicator for the layers of the group
        kept = [weakref.ref(m) for m in model.modules()] + [weakref.ref(p) for p in model.parameters()]
        del model
        assert not any(r() is not None for r in kept), f"{tag}: a deleted model's modules live on"
        assert all(r() is None for r in comms.values()), f"{tag}: its communicator lives on"
    finally:
        gc.enable()


def check_a_destroyed_expert_group_is_named(rank: int, world: int, port: int) -> None:
    """After destroy_process_group, a patched layer's forward and backward raise
    CommunicatorClosedError (a backward ran on the destroyed group's sockets); after a new
    init_process_group, enable_deepspeed on a model built before, which holds the old job's
    expert-parallel groups, names the layer and its ep_group on every rank (torch raised a
    bare KeyError)."""
    moe = make_moe(2 * world, world, 1, True, seed=1)
    mf.enable_deepspeed(moe, PASS)
    x = tokens((2, 8, H), seed=10 + rank).requires_grad_()
    out = moe(x)[0]
    dist.destroy_process_group()
    gone = "the process group of this moe_flashcomm.Communicator was destroyed"
    with pytest.raises(mf.comm.CommunicatorClosedError, match=gone):
        out.float().sum().backward()
    with pytest.raises(mf.comm.CommunicatorClosedError, match=gone):
        moe(x)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    with pytest.raises(ValueError, match=r"layer 'deepspeed_moe': its ep_group is a process "
                                         r"group that was destroyed"):
        mf.enable_deepspeed(moe, PASS)


def _world2(rank: int, world: int, port: int) -> None:
    init_deepspeed()
    tag = f"rank {rank}/{world}"
    check_one_layer_changes_its_gate(tag)
    check_a_failed_call_changes_nothing(tag)
    check_pipeline_stages_with_other_moe_layers(tag)
    check_a_deleted_model_is_freed_at_once(tag)
    check_a_destroyed_expert_group_is_named(rank, world, port)  # (last: a new job)


def test_lifecycle_gloo_2_ranks():
    spawn(_world2, 2, free_port(), timeout=300)


def test_a_pickled_model_carries_its_gate_tables(tmp_path, monkeypatch):
    """A model enabled with a gate file, saved with torch.save, loads with the tables read
    when it was enabled: after the file changed, was removed, or from another working
    directory (a relative path). It re-read the file at load: new thresholds, silently, or
    an error. One process, no torch.distributed (the layer's groups come later)."""
    from deepspeed.moe.layer import MoE
    torch.manual_seed(0)
    moe = MoE(H, mlp(H), num_experts=4, ep_size=2, k=2, min_capacity=1)
    monkeypatch.chdir(tmp_path)
    with open("gate.json", "w") as f:
        json.dump({"thresholds": {"cpu": {"*": 1}}}, f)
    mf.enable_deepspeed(moe, {"gate": "gate.json"})  # relative to this directory
    (state,) = _states(moe)
    digest = state.gate.digest
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    with open("gate.json", "w") as f:
        json.dump({"thresholds": {"cpu": {"*": 2}}}, f)

    def loaded_gate() -> SizeGate:
        buffer.seek(0)
        (loaded,) = _states(torch.load(buffer, weights_only=False))
        return loaded.gate

    assert loaded_gate().digest == digest  # (was the changed file's)
    monkeypatch.chdir(tmp_path.parent)
    assert loaded_gate().digest == digest  # (was: cannot read size-gate file 'gate.json')
    os.remove(tmp_path / "gate.json")
    assert loaded_gate().digest == digest
    assert loaded_gate().threshold("cpu", mf.CodecConfig(bits=4)) == 1
    mf.disable_deepspeed(moe)


def test_a_failed_all_reduce_hook_patches_nothing():
    """``enable_deepspeed`` with ``all_reduce`` set, where one tensor-parallel layer cannot
    be patched (another wrapper's instance attribute): it raises and patches nothing, neither
    the MoE layer nor the all-reduce layer before the bad one (both stayed patched). One
    process, no torch.distributed."""
    from deepspeed.module_inject.layers import LinearAllreduce
    from deepspeed.moe.layer import MoE
    from moe_flashcomm.integrations.allreduce import all_reduce_stats
    torch.manual_seed(0)
    model = nn.ModuleDict({"moe": MoE(H, mlp(H), num_experts=4, ep_size=2, k=2, min_capacity=1),
                           "tp": nn.ModuleList(LinearAllreduce(nn.Linear(H, H), None)
                                               for _ in range(2))})
    wrapped = model["tp"][1]
    wrapped.forward = wrapped.forward  # (as a wrapper library would)
    with pytest.raises(RuntimeError, match="'tp.1' already has an instance attribute 'forward'"):
        mf.enable_deepspeed(model, {"all_reduce": 4})
    assert exchange_stats(model) == {} and all_reduce_stats(model) == {}
    assert "forward" not in vars(model["moe"].deepspeed_moe)
    assert "forward" not in vars(model["tp"][0])
