"""moe_flashcomm.enable_deepspeed on real DeepSpeed MoE layers over real process groups.

Every check compares a layer against itself run stock: the same weights, the same input and
the same RNG state (DeepSpeed's gating draws random numbers), once through DeepSpeed's own
all-to-all and once through moe_flashcomm's.

* bf16 passthrough codecs give outputs and gradients *identical* to stock DeepSpeed.
* int8 / int4 outputs stay inside the codec's error bound. The bound is exact when expert e
  is x -> c_e * x: a token comes back as sum_k gate_k * Q_combine(c_k * Q_dispatch(x)) with
  sum_k gate_k <= 1, so its error is at most max c_e times the dispatch plus the combine
  rounding error of its group (half a quantization step, plus the bf16 rounding of metadata
  and spikes). Gradients (int8 codec) are checked by relative error.
* The number of exchanges and the bytes per link class equal what the model implies.

CPU: gloo, 2 and 4 ranks, a few spawns with many checks each (CI has 2 cores).
GPU (``-m multigpu``): the same workers on 2 GPUs over NCCL.
"""
from __future__ import annotations

import contextlib
import copy
import time
import io
import json
import os
import pickle
import logging
import math
import tempfile
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

pytest.importorskip("deepspeed")

import moe_flashcomm as mf  # noqa: E402
from moe_flashcomm.integrations import ExchangeStats, exchange_stats  # noqa: E402
from tests.distributed import spawn  # noqa: E402

H = 128  # hidden size: one codec group of 128
PASS = {k: "bf16" for k in ("dispatch", "combine", "dispatch_grad", "combine_grad")}
# The size gate sends small messages as bf16 on GPU links (tuned thresholds); these tests count
# exact quantized bytes, so they switch it off.
NO_GATE = {"gate": False}


# ---- helpers ------------------------------------------------------------------------------------
def init_deepspeed():
    """deepspeed.comm on top of the process group tests.distributed created."""
    import deepspeed
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def mlp(h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))


def make_moe(experts: int, ep: int, k: int, drop_tokens: bool, expert: nn.Module | None = None,
             dtype=torch.bfloat16, seed: int = 0, ep_rank: int | None = None, groups: bool = True,
             **kw):
    """A deepspeed.moe.layer.MoE with its process groups (``groups=False``: without, as before
    ``deepspeed.initialize``; then ``ep_rank`` is required). The gate is the same on every
    rank; the experts differ per expert-parallel rank, so a row sent to the wrong rank shows."""
    from deepspeed.moe.layer import MoE
    torch.manual_seed(seed)
    moe = MoE(H, expert if expert is not None else mlp(H), num_experts=experts, ep_size=ep, k=k,
              capacity_factor=1.0, min_capacity=1, drop_tokens=drop_tokens, **kw)
    if groups:
        moe.set_deepspeed_parallelism()
    g = torch.Generator().manual_seed(1000 * seed + (ep_rank if ep_rank is not None
                                                     else dist.get_rank(moe.deepspeed_moe.ep_group)))
    with torch.no_grad():
        for p in moe.deepspeed_moe.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return moe.to(device=device(), dtype=dtype)


def tokens(shape, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Normal values with a few large outliers (spike-reserving territory)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x += (torch.rand(*shape, generator=g) < 0.01) * 10 * torch.randn(*shape, generator=g)
    return x.to(device=device(), dtype=dtype)


def run(model: nn.Module, x: torch.Tensor, seed: int = 7):
    """Forward and backward of ``sum(out * w)`` (+ aux loss) with the RNG at ``seed``:
    (output, input grad, {param: grad})."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    y, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, 0.0)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    ((y.float() * w).sum() + aux).backward()
    return (y.detach(), x.grad.detach(),
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def stock_runs(model: nn.Module, x: torch.Tensor):
    """Two stock runs: the reference and its run-to-run noise (identical on CPU, checked)."""
    ref, noise = run(model, x), run(model, x)
    if x.device.type == "cpu":
        assert_identical(ref, noise, "stock twice")
    return ref, noise


def assert_identical(a, b, what: str, noise=None) -> None:
    """Outputs and gradients of two ``run`` results are equal. ``noise``: a second stock run;
    where stock itself differs between runs (CUDA atomics in DeepSpeed's gating backward), b
    may differ from a by at most twice as much, element by element's maximum."""
    def same(u, v, w, name):
        if w is None or torch.equal(u, w):
            assert torch.equal(u, v), f"{what}: {name} differ"
        else:
            spread = (u.float() - w.float()).abs().max()
            assert (u.float() - v.float()).abs().max() <= 2 * spread, f"{what}: {name} differ beyond stock's own run-to-run spread"
    ya, ga, pa = a
    yb, gb, pb = b
    yn, gn, pn = noise if noise is not None else (None, None, {})
    same(ya, yb, yn, "outputs")
    same(ga, gb, gn, "input gradients")
    assert pa.keys() == pb.keys() and pa, f"{what}: parameter gradients missing"
    for n in pa:
        same(pa[n], pb[n], pn.get(n), f"gradients of {n}")


def step_bound(x: torch.Tensor, codec: mf.CodecConfig) -> torch.Tensor:
    """Per element of ``x`` [..., H], the largest error one encode/decode with ``codec`` can
    make: half a step of its group's scale (scale = range / qmax, rounded up to bf16, the
    minimum rounded down), plus the bf16 rounding of fp32 spikes."""
    g = codec.group_size
    xg = x.float().reshape(-1, x.shape[-1] // g, g)
    rng = xg.amax(-1) - xg.amin(-1)
    amax = xg.abs().amax(-1)
    e = 0.5 * (rng + amax * 2 ** -7) * (1 + 2 ** -7) / codec.qmax + amax * 2 ** -8
    return e.repeat_interleave(g, dim=-1).reshape(x.shape)


def scaled_identity_experts(moe) -> float:
    """Make expert e (global index) of a MoE with Linear(H, H) experts the map x -> c_e * x,
    c_e = 0.5 .. 1.5 (distinct, so the gate matters); returns max c_e."""
    layer = moe.deepspeed_moe
    first = dist.get_rank(layer.ep_group) * layer.num_local_experts
    total = layer.num_local_experts * layer.ep_size
    with torch.no_grad():
        for j, expert in enumerate(layer.experts.deepspeed_experts):
            c = 0.5 + (first + j) / max(1, total - 1)
            expert.weight.copy_(c * torch.eye(H))
    return 1.5


def identity_bound(x: torch.Tensor, dispatch: mf.CodecConfig, combine: mf.CodecConfig) -> torch.Tensor:
    """Error bound of an MoE layer with identity experts: dispatch, then combine of values
    that lie within the dispatch error of the original group."""
    e1 = step_bound(x, dispatch)
    # the combine quantizes Q(x): its group range grows by at most 2*e1, its max by e1
    g = combine.group_size
    xg = x.float().reshape(-1, x.shape[-1] // g, g)
    e1g = e1.reshape(xg.shape).amax(-1)
    rng = xg.amax(-1) - xg.amin(-1) + 2 * e1g
    amax = xg.abs().amax(-1) + e1g
    e2 = 0.5 * (rng + amax * 2 ** -7) * (1 + 2 ** -7) / combine.qmax + amax * 2 ** -8
    return e1 + e2.repeat_interleave(g, dim=-1).reshape(x.shape) + 1e-5 * x.float().abs() + 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def shared_groups(model: nn.Module) -> dict:
    """A ``copy.deepcopy`` memo that keeps the process groups a model's modules hold shared
    (a ProcessGroup cannot be copied or pickled; stock DeepSpeed layers fail without it)."""
    return {id(v): v for m in model.modules() for v in vars(m).values()
            if isinstance(v, dist.ProcessGroup)}


def rows_of(layer_stats: ExchangeStats) -> tuple:
    return tuple(layer_stats.calls.values()), tuple(layer_stats.quantized.values())


@contextlib.contextmanager
def tutel_stand_in():
    """Install a pure-torch stand-in for ``tutel.moe`` in DeepSpeed's sharded_moe, as if Tutel
    were installed. Tutel is not on the package index; the stand-in has the semantics
    DeepSpeed's use_tutel path relies on (tutel v0.1.x): ``fast_cumsum_sub_one`` is the
    cumulative sum over tokens minus one; ``fast_dispatcher.encode`` scatters each kept route's
    token into slot expert*capacity+location of a zeroed [E*C, M] buffer and ``decode`` gathers
    the slots back, weighted by the gates and summed over routes."""
    import deepspeed.moe.sharded_moe as sm

    class FastDispatcher:
        def __init__(self, num_global_experts, capacity, model_dim, dispatch_dtype=None):
            self.e, self.m = num_global_experts, model_dim

        def update(self, indices_, locations_, gates_, capacity):
            self.c, self.routes = int(capacity), list(zip(indices_, locations_, gates_))

        def _slots(self, idx, loc):
            kept = (idx >= 0) & (loc < self.c)
            return torch.where(kept, idx.long() * self.c + loc.long(), self.e * self.c)

        def encode(self, x):
            out = x.new_zeros(self.e * self.c + 1, self.m)
            for idx, loc, _ in self.routes:
                out = out.index_put((self._slots(idx, loc),), x)
            return out[:-1]

        def decode(self, y):
            padded = torch.cat([y, y.new_zeros(1, self.m)])
            out = sum(padded[self._slots(i, l)].float() * g.float().unsqueeze(1)
                      for i, l, g in self.routes)
            return out.to(y.dtype)

    class TutelMoe:
        fast_dispatcher = FastDispatcher

        @staticmethod
        def fast_cumsum_sub_one(mask):
            return torch.cumsum(mask, dim=0) - 1

    saved = sm.TUTEL_INSTALLED, sm.__dict__.get("tutel_moe")
    sm.TUTEL_INSTALLED, sm.tutel_moe = True, TutelMoe
    try:
        yield
    finally:
        sm.TUTEL_INSTALLED = saved[0]
        if saved[1] is None:
            del sm.tutel_moe
        else:
            sm.tutel_moe = saved[1]


# ---- AutoEP: a Mixtral-shaped model (what the "mixtral" preset detects) -----------------------------
class _Config:
    def __init__(self, experts: int, k: int):
        self.num_local_experts, self.num_experts_per_tok, self.hidden_size = experts, k, H


class _Experts(nn.Module):
    def __init__(self, experts: int, ffn: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * ffn, H) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(experts, H, ffn) * 0.05)


class _Block(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.gate = nn.Linear(H, experts, bias=False)
        self.experts = _Experts(experts, 64)


class MixtralLike(nn.Module):
    """``model.layers.N.mlp`` MoE blocks with fused 3-D expert weights; AutoEP replaces every
    ``mlp`` by an AutoEPMoELayer. Forward: residual MoE blocks, output [B, S, H]."""

    def __init__(self, layers: int, experts: int, k: int):
        super().__init__()
        self.config = _Config(experts, k)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.mlp = _Block(experts)
            self.model.layers.append(layer)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.mlp(x)
        return x


AUTOEP = {"enabled": True, "preset_model": "mixtral", "use_grouped_mm": False}


def make_autoep(layers: int, experts: int, k: int, ep: int, seed: int = 0, dtype=torch.bfloat16):
    """MixtralLike with its MoE blocks replaced by AutoEP (as deepspeed.initialize does)."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    torch.manual_seed(seed)
    model = MixtralLike(layers, experts, k)
    auto = AutoEP(model, parse_autoep_config({**AUTOEP, "autoep_size": ep}))
    for spec in auto.ep_parser():
        auto.replace_moe_layer(spec, ep_size=ep, ep_rank=dist.get_rank() % ep)
    for m in model.modules():
        if isinstance(m, AutoEPMoELayer):
            m.set_deepspeed_parallelism()
    return model.to(device=device(), dtype=dtype)


def autoep_remote_rows(layer, x: torch.Tensor) -> int:
    """Rows (token, route) this rank's AutoEP layer sends to other ranks for input ``x``."""
    with torch.no_grad():
        _, selected, _ = layer.router(x.reshape(-1, H), layer.expert_bias)
    owner = selected.reshape(-1) // layer.num_local_experts
    return int((owner != layer.ep_rank).sum())


def _total_over_ranks(v: int) -> int:
    t = torch.tensor([v], dtype=torch.int64, device=device())
    dist.all_reduce(t)
    return int(t.item())


class Stack(nn.Module):
    """MoE layers applied in turn with residuals; returns (x, the summed auxiliary loss)."""

    def __init__(self, blocks) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        aux = 0.0
        for b in self.blocks:
            y, l_aux, _ = b(x)
            x, aux = x + y, aux + l_aux
        return x, aux


# ---- checks (each runs in every rank of a spawned group) ----------------------------------------------
def check_passthrough_and_disable(tag: str) -> None:
    """Several MOELayers (k = 1, 2, 3; drop_tokens on and off) in one model: bf16
    passthrough is identical to stock, forward and backward; disable restores stock exactly;
    per-layer rules give each layer its own codecs; the log names them."""
    ep = dist.get_world_size()
    model = Stack([make_moe(2 * ep, ep, 1, True, seed=1), make_moe(2 * ep, ep, 2, False, seed=2),
                   make_moe(2 * ep, ep, 3, True, seed=3)])
    x = tokens((4, 8, H), seed=dist.get_rank())
    ref, noise = stock_runs(model, x)
    layers = mf.enable_deepspeed(model, PASS)
    names = [f"blocks.{i}.deepspeed_moe" for i in range(3)]
    assert list(layers) == names
    assert_identical(ref, run(model, x), f"{tag} passthrough", noise)
    for name in names:  # one forward + one backward: each direction once, nothing quantized
        assert rows_of(layers[name]) == ((1, 1, 1, 1), (0, 0, 0, 0)), layers[name]
        assert layers[name].bytes_sent == layers[name].bf16_bytes
    mod = model.blocks[0].deepspeed_moe
    assert {"forward", "_moe_flashcomm"} <= set(vars(mod))

    restored = mf.disable_deepspeed(model)
    assert list(restored) == names
    assert not any({"forward", "_moe_flashcomm"} & set(vars(b.deepspeed_moe)) for b in model.blocks)
    assert_identical(ref, run(model, x), f"{tag} after disable_deepspeed", noise)
    assert exchange_stats(model) == {}

    # per-layer configs: rules by index and by name; the whole DeepSpeed config dict works too
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    from deepspeed.utils import logger
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # DeepSpeed's logger shows WARNING and above by default
    try:
        layers = mf.enable_deepspeed(model, {"train_batch_size": 8, "moe_flashcomm": {
            "dispatch": 4, "combine": 4, "gate": False,
            "layers": [{"index": 0, **PASS}, {"match": "blocks.2.*", "combine": 8}]}})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    run(model, x)
    first, second, third = (layers[n] for n in names)
    assert rows_of(first) == ((1, 1, 1, 1), (0, 0, 0, 0))
    assert rows_of(second) == rows_of(third) == ((1, 1, 1, 1), (1, 1, 1, 1))
    cfgs = {n: vars(model.get_submodule(n))["_moe_flashcomm"].config for n in names}
    assert cfgs[names[1]].combine == mf.LinkCodecs(4, 4) and cfgs[names[2]].combine == mf.LinkCodecs(8, 8)
    logged = [r.getMessage() for r in records if "moe_flashcomm" in r.getMessage()]
    if dist.get_rank() == 0:
        assert len(logged) == 1, logged
        assert "blocks.2.deepspeed_moe [MOELayer, ep_size=" in logged[0]
        assert "combine=int8/g128+spikes" in logged[0] and "dispatch=bf16" in logged[0]
    else:
        assert logged == []

    # errors that name the field, and no silent no-op
    with pytest.raises(mf.config.ConfigError, match=r"layers\[0\]\.index: 3 is out of range"):
        mf.enable_deepspeed(model, {"layers": [{"index": 3, "dispatch": 8}]})
    with pytest.raises(mf.config.ConfigError, match=r"FlashCommConfig\.dispatch_grad"):
        mf.enable_deepspeed(model, {"dispatch_grad": 17})
    with pytest.raises(ValueError, match="holds no DeepSpeed MoE layer"):
        mf.enable_deepspeed(nn.Linear(2, 2))
    mf.disable_deepspeed(model)

    from deepspeed.moe.sharded_moe import MOELayer

    class Wrapped(MOELayer):  # a forward of another shape than DeepSpeed's: refused, loudly
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    odd = make_moe(2 * ep, ep, 1, True, seed=4)
    odd.deepspeed_moe.__class__ = Wrapped
    with pytest.raises(RuntimeError, match=r"does not call _AllToAll\.apply"):
        mf.enable_deepspeed(odd)


def check_codec_bounds(tag: str) -> None:
    """Scaled-identity experts, fp32: int8 and int4 outputs within the codec bound of stock,
    for k = 1, 2, 3 and drop_tokens on/off; gradients (int8 codec) close; exchanges counted."""
    ep = dist.get_world_size()
    for k in (1, 2, 3):
        for drop in (True, False):
            moe = make_moe(2 * ep, ep, k, drop, expert=nn.Linear(H, H, bias=False),
                           dtype=torch.float32, seed=10 + k)
            scale = scaled_identity_experts(moe)
            x = tokens((2, 16, H), seed=100 + dist.get_rank(), dtype=torch.float32)
            ref, noise = stock_runs(moe, x)
            for bits in (8, 4):
                codec = mf.CodecConfig(bits=bits)
                layers = mf.enable_deepspeed(moe, {"dispatch": codec, "combine": codec, **NO_GATE})
                y, gx, gp = run(moe, x)
                excess = (y - ref[0]).abs() - scale * identity_bound(x, codec, codec)
                assert excess.max() <= 0, f"{tag} k={k} drop={drop} int{bits}: {excess.max()}"
                assert rows_of(layers["deepspeed_moe"]) == ((1, 1, 1, 1), (1, 1, 1, 1))
                # int8 gradients of int8 / int4 forwards
                # gradients (int8 codec) of an int8 / int4 forward: relative L2 error. Loose
                # (the gate's gradient is a difference of expert outputs), yet a wrongly
                # routed or wrongly decoded exchange is off by O(1)
                tol = 0.06 if bits == 8 else 0.3
                assert rel_err(gx, ref[1]) < tol / 3, (tag, k, drop, bits, rel_err(gx, ref[1]))
                for n, g in gp.items():
                    assert rel_err(g, ref[2][n]) < tol, (tag, k, drop, bits, n, rel_err(g, ref[2][n]))
                mf.disable_deepspeed(moe)
            assert_identical(ref, run(moe, x), f"{tag} k={k} drop={drop} after disable", noise)


def check_tutel(tag: str) -> None:
    """use_tutel=True: DeepSpeed takes Tutel's dispatcher but keeps its own all-to-all, which
    then is moe_flashcomm's. Without Tutel (CI) DeepSpeed silently falls back, still patched."""
    ep = dist.get_world_size()
    x = tokens((2, 16, H), seed=200 + dist.get_rank())
    fallback = make_moe(2 * ep, ep, 1, True, seed=20, use_tutel=True)
    import deepspeed.moe.sharded_moe as sm
    if not sm.TUTEL_INSTALLED:
        assert not fallback.deepspeed_moe.use_tutel
    ref = run(fallback, x)
    mf.enable_deepspeed(fallback, PASS)
    assert_identical(ref, run(fallback, x), f"{tag} use_tutel fallback")
    assert exchange_stats(fallback)["deepspeed_moe"].exchanges == 4

    with tutel_stand_in():
        for k in (1, 2):
            plain = make_moe(2 * ep, ep, k, True, seed=21 + k)
            tutel = make_moe(2 * ep, ep, k, True, seed=21 + k, use_tutel=True)
            assert tutel.deepspeed_moe.use_tutel
            ref = run(tutel, x)
            # the stand-in reproduces DeepSpeed's own (non-Tutel) dispatch
            torch.testing.assert_close(ref[0], run(plain, x)[0], rtol=0, atol=0)
            layers = mf.enable_deepspeed(tutel, PASS)
            assert_identical(ref, run(tutel, x), f"{tag} use_tutel k={k} passthrough")
            assert hasattr(tutel.deepspeed_moe, "_tutel_dispatcher")  # Tutel's path was taken
            assert layers["deepspeed_moe"].exchanges == 4
            mf.enable_deepspeed(tutel, {"dispatch": 8, "combine": 8, **NO_GATE})
            y = run(tutel, x)[0]
            assert layers["deepspeed_moe"].quantized_exchanges == 4
            assert rel_err(y, ref[0]) < 0.02, rel_err(y, ref[0])


def check_inference(tag: str) -> None:
    """DeepSpeedMoEInference.forward sends both all-to-alls through ``self._alltoall``; a
    patched instance routes them through moe_flashcomm (dispatch, then combine).

    The real class is instantiated without its __init__: that builds DeepSpeed's CUDA
    inference kernels (none on CPU), and in DeepSpeed 0.19.8 it cannot complete anywhere: it
    reads ``self.ep_group`` (for its TopKGate) one line before assigning it. So the method is
    tested on its own, on gloo and (multigpu) NCCL; the forward is not run."""
    from deepspeed.ops.transformer.inference.moe_inference import DeepSpeedMoEInference
    from deepspeed.utils import groups

    def bare():
        layer = DeepSpeedMoEInference.__new__(DeepSpeedMoEInference)
        nn.Module.__init__(layer)
        layer.ep_group = groups._get_expert_parallel_group(f"ep_size_{dist.get_world_size()}")
        return layer

    stock, layer = bare(), bare()
    ep = dist.get_world_size()
    x1, x2 = (tokens((2 * ep, 5, H), seed=s + dist.get_rank()) for s in (300, 400))
    with torch.no_grad():
        ref = stock._alltoall(x1), stock._alltoall(x2)
        stats = mf.enable_deepspeed(layer, PASS)[""]
        assert {"forward", "_alltoall"} <= set(vars(layer))
        assert torch.equal(layer._alltoall(x1), ref[0]) and torch.equal(layer._alltoall(x2), ref[1])
        assert stats.calls == {"dispatch": 1, "combine": 1, "dispatch_grad": 0, "combine_grad": 0}
        c8, c4 = mf.CodecConfig(bits=8), mf.CodecConfig(bits=4)
        mf.enable_deepspeed(layer, {"dispatch": c8, "combine": c4, **NO_GATE})
        # what arrives is the sender's rows through the codec: within one step of its group
        sent = {s: [tokens((2 * ep, 5, H), seed=s + p) for p in range(ep)] for s in (300, 400)}
        for x, codec, xs in ((x1, c8, sent[300]), (x2, c4, sent[400])):
            out = layer._alltoall(x)
            n = x.shape[0] // ep
            want = torch.cat([xs[p][dist.get_rank() * n:(dist.get_rank() + 1) * n] for p in range(ep)])
            assert ((out.float() - want.float()).abs() - step_bound(want, codec)
                    - 2 ** -8 * want.float().abs()).max() <= 0, tag
        assert stats.quantized == {"dispatch": 1, "combine": 1, "dispatch_grad": 0, "combine_grad": 0}
    mf.disable_deepspeed(layer)
    assert not {"forward", "_alltoall"} & set(vars(layer))


def check_autoep(tag: str, layers: int = 2) -> None:
    """Dropless AutoEP (_AllToAllV, uneven splits): passthrough identical to stock, int8
    close, bytes equal to the routed rows."""
    ep = dist.get_world_size()
    model = make_autoep(layers, 2 * ep, 2, ep, seed=30)
    x = tokens((2, 8, H), seed=500 + dist.get_rank())
    ref, noise = stock_runs(model, x)
    stats = mf.enable_deepspeed(model, PASS)
    names = [f"model.layers.{i}.mlp" for i in range(layers)]
    assert list(stats) == names and all("_forward" in vars(model.get_submodule(n)) for n in names)
    assert_identical(ref, run(model, x), f"{tag} AutoEP passthrough", noise)
    mf.disable_deepspeed(model)
    assert_identical(ref, run(model, x), f"{tag} AutoEP after disable", noise)

    c8 = mf.CodecConfig(bits=8)
    stats = mf.enable_deepspeed(model, {"dispatch": c8, "combine": c8, **NO_GATE})
    first = stats[names[0]]
    remote = autoep_remote_rows(model.get_submodule(names[0]), x)
    y = run(model, x)[0]
    assert rel_err(y, ref[0]) < 0.01, rel_err(y, ref[0])
    assert rows_of(first) == ((1, 1, 1, 1), (1, 1, 1, 1))
    # dispatch: exactly the (token, route) rows routed to experts on other ranks; every row
    # comes back in the combine (uneven splits: counts differ per rank, totals match)
    sent = {d: sum(v.values()) for d, v in first.bytes_sent.items()}  # both link classes
    assert sent["dispatch"] == remote * mf.record_bytes(H, c8), (sent, remote)
    assert _total_over_ranks(sent["combine"]) == _total_over_ranks(sent["dispatch"])
    # backward (int8 gradients): the combine's gradient retraces the dispatch, and back
    assert sent["combine_grad"] == remote * mf.record_bytes(H, 8)
    assert _total_over_ranks(sent["dispatch_grad"]) == _total_over_ranks(sent["combine_grad"])
    mf.disable_deepspeed(model)
    assert_identical(ref, run(model, x), f"{tag} AutoEP after int8 and disable")


# ---- training with deepspeed.initialize (ZeRO-2) ----------------------------------------------------
class Net(nn.Module):
    """Linear -> MoE (k=1) -> MoE (k=2) -> Linear, residual; returns the scalar loss."""

    def __init__(self, ep: int, experts: int):
        super().__init__()
        from deepspeed.moe.layer import MoE
        torch.manual_seed(0)
        self.inp = nn.Linear(H, H)
        self.moe1 = MoE(H, mlp(H), num_experts=experts, ep_size=ep, k=1, min_capacity=1)
        self.moe2 = MoE(H, mlp(H), num_experts=experts, ep_size=ep, k=2, min_capacity=1)
        self.out = nn.Linear(H, 1)

    def forward(self, x):
        h = self.inp(x)
        y1, aux1, _ = self.moe1(h)
        h = h + y1
        y2, aux2, _ = self.moe2(h)
        return self.out(h + y2).float().pow(2).mean() + 0.01 * (aux1 + aux2)


def train_engine(deepspeed, extra: dict, micro: int, accumulation: int):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    model = Net(dist.get_world_size(), 2 * dist.get_world_size())
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "all"})
    opt = torch.optim.AdamW(groups, lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
              "steps_per_print": 10 ** 6, **extra}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def check_zero2_training(tag: str) -> None:
    """deepspeed.initialize + ZeRO-2 with the config's "moe_flashcomm" section (int4 dispatch
    and combine, int8 gradients) and the one line enable_deepspeed(engine): every optimizer step
    makes exactly the exchanges the model implies (2 MoE layers x 2 micro-batches x dispatch,
    combine and their gradients), of exactly the expected size; the loss follows stock."""
    deepspeed = init_deepspeed()
    micro, accumulation, seq = 2, 2, 8
    section = {"dispatch": 4, "combine": 4, "dispatch_grad": 8, "combine_grad": 8, **NO_GATE}
    stock = train_engine(deepspeed, {}, micro, accumulation)
    quant = train_engine(deepspeed, {"moe_flashcomm": section}, micro, accumulation)
    stats = mf.enable_deepspeed(quant)  # the one line: reads quant's "moe_flashcomm" section
    assert list(stats) == ["moe1.deepspeed_moe", "moe2.deepspeed_moe"]
    ep = dist.get_world_size()
    experts, tokens_per_micro = 2 * ep, micro * seq
    losses = {"stock": [], "quant": []}
    for step in range(3):
        before = {n: ExchangeStats() + s for n, s in stats.items()}
        for m in range(accumulation):
            x = tokens((micro, seq, H), seed=1000 * step + 10 * m + dist.get_rank())
            for name, engine in (("stock", stock), ("quant", quant)):
                torch.manual_seed(step * 100 + m)
                loss = engine(x)
                engine.backward(loss)
                engine.step()
                losses[name].append(loss.item())
        for n, k in (("moe1.deepspeed_moe", 1), ("moe2.deepspeed_moe", 2)):
            now, was = stats[n], before[n]
            for d in now.calls:
                assert now.calls[d] - was.calls[d] == accumulation, (tag, n, d)
                assert now.quantized[d] - was.quantized[d] == accumulation, (tag, n, d)
            # capacity C = ceil(tokens / experts * k) rows per expert; E/ep experts' rows go
            # to each other rank in the stock exchange; skip_padding (on by default) sends
            # the filled ones, as int4 forward and int8 backward records
            rows = experts // ep * math.ceil(tokens_per_micro / experts * k) * (ep - 1)
            for d, bits in (("dispatch", 4), ("combine", 4), ("dispatch_grad", 8), ("combine_grad", 8)):
                got = now.bytes_sent[d]["intra_node"] - was.bytes_sent[d]["intra_node"]
                slots = now.slots_sent[d] - was.slots_sent[d]
                assert now.slots_stock[d] - was.slots_stock[d] == accumulation * rows, (tag, n, d)
                assert 0 < slots <= accumulation * rows, (tag, n, d, slots)
                assert got == slots * mf.record_bytes(H, bits), (tag, n, d, got)
    total = ExchangeStats.total(stats.values())
    assert total.exchanges == 3 * accumulation * 2 * 4 and total.compression > 2
    for p in quant.module.parameters():
        assert torch.isfinite(p).all()
    s, q = torch.tensor(losses["stock"]), torch.tensor(losses["quant"])
    assert ((q - s).abs() / s.abs()).max() < 0.05, (losses, tag)


def check_autoep_engine(tag: str) -> None:
    """AutoEP through deepspeed.initialize (its "expert_parallel" section replaces the
    Mixtral-shaped blocks), then enable_deepspeed(engine) from the same JSON. ZeRO stage 0:
    with this model stock DeepSpeed 0.19.8 fails ZeRO-1/2 on CPU by itself (IndexError in
    _get_flat_partition_unpadded), with or without moe_flashcomm."""
    deepspeed = init_deepspeed()
    ep = dist.get_world_size()
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 6,
              # torch's AdamW: DeepSpeed's bf16 optimizer wrapper breaks torch 2.11's Adagrad state
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 0}, "bf16": {"enabled": True},
              "expert_parallel": {**AUTOEP, "autoep_size": ep},
              "moe_flashcomm": {"dispatch": 4, "combine": {"bits": 8, "group_size": 64}, **NO_GATE}}
    engine, *_ = deepspeed.initialize(model=MixtralLike(2, 2 * ep, 2), config=config)
    stats = mf.enable_deepspeed(engine)
    assert list(stats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for step in range(2):
        x = tokens((1, 8, H), seed=2000 + 10 * step + dist.get_rank())
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert torch.isfinite(loss)
    # the first layer's input (the raw x) needs no gradient, so its dispatch has no backward
    first, second = stats.values()
    assert rows_of(first) == ((2, 2, 0, 2), (2, 2, 0, 2)), first
    assert rows_of(second) == ((2, 2, 2, 2), (2, 2, 2, 2)), second


def check_copy_and_pickle(tag: str) -> None:
    """A patched model deep-copies (its process groups shared through the memo, as stock
    DeepSpeed needs too) and pickles (torch.save of the whole module, before its groups are
    set): the copy / the loaded model is patched with the same config and fresh counters, and
    runs bit-identical to stock."""
    ep, rank = dist.get_world_size(), dist.get_rank()
    x = tokens((2, 16, H), seed=900 + rank)
    moe = make_moe(2 * ep, ep, 2, False, seed=90)
    # Stock DeepSpeed's own limits: a ProcessGroup cannot be copied, and after a forward the
    # layer holds its non-leaf l_aux, which deepcopy refuses; so copies are made before.
    with pytest.raises(TypeError, match="ProcessGroup"):
        copy.deepcopy(moe)
    stock = copy.deepcopy(moe, shared_groups(moe))
    ref, noise = stock_runs(stock, x)
    stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
    twin = copy.deepcopy(moe, shared_groups(moe))
    twin_stats = exchange_stats(twin)["deepspeed_moe"]
    assert twin_stats is not stats
    assert vars(twin.deepspeed_moe)["_moe_flashcomm"].config == vars(moe.deepspeed_moe)["_moe_flashcomm"].config
    assert_identical(ref, run(twin, x), f"{tag} deep copy", noise)
    assert twin_stats.exchanges == 4 and stats.exchanges == 0  # each counts its own
    # counters pickle and copy (not their memo of call shapes, which holds communicators)
    for copied in (pickle.loads(pickle.dumps(twin_stats)), copy.deepcopy(twin_stats)):
        assert copied.as_dict() == twin_stats.as_dict() and copied.exchanges == 4
    assert_identical(ref, run(moe, x), f"{tag} original of the deep copy", noise)
    assert mf.disable_deepspeed(twin) and "forward" not in vars(twin.deepspeed_moe)
    assert "forward" in vars(moe.deepspeed_moe)  # the original stays patched
    mf.disable_deepspeed(moe)

    # torch.save of a whole patched model (no process group in it yet), loaded and run
    ep_rank = rank % ep
    saved = make_moe(2 * ep, ep, 2, False, seed=90, ep_rank=ep_rank, groups=False)
    mf.enable_deepspeed(saved, {"dispatch": 8, "combine": 8, **NO_GATE})
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.set_deepspeed_parallelism()
    saved.set_deepspeed_parallelism()
    loaded_stats = exchange_stats(loaded)["deepspeed_moe"]
    assert loaded_stats.exchanges == 0
    original, spread = run(saved, x), run(saved, x)  # (CUDA: DeepSpeed's backward has atomics)
    assert_identical(original, run(loaded, x), f"{tag} torch.save / torch.load", spread)
    assert loaded_stats.quantized_exchanges == 4
    mf.disable_deepspeed(loaded)
    assert_identical(ref, run(loaded, x), f"{tag} loaded, then disabled", noise)


def check_torch_compile(tag: str) -> None:
    """torch.compile of a patched model (two MoE layers: their functions share DeepSpeed's
    code, which torch.compile caches per code object), with skip_padding on and off, gives
    the patched eager model's outputs exactly and its gradients within rounding (a compiled
    backward may sum them in another order), native and int8; the collectives run outside
    the graph (a graph break, as DeepSpeed's own all-to-all), counted. So does a backward
    under compiled autograd. The Communicator's calls compile too, an asynchronous handle's
    wait included."""
    init_deepspeed()
    ep, rank = dist.get_world_size(), dist.get_rank()
    x = tokens((2, 8, H), seed=950 + rank, dtype=torch.float32)

    def compiled_run(model):  # (the compiled wrapper prefixes "_orig_mod." to the names)
        torch._dynamo.reset()
        y, g, p = run(torch.compile(model, backend="aot_eager"), x)
        return y, g, {n.removeprefix("_orig_mod."): v for n, v in p.items()}

    def close_to(eager, got, what):
        assert torch.equal(eager[0], got[0]), f"{what}: outputs differ from eager"
        for a, b in [(eager[1], got[1])] + [(eager[2][n], got[2][n]) for n in eager[2]]:
            assert rel_err(b, a) < 1e-5, f"{what}: gradients differ from eager"

    for skip_padding in (True, False):
        model = Stack([make_moe(2 * ep, ep, 2, True, dtype=torch.float32, seed=s)
                       for s in (95, 96)])
        stock = run(model, x)
        for codec in ("native", 8):
            mf.enable_deepspeed(model, {"dispatch": codec, "combine": codec, "dispatch_grad": codec,
                                        "combine_grad": codec, "skip_padding": skip_padding,
                                        **NO_GATE})
            eager = run(model, x)
            if codec == "native":
                assert_identical(stock, eager, f"{tag} native eager")
            before = [s.exchanges for s in exchange_stats(model).values()]
            close_to(eager, compiled_run(model),
                     f"{tag} torch.compile skip_padding={skip_padding} {codec}")
            # the compiled run made each layer's four exchanges, counted
            assert [s.exchanges for s in exchange_stats(model).values()] == [n + 4 for n in before]
            if skip_padding and codec == 8:  # the backward traced by compiled autograd
                from torch._dynamo import compiled_autograd
                torch._dynamo.reset()
                with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                    close_to(eager, run(model, x), f"{tag} compiled autograd")
            mf.disable_deepspeed(model)
    torch._dynamo.reset()

    with mf.Communicator() as comm:
        y = torch.arange(8 * H, dtype=torch.float32).view(8, H) / 7 + rank

        def calls(y):
            a = comm.all_to_all(y * 2, codec=8)
            b = mf.all_to_all(y + 1, codec="native")
            c = comm.all_to_all(y - 1, codec=4, async_op=True).wait()
            return a, b, c, comm.all_reduce(y.clone(), codec=8), mf.all_reduce(y.clone(), codec=4)

        want = calls(y)
        for got in (torch.compile(calls, backend="eager")(y),
                    torch.compile(calls, backend="aot_eager")(y)):
            assert all(torch.equal(u, v) for u, v in zip(want, got)), f"{tag}: compiled calls"
    torch._dynamo.reset()


# ---- what runs in the spawned processes ---------------------------------------------------------------
def check_ranks_that_disagree(tag: str) -> None:
    """A layer disabled on one rank only, or a config that fails on one rank only: every rank
    raises within seconds (no hang in the other ranks' collective), and the model still works
    when enabled the same way everywhere afterwards. Each layer's communicator is the one
    enable_deepspeed made, and disable_deepspeed closes it."""
    ep = dist.get_world_size()
    moe = make_moe(ep, ep, 2, True, seed=43)
    x = tokens((2, 8, H), seed=650 + dist.get_rank())
    ref = run(moe, x)
    start = time.monotonic()
    rule = {"match": "*", "enabled": dist.get_rank() != 0}
    with pytest.raises(mf.comm.ConfigMismatchError, match="enabled differs"):
        mf.enable_deepspeed(moe, {**PASS, "layers": [rule]})
    bad = {**PASS, "dispatch": 9} if dist.get_rank() == 1 else PASS
    with pytest.raises((ValueError, mf.comm.ConfigMismatchError),
                       match="CodecConfig.bits|failed on rank"):
        mf.enable_deepspeed(moe, bad)
    # a layer that one rank cannot patch (another wrapper left an instance attribute there):
    # that rank's error names it, and the other ranks raise too instead of waiting for it
    (layer,) = [m for m in moe.modules() if type(m).__name__ == "MOELayer"]
    if dist.get_rank() == 1:
        layer.forward = layer.forward  # (as a wrapper library would)
    with pytest.raises((RuntimeError, mf.comm.ConfigMismatchError),
                       match="already has an instance attribute 'forward'"):
        mf.enable_deepspeed(moe, PASS)
    layer.__dict__.pop("forward", None)
    # models whose MoE layers differ between the ranks (here: named differently)
    named = nn.ModuleDict({"first" if dist.get_rank() == 0 else "second": moe})
    with pytest.raises(mf.comm.ConfigMismatchError,
                       match=r"this rank has layers \['(first|second)\.deepspeed_moe'\], rank"):
        mf.enable_deepspeed(named, PASS)
    # gates that size capacities differently (drop_tokens on one rank only): the first forward
    # put the ranks in different collectives (DeepSpeed's capacity all-reduce against the
    # counts exchange), where they waited for the timeout
    layer.gate.drop_tokens = dist.get_rank() != 1
    with pytest.raises(mf.comm.ConfigMismatchError, match="gate settings differs .*'drop_tokens'"):
        mf.enable_deepspeed(moe, PASS)
    layer.gate.drop_tokens = True
    assert time.monotonic() - start < 10, f"{tag}: disagreement took too long to raise"
    # a layer rule that selects no layer is a warning naming the layers there are
    from moe_flashcomm.integrations.patching import ds_logger
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    ds_logger().addHandler(handler)
    try:
        mf.enable_deepspeed(moe, {**PASS, "layers": [{"match": "decoder.*", "dispatch": 4}]})
    finally:
        ds_logger().removeHandler(handler)
    said = ("layers[0].match ['decoder.*'] selects no layer on any rank; rank 0's MoE layers "
            "are: ['deepspeed_moe']")
    assert (said in seen.getvalue()) == (dist.get_rank() == 0), seen.getvalue()  # (once)
    mf.disable_deepspeed(moe)
    # equal gate tables read from files of different paths (one per rank) agree
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"gate-{dist.get_rank()}.json")
        with open(path, "w") as f:
            json.dump({"thresholds": {"cpu": {"*": 1}}}, f)
        mf.enable_deepspeed(moe, {**PASS, "gate": path})
    mf.enable_deepspeed(moe, PASS)
    (state,) = [m.__dict__["_moe_flashcomm"] for m in moe.modules() if "_moe_flashcomm" in m.__dict__]
    assert state.comm is not None and not state.comm.closed
    assert_identical(ref, run(moe, x), f"{tag} after disagreements")
    comm = state.comm
    mf.disable_deepspeed(moe)
    assert comm.closed


def _world2(rank: int, world: int) -> None:
    init_deepspeed()
    tag = f"rank {rank}/{world} {dist.get_backend()}"
    check_ranks_that_disagree(tag)
    check_copy_and_pickle(tag)
    check_passthrough_and_disable(tag)
    check_codec_bounds(tag)
    check_tutel(tag)
    check_inference(tag)
    check_autoep(tag)


def _world2_training(rank: int, world: int) -> None:
    tag = f"rank {rank}/{world} {dist.get_backend()}"
    check_torch_compile(tag)
    check_zero2_training(tag)
    check_autoep_engine(tag)


def _world4(rank: int, world: int, tensor_parallel: bool = False) -> None:
    """Two "nodes" of two ranks (LOCAL_WORLD_SIZE=2): bytes per link class; ep=4 layers;
    then, on NCCL, expert tensor parallelism (tp=2 x ep=2)."""
    init_deepspeed()
    tag = f"rank {rank}/{world} {dist.get_backend()}"
    check_link_classes(tag)
    check_hierarchical(tag)
    check_pipeline_stages(tag)
    check_autoep(tag, layers=1)
    if tensor_parallel:
        check_expert_tensor_parallel(tag)


def check_link_classes(tag: str) -> None:
    """Codec per link class: bf16 to the peer on this node, int4 across nodes."""
    ep = dist.get_world_size()
    moe = make_moe(ep, ep, 1, True, seed=40)  # one expert per rank
    x = tokens((2, 16, H), seed=600 + dist.get_rank())
    ref = run(moe, x)
    mf.enable_deepspeed(moe, PASS)
    assert_identical(ref, run(moe, x), f"{tag} ep=4 passthrough")
    mf.disable_deepspeed(moe)
    links = {"intra_node": "bf16", "inter_node": 4}
    stats = mf.enable_deepspeed(moe, {"dispatch": links, "combine": links, "skip_padding": False,
                                      **NO_GATE})["deepspeed_moe"]
    y = run(moe, x)[0]
    assert rel_err(y, ref[0]) < 0.1
    cap = math.ceil(32 / ep)  # k=1, 32 tokens, capacity factor 1
    for d in ("dispatch", "combine"):
        assert stats.bytes_sent[d] == {"intra_node": cap * H * 2,  # one peer, raw bf16
                                       "inter_node": 2 * cap * mf.record_bytes(H, 4)}, stats
    assert stats.quantized["dispatch"] == 1
    mf.disable_deepspeed(moe)


def check_hierarchical(tag: str) -> None:
    """2 nodes x 2 ranks: the hierarchical algorithm gives exactly the flat one's outputs and
    gradients through DeepSpeed; ranks enabled with different algorithms all raise."""
    ep = dist.get_world_size()
    moe = make_moe(ep, ep, 2, True, seed=41)
    x = tokens((2, 16, H), seed=700 + dist.get_rank())
    results = {}
    from tests.test_hierarchical import Counter
    for algorithm in ("flat", "hierarchical"):
        mf.enable_deepspeed(moe, {"dispatch": 4, "combine": 4, "algorithm": algorithm, **NO_GATE})
        with Counter() as counted:  # (the hierarchical exchange ran, or not)
            results[algorithm] = run(moe, x)
        assert (counted.calls > 0) == (algorithm == "hierarchical"), (tag, algorithm, counted.calls)
    assert_identical(results["flat"], results["hierarchical"], f"{tag} hierarchical vs flat")
    mixed = "hierarchical" if dist.get_rank() == 0 else "flat"
    with pytest.raises(mf.comm.ConfigMismatchError, match="algorithm differs"):
        mf.enable_deepspeed(moe, {"algorithm": mixed})
    mf.disable_deepspeed(moe)


def check_pipeline_stages(tag: str) -> None:
    """Pipeline stages hold different MoE layers: ranks 0-1 one layer, ranks 2-3 another,
    each stage its own expert-parallel group. Only ranks that share a group must agree (the
    whole job once had to: every stage raised). One that differs inside a stage raises on
    every rank within seconds, naming the two that differ: the other stage would otherwise
    go on and wait for it at its first pipeline send."""
    rank, ep = dist.get_rank(), 2
    stage = rank // ep
    moe = nn.Sequential(OrderedDict({f"stage{stage}": make_moe(ep, ep, 2, True, seed=44 + stage)}))
    x = tokens((2, 8, H), seed=800 + rank)
    ref = run(moe, x)
    algorithm = "hierarchical" if stage == 0 else "flat"  # stage groups for stage 0 only
    mf.enable_deepspeed(moe, {**PASS, "algorithm": algorithm})
    assert_identical(ref, run(moe, x), f"{tag} stage {stage} ({algorithm})")
    start = time.monotonic()
    cfg = {**PASS, "dispatch": 8 if rank == 3 else 4}
    bits = {2: 4, 3: 8}  # ranks 2 and 3's dispatch widths
    seen = (rf"\(this rank int{bits[rank]}/g128\+spikes, rank {5 - rank} "
            rf"int{bits[5 - rank]}/g128\+spikes" if stage == 1
            else r"\(rank 2 int4/g128\+spikes, rank 3 int8/g128\+spikes")
    with pytest.raises(mf.comm.ConfigMismatchError,
                       match=r"ranks 2 and 3 resolved different layer configs: layer "
                             rf"'stage1.deepspeed_moe': dispatch differs {seen}"):
        mf.enable_deepspeed(moe, cfg)
    assert time.monotonic() - start < 10, f"{tag}: disagreement took too long to raise"
    # the stages agree among themselves again: each enables its own layer
    mf.enable_deepspeed(moe, {**PASS, "dispatch": 8 if stage == 1 else 4})
    assert rel_err(run(moe, x)[0], ref[0]) < 0.1
    mf.disable_deepspeed(moe)


class TensorParallelUnit:
    """A Megatron-style model-parallel unit (what a user passes as ``mpu``): tensor-parallel
    groups of ``tp`` consecutive ranks, data-parallel groups across them."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp = tp
        for start in range(0, world, tp):
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                self.tp_group = g
        for lane in range(tp):
            g = dist.new_group(list(range(lane, world, tp)))
            if rank % tp == lane:
                self.dp_group = g

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_rank(self):
        return dist.get_rank() % self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return dist.get_world_size() // self.tp

    def get_data_parallel_rank(self):
        return dist.get_rank() // self.tp


def check_expert_tensor_parallel(tag: str) -> None:
    """tp=2 x ep=2 with enable_expert_tensor_parallelism: DeepSpeed drops the duplicate tokens
    of the tensor-parallel peers before the all-to-all (drop_tokens) and gathers them after
    (gather_tokens); the all-to-all between them is moe_flashcomm's. NCCL only: DeepSpeed's
    gather_tokens all-gathers into a flat buffer, which gloo rejects (stock DeepSpeed fails)."""
    from deepspeed.utils import groups
    tp = 2
    groups.mpu = TensorParallelUnit(tp)
    try:
        moe = make_moe(4, 2, 1, True, seed=50, enable_expert_tensor_parallelism=True)
        assert groups._get_expert_model_parallel_world_size() == tp
        x = tokens((2, 16, H), seed=700 + dist.get_rank() // tp)  # identical on TP peers
        ref, noise = stock_runs(moe, x)
        stats = mf.enable_deepspeed(moe, PASS)["deepspeed_moe"]
        assert_identical(ref, run(moe, x), f"{tag} expert TP passthrough", noise)
        # each rank sends half of its capacity slice (C/tp tokens of E/ep experts)
        cap = math.ceil(32 / 4)
        assert stats.bytes_sent["dispatch"]["intra_node"] == 2 * (cap // tp) * H * 2, stats
        mf.enable_deepspeed(moe, {"dispatch": 8, "combine": 8, **NO_GATE})
        y = run(moe, x)[0]
        assert stats.quantized["dispatch"] == 1 and rel_err(y, ref[0]) < 0.02
        assert stats.bytes_sent["dispatch"]["intra_node"] == 2 * (cap // tp) * (
            H * 2 + mf.record_bytes(H, 8))
        mf.disable_deepspeed(moe)
        assert_identical(ref, run(moe, x), f"{tag} expert TP after disable", noise)
    finally:
        groups.mpu = None


# ---- the tests -----------------------------------------------------------------------------------------
def test_layers_gloo_2_ranks():
    spawn(_world2, 2)


def test_zero2_training_gloo_2_ranks():
    spawn(_world2_training, 2)


def test_link_classes_hierarchical_pipeline_autoep_gloo_4_ranks():
    """(Expert tensor parallelism: test_expert_tensor_parallel_nccl_4_gpus only.)"""
    spawn(_world4, 4, env={"LOCAL_WORLD_SIZE": 2})


def test_version_checks(monkeypatch):
    import deepspeed

    from moe_flashcomm.integrations import patching as integ
    assert integ.version_tuple("0.19.8") == (0, 19, 8)
    assert integ.version_tuple("0.20.0rc1+abc") == (0, 20, 0)
    assert integ.version_tuple("1.0") == (1, 0, 0)
    integ.import_deepspeed.cache_clear()
    monkeypatch.setattr(deepspeed, "__version__", "0.15.4")
    try:
        with pytest.raises(RuntimeError, match=r"supports DeepSpeed >= 0\.16\.0 .*found 0\.15\.4"):
            mf.enable_deepspeed(nn.Linear(2, 2))
    finally:
        integ.import_deepspeed.cache_clear()


def test_stats_readers_refuse_an_unknown_direction_or_link():
    """A misspelt direction or link class raises, naming the allowed ones (it matched
    nothing and read as 0 bytes, 0 seconds or a slot share of 1.0)."""
    stats = ExchangeStats()
    stats.bytes_sent["dispatch"]["inter_node"] = 100
    stats.slots_sent["dispatch"], stats.slots_stock["dispatch"] = 1, 4
    assert stats.link_bytes("inter_node") == 100 and stats.slot_share("dispatch") == 0.25
    with pytest.raises(ValueError, match=r"link must be None or one of \('intra_node', 'inter_node'\), got 'inter'"):
        stats.link_bytes("inter")
    with pytest.raises(ValueError, match=r"direction must be None or one of .*'dispatch_grad'.*got 'dispatch_gradient'"):
        stats.slot_share("dispatch_gradient")
    with pytest.raises(ValueError, match="direction must be None or one of"):
        stats.elapsed("fwd")


@pytest.mark.multigpu
def test_layers_nccl_2_gpus():
    spawn(_world2, 2, backend="nccl")


@pytest.mark.multigpu
def test_zero2_training_nccl_2_gpus():
    spawn(_world2_training, 2, backend="nccl")


@pytest.mark.multigpu
def test_expert_tensor_parallel_nccl_4_gpus():
    if torch.cuda.device_count() < 4:
        pytest.skip(f"tp=2 x ep=2 needs 4 CUDA GPUs, found {torch.cuda.device_count()}")
    spawn(_world4, 4, True, backend="nccl", env={"LOCAL_WORLD_SIZE": 2})
