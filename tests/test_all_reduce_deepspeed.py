"""The opt-in DeepSpeed hook: tensor-parallel inference all-reduces through
moe_flashcomm.all_reduce, per instance, reversibly, on real gloo (and NCCL) groups.

``LinearAllreduce`` (AutoTP) is built and run for real. The kernel-injection modules
(``DeepSpeedSelfAttention``, ``DeepSpeedMLP``, ``DeepSpeedMoEMLP``) need DeepSpeed's CUDA
inference kernels to construct, so they are instantiated without ``__init__`` and their
kernel ops replaced by torch stand-ins: DeepSpeed's own ``forward`` code runs, all-reduce
included."""
from __future__ import annotations

import copy
import functools
import gc
import io
import pickle
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moe_flashcomm as mf
from moe_flashcomm.integrations.allreduce import all_reduce_stats
from tests.distributed import spawn

H = 96
OFF = {"gate": False}


def init_deepspeed():
    import deepspeed
    from deepspeed import comm
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    # DeepSpeed's CPU shared-memory all-reduce op is not usable in these spawned test
    # processes (it crashes); stock inference_all_reduce then uses torch.distributed
    comm.comm.cdb.shm_vector_kernel_level = 0
    return deepspeed


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def randn(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device())


def expected(local: torch.Tensor, codec) -> torch.Tensor:
    """What the quantized all-reduce makes of every rank's ``local``: the specification
    (``reference_all_reduce``) of every rank's, gathered."""
    from moe_flashcomm.comm.all_reduce import reference_all_reduce
    inputs = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(inputs, local.contiguous())
    return reference_all_reduce([t.cpu() for t in inputs], codec).to(local.device)


def exact(local: torch.Tensor) -> torch.Tensor:
    out = local.clone()
    dist.all_reduce(out)
    return out


def check_linear_allreduce(tag: str) -> None:
    from deepspeed.module_inject.layers import LinearAllreduce, LmHeadLinearAllreduce, set_autotp_mode
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    lin, head = nn.Linear(H * world, H), nn.Linear(H * world, 2 * H)
    x = torch.randn(2, 5, H * world).to(device())
    shard = x[..., rank * H:(rank + 1) * H]
    model = nn.Sequential()
    model.add_module("down", LinearAllreduce(lin, dist.group.WORLD))
    model.add_module("lm_head", LmHeadLinearAllreduce(head, dist.group.WORLD))
    model.to(device())
    down = model.down
    with torch.no_grad():
        local = shard @ down.weight.t()
        stock = down(shard)
        assert torch.equal(stock, exact(local) + down.bias), tag

        # off by default: a config without all_reduce patches nothing
        assert mf.enable_all_reduce(model, {"dispatch": 4}) == {}
        assert "forward" not in vars(down)

        stats = mf.enable_all_reduce(model, {"all_reduce": 4, **OFF})
        assert list(stats) == ["down"], stats  # the lm head (logits) stays exact
        assert "forward" in vars(down) and "forward" not in vars(model.lm_head)
        y = down(shard)
        assert torch.equal(y, expected(local, 4) + down.bias), tag
        assert not torch.equal(y, stock)
        assert stats["down"].calls == 1 and stats["down"].values == local.numel()
        # a whole DeepSpeed config; enabling again reconfigures, counters continue
        mf.enable_all_reduce(model, {"train_batch_size": 8, "moe_flashcomm": {"all_reduce": 8, **OFF}})
        assert torch.equal(down(shard), expected(local, 8) + down.bias), tag
        assert all_reduce_stats(model)["down"].calls == 2
        # per-link codecs: the hierarchical all-reduce (one group of 2 ranks here)
        links = {"intra_node": "bf16", "inter_node": 4}
        mf.enable_all_reduce(model, {"all_reduce": links, **OFF})
        want = mf.all_reduce(local.clone(), codec=links, gate=False, algorithm="hierarchical")
        assert torch.equal(down(shard), want + down.bias), tag
        # training mode: DeepSpeed's RowParallel, exact
        set_autotp_mode(training=True)
        try:
            assert torch.equal(down(shard), stock)
        finally:
            set_autotp_mode(training=False)
        assert mf.disable_all_reduce(model)["down"].calls == 3
        assert "forward" not in vars(down)
        assert torch.equal(down(shard), stock), tag
        # all_reduce: null in the section turns the hooks off again
        mf.enable_all_reduce(model, {"all_reduce": 4, **OFF})
        assert mf.enable_all_reduce(model, {"moe_flashcomm": {"all_reduce": None}}) == {}
        assert torch.equal(down(shard), stock), tag
        # no tensor parallelism (mp_group None): DeepSpeed's RowParallel all-reduces nothing,
        # and neither does the patched layer (it had summed over the default group)
        alone = LinearAllreduce(nn.Linear(H, H), None).to(device())
        want = alone(shard)
        assert mf.enable_all_reduce(alone, {"all_reduce": 4, **OFF})
        assert torch.equal(alone(shard), want), tag
        assert all_reduce_stats(alone)[""].calls == 0
    check_shared_communicator(tag, shard)
    check_copy_and_pickle(tag, down, shard, local)


def check_shared_communicator(tag: str, shard: torch.Tensor) -> None:
    """Layers enabled with a gate file (the config's path, or $MOE_FLASHCOMM_GATE_FILE with
    the default gate) or a thresholds dict share one communicator per group; each had made
    its own."""
    import os
    import tempfile
    from deepspeed.module_inject.layers import LinearAllreduce
    from moe_flashcomm.comm.communicator import PROCESS
    world = dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gate.json")
        with open(path, "w") as f:
            f.write('{"thresholds": {}, "all_reduce": {}}')
        for config in ({"all_reduce": 4, "gate": path}, {"all_reduce": 8},
                       {"all_reduce": 6, "gate": {"nvlink": {"int6": 1}}}):
            layers = nn.ModuleList(LinearAllreduce(nn.Linear(H * world, H), dist.group.WORLD)
                                   for _ in range(3)).to(device())
            os.environ["MOE_FLASHCOMM_GATE_FILE"] = path
            try:
                mf.enable_all_reduce(layers, config)
                before = len(PROCESS.communicators)
                with torch.no_grad():
                    for layer in layers:
                        layer(shard)
            finally:
                del os.environ["MOE_FLASHCOMM_GATE_FILE"]
            assert len(PROCESS.communicators) - before <= 1, (tag, config)


def pickle_sharing(obj, group):
    """``obj`` pickled and unpickled, ``group`` passed by reference (a ProcessGroup cannot be
    pickled; DeepSpeed's AutoTP layers hold theirs in several places)."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return "group" if o is group else None

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return group

    buffer = io.BytesIO()
    Pickler(buffer).dump(obj)
    buffer.seek(0)
    return Unpickler(buffer).load()


def check_copy_and_pickle(tag: str, layer: nn.Module, shard: torch.Tensor, local: torch.Tensor) -> None:
    """A patched LinearAllreduce deep-copies (its group shared through the memo: a
    ProcessGroup cannot be copied) and pickles (its group passed by reference): the copy / the loaded layer stays patched, with
    fresh counters."""
    group = layer.mp_group
    stats = mf.enable_all_reduce(layer, {"all_reduce": 4, **OFF})[""]
    want = expected(local, 4) + layer.bias
    with torch.no_grad():
        twin = copy.deepcopy(layer, {id(group): group})
        assert twin.mp_group is group and "forward" in vars(twin)
        assert torch.equal(twin(shard), want), tag
        assert all_reduce_stats(twin)[""].calls == 1 and stats.calls == 0
        mf.disable_all_reduce(layer)
        assert "forward" in vars(twin)  # the copy stays patched

        loaded = pickle_sharing(twin, group)
        assert torch.equal(loaded(shard), want), tag
        assert all_reduce_stats(loaded)[""].calls == 1
        mf.disable_all_reduce(loaded)
        assert torch.equal(loaded(shard), exact(local) + layer.bias), tag

        # LinearAllreduce memoizes its copy late, so the copy's forward holds one more copy
        # of the layer, which holds none (a copy of a copy too: no chain of copies); they go
        # with the copy, by reference counts alone (no cycle)
        twin2 = copy.deepcopy(twin, {id(group): group})
        assert torch.equal(twin2(shard), want), tag
        for copied in (twin, twin2):
            extra = vars(copied)["forward"]._held
            assert extra is not None and vars(extra)["forward"]._held is None, tag
        copies = [weakref.ref(c) for c in (twin, twin2, *(vars(c)["forward"]._held
                                                           for c in (twin, twin2)))]
        gc.disable()
        try:
            del twin, twin2, extra, copied
            assert [c() for c in copies] == [None] * 4, tag
        finally:
            gc.enable()


def bare(cls, **attrs) -> nn.Module:
    """An instance of a kernel-injection class without its __init__ (which builds CUDA ops)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def check_kernel_injection_modules(tag: str) -> None:
    from deepspeed.ops.transformer.inference.ds_attention import DeepSpeedSelfAttention
    from deepspeed.ops.transformer.inference.ds_mlp import DeepSpeedMLP
    from deepspeed.ops.transformer.inference.moe_inference import DeepSpeedMoEMLP
    rank, group = dist.get_rank(), dist.group.WORLD
    w1, b1, w2, b2 = (randn(H, 2 * H, seed=10 + rank), randn(2 * H, seed=20 + rank),
                      randn(2 * H, H, seed=30 + rank), randn(H, seed=40))
    inp, res = randn(2, 5, H, seed=50), randn(2, 5, H, seed=60)

    def gemm_gelu(x, w, b, wo):
        return F.gelu(x @ w + b) @ wo

    mlp = bare(DeepSpeedMLP, inter_w=w1, inter_b=b1, attn_nw=None, output_w=w2, output_b=b2,
               mp_group=group,
               fused_gemm_gelu=lambda input, weight, bias, weight_out: gemm_gelu(input, weight, bias, weight_out),
               residual_add_func=lambda hidden_state, residual, **kw: hidden_state + residual)
    attn = bare(DeepSpeedSelfAttention, attn_qkvw=w1, attn_qkvb=None, attn_ow=w2, mp_group=group,
                config=SimpleNamespace(pre_layer_norm=True, mlp_after_attn=True),
                qkv_func=lambda input, weight, bias, gamma, beta: (input @ weight, input),
                compute_attention=lambda qkv_out, **kw: (qkv_out[0], None, None),
                vector_matmul_func=lambda input, weight: input @ weight)
    moe_mlp = bare(DeepSpeedMoEMLP, inter_w=w1, inter_b=b1, output_w=w2, output_b=b2,
                   config=SimpleNamespace(q_int8=False, epsilon=1e-5, pre_layer_norm=True),
                   q_scales=None, q_groups=1, merge_count=0, mp_group=group,
                   gelu_gemm_func=lambda x, w, b, wo, eps, pre, async_op: gemm_gelu(x, w, b, wo),
                   vector_matmul_func=None)
    model = nn.ModuleDict(dict(mlp=mlp, attn=attn, moe_mlp=moe_mlp))
    local = {"mlp": gemm_gelu(inp, w1, b1, w2) + res, "attn": (inp @ w1) @ w2,
             "moe_mlp": gemm_gelu(inp, w1, b1, w2)}
    bias = {"mlp": 0.0, "attn": 0.0, "moe_mlp": b2}  # DeepSpeedMLPFunction adds it after

    def run():
        return {"mlp": mlp(inp, res, inp, None), "attn": attn(inp, None)[0], "moe_mlp": moe_mlp(inp)}

    with torch.no_grad():
        stock = run()
        for k in local:
            assert torch.equal(stock[k], exact(local[k]) + bias[k]), (tag, k)
        codec = {"bits": 6, "group_size": 64}
        stats = mf.enable_all_reduce(model, {"all_reduce": codec, **OFF})
        assert sorted(stats) == ["attn", "mlp", "moe_mlp"], stats
        got = run()
        for k in local:
            assert torch.equal(got[k], expected(local[k], codec) + bias[k]), (tag, k)
            assert stats[k].calls == 1
        check_patched_dist(mlp, local["mlp"], codec, tag)
        mf.disable_all_reduce(model)
        for k in local:
            assert torch.equal(run()[k], stock[k]), (tag, k)


def check_patched_dist(layer: nn.Module, local: torch.Tensor, codec, tag: str) -> None:
    """What a patched method sees as ``dist``: a sum of floats is the layer's quantized
    all-reduce (an async caller gets a completed handle, ``inference_all_reduce`` is the same
    sum); another reduction, integer tensors and every other name are deepspeed.comm's."""
    from moe_flashcomm.integrations.allreduce import _STATE
    state = layer.__dict__[_STATE]
    patched = state.impl(layer).__globals__["dist"]
    t = local.clone()
    handle = patched.all_reduce(t, async_op=True)
    assert handle.wait() and handle.is_completed()
    assert torch.equal(t, expected(local, codec)), tag
    t = local.clone()
    patched.inference_all_reduce(t)
    assert torch.equal(t, expected(local, codec)), tag
    assert state.stats.calls == 3  # (the forward's, then these two)
    m = randn(7, seed=70 + dist.get_rank())
    want = m.clone()
    dist.all_reduce(want, op=dist.ReduceOp.MAX)
    patched.all_reduce(m, op=dist.ReduceOp.MAX)
    assert torch.equal(m, want), tag
    i = torch.arange(5, device=m.device) + dist.get_rank()
    patched.all_reduce(i)
    assert torch.equal(i, torch.arange(5, device=m.device) * dist.get_world_size()
                       + sum(range(dist.get_world_size()))), tag
    # what the codecs do not take goes to deepspeed.comm's own inference_all_reduce, which
    # may run on another backend than its all_reduce (its arguments passed on; each call
    # seen on its way to the real one)
    real, seen = patched._real, []

    def seeing(name):
        return lambda t, **kw: (seen.append((name, kw)), getattr(real, name)(t, **kw))[1]
    patched._real = SimpleNamespace(inference_all_reduce=seeing("inference_all_reduce"),
                                    all_reduce=seeing("all_reduce"))
    try:
        m = randn(7, seed=71 + dist.get_rank())
        want = m.clone()
        dist.all_reduce(want, op=dist.ReduceOp.MAX)
        patched.inference_all_reduce(m, op=dist.ReduceOp.MAX, group=None)
        d = m.double()
        patched.inference_all_reduce(d)
    finally:
        patched._real = real
    assert torch.equal(m, want) and torch.equal(d, want.double() * dist.get_world_size()), tag
    assert [name for name, _ in seen] == ["inference_all_reduce"] * 2, (tag, seen)
    assert seen[0][1] == dict(op=dist.ReduceOp.MAX, group=None, async_op=False), (tag, seen)
    assert state.stats.calls == 3 and patched.get_world_size() == dist.get_world_size()


def check_enable_deepspeed_applies_the_section(tag: str) -> None:
    """``enable_deepspeed`` applies its config's ``all_reduce``: set, the hooks go in; off
    when called again, the hooks it installed go and those of ``enable_all_reduce`` stay; a
    MoE layer it turns stock has its communicator closed."""
    from deepspeed.module_inject.layers import LinearAllreduce
    from tests.test_deepspeed import PASS, make_moe
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("moe", make_moe(2 * world, world, 1, True, dtype=torch.float32, seed=3))
    model.add_module("down", LinearAllreduce(nn.Linear(H * world, H), dist.group.WORLD))
    down, moe_layer = model.down, model.moe.deepspeed_moe
    shard = torch.randn(2, 5, H)
    with torch.no_grad():
        local = shard @ down.weight.t()
        stock = down(shard)
        mf.enable_deepspeed(model, {**PASS, "all_reduce": 4, **OFF})
        assert list(all_reduce_stats(model)) == ["down"], tag
        assert torch.equal(down(shard), expected(local, 4) + down.bias), tag
        mf.enable_deepspeed(model, PASS)  # called again without all_reduce: its hooks go
        assert all_reduce_stats(model) == {} and torch.equal(down(shard), stock), tag
        mf.enable_all_reduce(model, {"all_reduce": 8, **OFF})
        mf.enable_deepspeed(model, PASS)  # ... but not those of enable_all_reduce
        assert torch.equal(down(shard), expected(local, 8) + down.bias), tag
        comm = vars(moe_layer)["_moe_flashcomm"].comm
        assert comm is not None and not comm.closed, tag
        mf.enable_deepspeed(model, {"enabled": False})  # every MoE layer stock again
        assert "_moe_flashcomm" not in vars(moe_layer) and comm.closed, tag
        assert torch.equal(down(shard), expected(local, 8) + down.bias), tag
        mf.disable_deepspeed(model)  # restores both
        assert all_reduce_stats(model) == {} and torch.equal(down(shard), stock), tag


def check_ranks_that_disagree(tag: str) -> None:
    """Ranks of one tensor-parallel group that would all-reduce differently (one through
    moe_flashcomm, one DeepSpeed's own; or two codecs) raise on every rank of the job within
    seconds, naming the two ranks and the field (they waited for good, or until the
    communicator's timeout). Groups that do not share a rank need not agree. With 4 ranks:
    tensor-parallel groups {0, 1} and {2, 3}."""
    import time
    from deepspeed.module_inject.layers import LinearAllreduce
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = 2 if world == 4 else world
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    torch.manual_seed(0)
    layer = LinearAllreduce(nn.Linear(H * tp, H), groups[rank // tp]).to(device())
    shard = torch.randn(2, 5, H).to(device())
    with torch.no_grad():
        local = shard @ layer.weight.t()
        start = time.monotonic()
        for mine, seen in ((None, "off"), (8, "int8/g128")):  # rank 1 differs: off, then int8
            config = {"all_reduce": 4 if rank != 1 else mine, **OFF}
            with pytest.raises(mf.comm.ConfigMismatchError,
                               match=r"ranks 0 and 1 resolved different layer configs: layer '': "
                                     r"all_reduce differs") as raised:
                mf.enable_all_reduce(layer, config)
            assert "int4/g128" in str(raised.value) and seen in str(raised.value), tag
        assert time.monotonic() - start < 10, f"{tag}: disagreement took too long to raise"
        # agreeing inside each group is enough: the second group (4 ranks) is off
        codec = 4 if rank < tp else None
        stats = mf.enable_all_reduce(layer, {"all_reduce": codec, **OFF})
        assert bool(stats) == (codec is not None), tag
        want = local.clone()
        if codec is None:
            dist.all_reduce(want, group=groups[rank // tp])
        else:
            want = mf.all_reduce(want, group=groups[rank // tp], codec=codec, gate=False)
        assert torch.equal(layer(shard), want + layer.bias), tag
        mf.disable_all_reduce(layer)


def check_float64_goes_to_deepspeed(tag: str) -> None:
    """A dtype the codecs do not take (float64) is all-reduced by DeepSpeed's own all-reduce,
    exactly, not counted; every forward had raised TypeError (LinearAllreduce) or "ran a
    forward without its all-reduce going through moe_flashcomm" (a ``dist`` site)."""
    from deepspeed.module_inject.layers import LinearAllreduce
    from deepspeed.ops.transformer.inference.ds_mlp import DeepSpeedMLP
    world = dist.get_world_size()
    torch.manual_seed(0)
    down = LinearAllreduce(nn.Linear(H * world, H).double(), dist.group.WORLD).to(device())
    w1, b1 = randn(H, 2 * H, seed=10).double(), randn(2 * H, seed=20).double()
    w2 = randn(2 * H, H, seed=30 + dist.get_rank()).double()
    mlp = bare(DeepSpeedMLP, inter_w=w1, inter_b=b1, attn_nw=None, output_w=w2, output_b=None,
               mp_group=dist.group.WORLD,
               fused_gemm_gelu=lambda input, weight, bias, weight_out: F.gelu(input @ weight + bias) @ weight_out,
               residual_add_func=lambda hidden_state, residual, **kw: hidden_state + residual)
    model = nn.ModuleDict(dict(down=down, mlp=mlp))
    shard = randn(2, 5, H, seed=1 + dist.get_rank()).double()

    def run():
        return down(shard), mlp(shard, shard, shard, None)

    with torch.no_grad():
        stock = run()
        stats = mf.enable_all_reduce(model, {"all_reduce": 4, **OFF})
        assert sorted(stats) == ["down", "mlp"], tag
        for got, want in zip(run(), stock):
            assert torch.equal(got, want), tag
        assert all(s.calls == 0 for s in stats.values()), (tag, stats)
        mf.disable_all_reduce(model)


def check_unpatchable_on_one_rank(tag: str) -> None:
    """A layer that cannot be patched on one rank (another wrapper's instance ``forward``)
    makes every rank raise, and nothing is patched anywhere: the other ranks had patched
    theirs and waited in their next forward. The same through ``enable_deepspeed``'s
    ``all_reduce``, which leaves its MoE layers stock too."""
    from deepspeed.module_inject.layers import LinearAllreduce
    from tests.test_deepspeed import PASS, make_moe
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("moe", make_moe(2 * world, world, 1, True, dtype=torch.float32, seed=3))
    model.add_module("down", LinearAllreduce(nn.Linear(H * world, H), dist.group.WORLD))
    down = model.down
    if rank == 1:
        down.forward = functools.partial(type(down).forward, down)
    wrapped = "already has an instance attribute 'forward'"
    raised = (RuntimeError, wrapped) if rank == 1 else (mf.comm.ConfigMismatchError,
                                                        r"failed on rank\(s\) \[1\]")
    for enable, config in ((mf.enable_all_reduce, {"all_reduce": 4, **OFF}),
                           (mf.enable_deepspeed, {**PASS, "all_reduce": 4, **OFF})):
        with pytest.raises(raised[0], match=raised[1]) as e:
            enable(model, config)
        assert wrapped in str(e.value), tag
        assert all_reduce_stats(model) == {}, (tag, enable.__name__)
        assert "_moe_flashcomm" not in vars(model.moe.deepspeed_moe), tag
        assert ("forward" in vars(down)) == (rank == 1), tag
    shard = torch.randn(2, 5, H)
    with torch.no_grad():  # every rank stock: DeepSpeed's all-reduce meets its peer's
        assert torch.equal(down(shard), exact(shard @ down.weight.t()) + down.bias), tag


def _world2(rank: int, world: int) -> None:
    init_deepspeed()
    tag = f"rank {rank}/{world} {dist.get_backend()}"
    check_linear_allreduce(tag)
    check_kernel_injection_modules(tag)
    check_ranks_that_disagree(tag)
    check_float64_goes_to_deepspeed(tag)
    if dist.get_backend() == "gloo":
        check_enable_deepspeed_applies_the_section(tag)
        check_unpatchable_on_one_rank(tag)


def test_tensor_parallel_hooks_gloo_2_ranks():
    spawn(_world2, 2)


def _world4(rank: int, world: int) -> None:
    init_deepspeed()
    check_ranks_that_disagree(f"rank {rank}/{world} {dist.get_backend()}")


def test_tensor_parallel_groups_agree_apart_gloo_4_ranks():
    spawn(_world4, 4)


def test_config_field():
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    assert FlashCommConfig().all_reduce is None
    assert FlashCommConfig(all_reduce=False).all_reduce is None
    assert FlashCommConfig(all_reduce=True).all_reduce == mf.LinkCodecs.coerce(None)
    cfg = FlashCommConfig.from_deepspeed_config({"moe_flashcomm": {"all_reduce": {"intra_node": "bf16",
                                                                                  "inter_node": 4}}})
    assert cfg.all_reduce == mf.LinkCodecs(intra_node="bf16", inter_node=4)
    assert FlashCommConfig.from_dict(cfg.to_dict()) == cfg and "all_reduce=" in cfg.describe()
    with pytest.raises(ConfigError, match=r"moe_flashcomm.all_reduce: CodecConfig.bits"):
        FlashCommConfig.from_dict({"all_reduce": 1}, where="moe_flashcomm")
    with pytest.raises(ConfigError, match="all_reduce: an all-reduce's integer codecs need rounding='nearest'"):
        FlashCommConfig(all_reduce={"bits": 8, "rounding": "stochastic"})
    with pytest.raises(ConfigError, match="unknown field"):
        FlashCommConfig.from_dict({"layers": [{"index": 0, "all_reduce": 4}]})


@pytest.mark.multigpu
def test_tensor_parallel_hooks_nccl_2_gpus():
    spawn(_world2, 2, backend="nccl")


def test_only_a_plain_sum_is_quantized():
    """The patched all-reduce takes torch's or DeepSpeed's SUM; other ops go to DeepSpeed's
    own (PREMUL_SUM, whose name ends in SUM, was taken as a sum without its factor)."""
    from deepspeed.comm import ReduceOp as DeepSpeedOp
    from moe_flashcomm.integrations.allreduce import _is_deepspeed_sum as _is_sum
    assert _is_sum(None) and _is_sum(dist.ReduceOp.SUM) and _is_sum(DeepSpeedOp.SUM)
    for op in (dist.ReduceOp.PREMUL_SUM, dist.ReduceOp.MAX, DeepSpeedOp.AVG, DeepSpeedOp.PRODUCT):
        assert not _is_sum(op), op
