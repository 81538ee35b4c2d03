"""Opt-in: DeepSpeed's tensor-parallel *inference* all-reduces of activations go through
``moe_flashcomm.all_reduce`` (the two-step quantized all-reduce).

Enabled by ``enable_all_reduce(model, config)`` when ``config.all_reduce`` (the
``"all_reduce"`` field of the ``"moe_flashcomm"`` DeepSpeed section) names a codec; off by
default. ``enable_deepspeed`` applies the same field of its config (``enable_from_section``):
set, it installs or updates these hooks; off, it removes only those it installed itself. An
inference engine carries no ``"moe_flashcomm"`` section: pass the config explicitly,
``enable_all_reduce(engine, {"all_reduce": 4})``. As ``enable_deepspeed`` does for the MoE
all-to-all, each layer *instance* is patched, reversibly: the instance gets its own copy of
one DeepSpeed method (same code object) in which one global name resolves to moe_flashcomm;
nothing global is touched, so every other all-reduce (gradients, ZeRO, other layers) stays
NCCL's.

Sites (DeepSpeed 0.19.8), the method run per instance and the global name it sees:

* ``LinearAllreduce`` (deepspeed/module_inject/layers.py: AutoTP's row-parallel linear,
  ``deepspeed.init_inference(tensor_parallel=...)`` without kernel injection; subclasses
  that keep its ``forward``, e.g. ``Conv_LinearALlreduce``): ``forward``, ``RowParallel``.
  In inference mode its all-reduce (``dist.inference_all_reduce``) is moe_flashcomm's; in
  training mode DeepSpeed's ``RowParallel`` runs unchanged. Not patched: subclasses with
  their own forward, ``LmHeadLinearAllreduce`` (the logits stay exact) and
  ``LinearAllreduceWithReplicatedInput`` (a training layer).
* ``DeepSpeedSelfAttention`` (ops/transformer/inference/ds_attention.py, kernel injection,
  also inside ``DeepSpeedMoEInference``): ``forward``, ``dist`` (its
  ``dist.all_reduce(output, group=self.mp_group)``).
* ``DeepSpeedMLP`` (ds_mlp.py): ``forward``, ``dist``.
* ``DeepSpeedMoEMLP`` (moe_inference.py: the experts and the residual MLP of
  ``DeepSpeedMoEInference``): ``forward``, ``DeepSpeedMLPFunction`` (its ``apply`` runs the
  Function's forward with ``dist`` resolved to moe_flashcomm; inference has no backward).

Where ``dist`` is swapped, only ``all_reduce`` / ``inference_all_reduce`` with a sum change;
every other ``dist`` attribute is DeepSpeed's. A tensor of a dtype the codecs do not take
(only fp32, bf16 and fp16: float64, say) goes to DeepSpeed's own all-reduce, at every site.
Each patched forward checks that its all-reduce went through moe_flashcomm when its group
has more than one rank, so a
DeepSpeed whose layer stopped calling the patched name fails loudly instead of silently
running stock.

Algorithm: a codec with different ``intra_node`` / ``inter_node`` codecs, or the config's
``algorithm == "hierarchical"``, selects the hierarchical all-reduce (on a group inside
one node: the flat one with ``intra_node``); else flat. The config's ``gate`` and ``chunks``
apply.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..codec.reference import INPUT_DTYPES
from ..comm.all_reduce import all_reduce
from ..comm.direct import Done
from ..comm.gate import SizeGate
from ..comm.topology import LinkCodecs
from ..config import FlashCommConfig
from .patching import (PatchState, Site, StandIn, agree, check_patchable, compared_fields,
                       ds_logger, group_ranks, import_deepspeed, patch, rank0, rebind, resolve,
                       states, unpatch, unsupported, unwrap, uses_global)

_STATE = "_moe_flashcomm_all_reduce"  # instance attribute of a patched layer


@dataclass
class AllReduceStats:
    """Counters of one patched layer: all-reduces through moe_flashcomm and their values."""

    calls: int = 0
    values: int = 0


# ---- the sites ----------------------------------------------------------------------------------
_SITES = (  # (site, what stands in for its global name)
    (Site("deepspeed.module_inject.layers", "LinearAllreduce", "forward", "RowParallel"),
     "row_parallel"),
    (Site("deepspeed.ops.transformer.inference.ds_attention", "DeepSpeedSelfAttention", "forward",
          "dist"), "dist"),
    (Site("deepspeed.ops.transformer.inference.ds_mlp", "DeepSpeedMLP", "forward", "dist"), "dist"),
    (Site("deepspeed.ops.transformer.inference.moe_inference", "DeepSpeedMoEMLP", "forward",
          "DeepSpeedMLPFunction"), "mlp_function"),
)


def _site_of(module: nn.Module) -> Optional[Site]:
    """The site of ``module``: an instance of a site class whose ``method`` is the site
    class's own (a subclass overriding it is not patched)."""
    for site, _ in _SITES:
        klass = site.cls()
        if klass is not None and isinstance(module, klass) \
                and getattr(type(module), site.method, None) is getattr(klass, site.method):
            return site
    return None


# ---- what stands in -------------------------------------------------------------------------------
def _is_deepspeed_sum(op: Any) -> bool:
    """Whether a patched layer's ``deepspeed.comm.all_reduce`` op is a plain sum: None
    (DeepSpeed's default), torch's SUM, or DeepSpeed's own enum member named SUM. (The
    public all_reduce's check, comm/all_reduce.py ``_is_sum``, takes "sum" and torch's.)"""
    try:
        # torch's op, or DeepSpeed's own enum member named SUM (not PREMUL_SUM: its factor)
        return op is None or op == dist.ReduceOp.SUM or str(op).upper().endswith(".SUM")
    except Exception:  # noqa: BLE001
        return False


class _Dist(StandIn):
    """``deepspeed.comm`` as a patched method sees it: ``all_reduce`` and
    ``inference_all_reduce`` of a sum go to the layer's moe_flashcomm all-reduce; everything
    else is ``deepspeed.comm`` itself."""

    def __init__(self, real: Any, state: "_LayerState") -> None:
        super().__init__(state)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def all_reduce(self, tensor, op=None, group=None, async_op=False, **kwargs):
        return self._sum("all_reduce", tensor, op, group, async_op, kwargs)

    def inference_all_reduce(self, tensor, op=None, group=None, async_op=False, **kwargs):
        return self._sum("inference_all_reduce", tensor, op, group, async_op, kwargs)

    def _sum(self, name: str, tensor, op, group, async_op: bool, kwargs: dict):
        """A sum of a dtype the codecs take: the layer's all-reduce; anything else:
        ``deepspeed.comm``'s own ``name`` with the caller's arguments (its inference
        all-reduce may run on another backend than its all_reduce)."""
        if not _is_deepspeed_sum(op) or tensor.dtype not in INPUT_DTYPES:
            if _is_deepspeed_sum(op):  # a dtype the codecs do not take (float64, ints)
                self.state.passed_on()
            given = {} if op is None else {"op": op}
            return getattr(self._real, name)(tensor, group=group, async_op=async_op, **given,
                                             **kwargs)
        self.state.all_reduce(tensor, group)
        return Done() if async_op else None


class _RowParallel(StandIn):
    """``RowParallel`` as a patched ``LinearAllreduce.forward`` sees it."""

    def __init__(self, real: Any, state: "_LayerState") -> None:
        super().__init__(state)
        self._real = real

    def apply(self, group, input: torch.Tensor, is_inference_mode: bool) -> torch.Tensor:
        # None: no tensor parallelism, DeepSpeed's RowParallel leaves the input alone (it is
        # not the default group)
        if not is_inference_mode or group is None or dist.get_world_size(group) == 1:
            return self._real.apply(group, input, is_inference_mode)
        if input.dtype not in INPUT_DTYPES:  # (float64): DeepSpeed's own all-reduce
            self.state.passed_on()
            return self._real.apply(group, input, is_inference_mode)
        self.state.all_reduce(input, group)
        return input


class _MLPFunction:
    """``DeepSpeedMLPFunction`` as a patched ``DeepSpeedMoEMLP.forward`` sees it: ``apply``
    runs the Function's forward (inference: no autograd) with ``dist`` resolved to
    moe_flashcomm."""

    def __init__(self, real: Any, state: "_LayerState") -> None:
        fwd = real.forward
        self._forward = rebind(fwd, {"dist": _Dist(fwd.__globals__["dist"], state)})

    def apply(self, *args: Any) -> torch.Tensor:
        return self._forward(None, *args)


_STAND_INS: dict = {"row_parallel": _RowParallel, "dist": _Dist, "mlp_function": _MLPFunction}


# ---- a patched layer -----------------------------------------------------------------------------
class _LayerState(PatchState):
    """A patched layer: its name, config, counters and its own copy of the site's method."""

    ATTR = _STATE

    def __init__(self, name: str, site: Site, config: FlashCommConfig,
                 from_section: bool = False) -> None:
        super().__init__(name, site, config)
        self.calls = 0
        # installed by enable_deepspeed from its config (which then may remove it again),
        # not by a call of enable_all_reduce
        self.from_section = from_section

    def __reduce__(self):
        return type(self), (self.name, self.site, self.config, self.from_section)

    def new_stats(self) -> AllReduceStats:
        return AllReduceStats()

    def configure(self, config: FlashCommConfig) -> None:
        codecs: LinkCodecs = config.all_reduce
        self.config, self.codec = config, codecs
        self.algorithm = ("hierarchical" if config.algorithm == "hierarchical"
                          or codecs.intra_node != codecs.inter_node else "flat")
        self.gate = SizeGate.coerce(config.gate)

    def bind(self, layer: nn.Module) -> Callable:
        site = self.site
        fn = getattr(type(layer), site.method)
        if not uses_global(fn, site.global_name):
            raise unsupported(f"{type(layer).__qualname__}.{site.method}() of '{self.name}' does not "
                              f"use the global name {site.global_name!r}")
        kind = dict(_SITES)[site]
        stand_in = _STAND_INS[kind](fn.__globals__[site.global_name], self)
        return rebind(fn, {site.global_name: stand_in})

    def passed_on(self) -> None:
        """A sum whose dtype the codecs do not take (only fp32, bf16, fp16) went to DeepSpeed's
        own all-reduce: not in the stats, but the forward did call the patched name (``run``
        checks that it did)."""
        self.calls += 1

    def all_reduce(self, tensor: torch.Tensor, group) -> None:
        codec = self.codec if self.algorithm == "hierarchical" else self.codec.intra_node
        all_reduce(tensor, group=group, codec=codec, algorithm=self.algorithm, gate=self.gate,
                   chunks=self.config.chunks)
        self.calls += 1
        self.stats.calls += 1
        self.stats.values += tensor.numel()

    def run(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        impl = self.impl(layer)
        outer, self.calls = self.calls, 0
        try:
            out = impl(layer, *args, **kwargs)
            calls = self.calls
        finally:
            self.calls = outer
        if calls == 0 and _expects_all_reduce(self.site, layer):
            raise unsupported(f"{self.site.cls_name} '{self.name}' ran a forward without its "
                              "all-reduce going through moe_flashcomm")
        return out


def _expects_all_reduce(site: Site, layer: nn.Module) -> bool:
    """Whether one forward of ``layer`` must all-reduce (tensor parallelism, inference)."""
    if site.cls_name == "LinearAllreduce":
        group = getattr(layer, "mp_group", None)
        return group is not None and dist.get_world_size(group) > 1 and not layer.is_training_mode()
    if site.cls_name == "DeepSpeedSelfAttention" and not getattr(layer.config, "mlp_after_attn", True):
        return False
    group = getattr(layer, "mp_group", None)
    return group is not None and dist.get_world_size(group) > 1


def _states(root: nn.Module, config: FlashCommConfig, from_section: bool) -> list:
    """(name, layer, state) of every site of ``root``: its own state where it is patched
    already, else a new one checked to be installable. Run in the agreed ``prepare``: a
    layer that cannot be patched on any rank raises on every rank before any is patched
    (every model stays as it was)."""
    out = []
    for name, module in root.named_modules():
        site = _site_of(module)
        if site is not None:
            state = vars(module).get(_STATE)
            if state is None:
                state = _LayerState(name, site, config, from_section)
                check_patchable(module, state)
            out.append((name, module, state))
    return out


# ---- public API ------------------------------------------------------------------------------------
def enable_all_reduce(model: Any,
                      config: Union[FlashCommConfig, Mapping[str, Any], str, os.PathLike,
                                    None] = None) -> dict[str, AllReduceStats]:
    """Send the tensor-parallel inference all-reduces of ``model``'s DeepSpeed layers
    (module docstring) through ``moe_flashcomm.all_reduce`` with ``config.all_reduce``.

    model:  an ``nn.Module`` or a DeepSpeed engine (``deepspeed.init_inference`` /
            ``deepspeed.initialize``).
    config: a FlashCommConfig, a dict of its fields, a whole DeepSpeed config dict (its
            ``"moe_flashcomm"`` section), a DeepSpeed JSON config file's path (its section),
            or None: the engine's section when ``model`` is a training engine, else the
            defaults (``enable_deepspeed`` says more). ``all_reduce`` None (the default)
            turns the hooks off: previously patched layers are restored.
    Returns the live AllReduceStats of every patched layer, by qualified module name.
    """
    import_deepspeed()

    def prepare() -> tuple:
        root, cfg = resolve(model, config)
        on = cfg.all_reduce is not None and cfg.enabled
        return root, cfg, on, _states(root, cfg, from_section=False) if on else []

    root, cfg, on, found = _agree(prepare)
    if not on:
        restored = disable_all_reduce(root)
        if rank0():
            ds_logger().info("moe_flashcomm: all_reduce is off in the config (the default): "
                              f"DeepSpeed's own all-reduces ({len(restored)} layer(s) restored)")
        return {}
    return _enable(root, cfg, found, from_section=False)


def enable_from_section(model: Any, config: FlashCommConfig) -> None:
    """``enable_deepspeed``'s share: its config's ``all_reduce`` installs or updates the hooks;
    off, only the layers an earlier ``enable_deepspeed`` patched are restored (a separate
    ``enable_all_reduce`` call's stay)."""
    root, _ = unwrap(model)
    on = config.all_reduce is not None and config.enabled
    found = _agree(lambda: (root, config, on,
                            _states(root, config, from_section=True) if on else []))[3]
    if on:
        _enable(root, config, found, from_section=True)
    else:
        _restore(root, lambda state: state.from_section)


def _agree(prepare: Callable[[], tuple]) -> tuple:
    """``prepare()`` (root, config, on, the ``_states`` to enable) on every rank, then their
    agreement (``patching.agree``): a rank that fails (a layer that cannot be patched, say)
    makes every rank raise, and so do two ranks of one tensor-parallel group that would
    all-reduce differently (one through moe_flashcomm, the other DeepSpeed's own: both would
    wait for good)."""
    return agree(prepare, _summary, "moe_flashcomm.enable_all_reduce",
                 "ranks that share a tensor-parallel group must enable the same all-reduce "
                 "config")[0]


def _summary(out: tuple) -> tuple:
    """What ``agree`` compares: per all-reduce site with a group, the all-reduce's settings
    (or "off"); the ranks of those groups."""
    root, cfg, on, _ = out
    fields = (compared_fields(cfg, ("all_reduce", "algorithm", "gate", "chunks")) if on
              else {"all_reduce": "off"})
    layers, ranks = [], {dist.get_rank()}
    for name, module in root.named_modules():
        group = getattr(module, "mp_group", None)
        if group is not None and _site_of(module) is not None:
            layers.append((name, fields))
            ranks.update(group_ranks(group, name, "mp_group"))
    return layers, ranks, None


def _enable(root: nn.Module, cfg: FlashCommConfig, found: list, from_section: bool
            ) -> dict[str, AllReduceStats]:
    """Patch or reconfigure the layers ``found`` (``_states``, checked and agreed)."""
    ds = import_deepspeed()
    enabled: dict[str, AllReduceStats] = {}
    for name, module, state in found:
        if state is vars(module).get(_STATE):  # enabled again: new config, same counters
            state.configure(cfg)
            state.from_section = from_section  # (the latest call owns it)
        else:
            patch(module, state)
        enabled[name] = state.stats
    if not enabled and rank0():
        ds_logger().warning(
            f"moe_flashcomm.enable_all_reduce: {type(root).__name__} has no tensor-parallel "
            "all-reduce site (LinearAllreduce, DeepSpeedSelfAttention, DeepSpeedMLP, "
            "DeepSpeedMoEMLP): nothing patched")
    elif rank0():
        ds_logger().info(f"moe_flashcomm: {len(enabled)} tensor-parallel all-reduce site(s) use "
                          f"all_reduce codec {cfg.all_reduce} (DeepSpeed {ds.__version__}): "
                          f"{list(enabled)}")
    return enabled


def disable_all_reduce(model: Any) -> dict[str, AllReduceStats]:
    """Restore DeepSpeed's own all-reduce on every layer ``enable_all_reduce`` patched in
    ``model``. Returns the final AllReduceStats of those layers."""
    root, _ = unwrap(model)
    return _restore(root, lambda state: True)


def _restore(root: nn.Module, which: Callable[[_LayerState], bool]) -> dict[str, AllReduceStats]:
    """Unpatch the layers of ``root`` whose state ``which`` selects: their final stats."""
    restored = {}
    for name, module in root.named_modules():
        state = vars(module).get(_STATE)
        if state is not None and which(state):
            restored[name] = unpatch(module, _STATE).stats
    return restored


def all_reduce_stats(model: Any) -> dict[str, AllReduceStats]:
    """The live AllReduceStats of every patched layer of ``model``, by module name."""
    root, _ = unwrap(model)
    return {n: state.stats for n, state in states(root, _STATE).items()}


__all__ = ["AllReduceStats", "all_reduce_stats", "disable_all_reduce", "enable_all_reduce"]
