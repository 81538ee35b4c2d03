"""DeepSpeed MoE layers send their dispatch and combine all-to-alls through moe_flashcomm.

DeepSpeed has no hook for the MoE all-to-all, so each layer *instance* is patched, reversibly,
and nothing global is touched: DeepSpeed's ``_AllToAll`` / ``_AllToAllV`` classes and
``deepspeed.comm.all_to_all_single`` (which ZeRO++, Ulysses and others use) stay as they are.

* ``MOELayer`` (deepspeed/moe/sharded_moe.py, the layer inside ``deepspeed.moe.layer.MoE``;
  training and fine-tuning, ``use_tutel``, ``drop_tokens``, any k, expert tensor parallelism):
  the instance gets a ``forward`` attribute that runs *DeepSpeed's own* ``MOELayer.forward``
  code object with one global name changed: ``_AllToAll`` resolves to moe_flashcomm's
  exchange. Every other global name (``drop_tokens``, ``gather_tokens``, ``tutel_moe``,
  ``_sparse_encode``, ...) is looked up live in sharded_moe, so the gating, the Tutel
  dispatcher, tensor-parallel token dropping and the timers are DeepSpeed's, unchanged.
* ``AutoEPMoELayer`` (deepspeed/module_inject/auto_ep_layer.py, dropless AutoEP with uneven
  splits): the same for its ``_forward`` and the name ``_AllToAllV``.
* ``DeepSpeedMoEInference`` (deepspeed/ops/transformer/inference/moe_inference.py): the
  instance gets its own ``_alltoall`` (the method DeepSpeed calls for both all-to-alls), and a
  ``forward`` that marks where a forward starts.

In every forward of a patched layer the first all-to-all is the dispatch and the second the
combine; each uses its own codec, and its backward the matching gradient codec. After the
forward the number of exchanges is checked (2 when the layer has more than one expert-parallel
rank): a DeepSpeed whose layer stopped calling the names patched here fails loudly instead of
silently running stock. ``disable_deepspeed`` deletes the instance attributes, so the class
methods are found again: stock behaviour, exactly.
"""
from __future__ import annotations

import builtins
import fnmatch
import functools
import logging
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..comm import ConfigMismatchError, all_to_all, create_stage_groups
from ..comm.gate import SizeGate
from ..config import ConfigError, FlashCommConfig
from .stats import ExchangeStats

TESTED_VERSIONS = ("0.19.8",)
"""DeepSpeed versions the test suite ran against."""
MIN_VERSION = (0, 16, 0)
"""Older DeepSpeed is refused (setup.py requires deepspeed>=0.16)."""

_STATE = "_moe_flashcomm"  # instance attribute holding a patched layer's _LayerState
_log = logging.getLogger(__name__)


# ---- DeepSpeed, lazily ----------------------------------------------------------------------
def _version_tuple(version: str) -> tuple:
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits or 0))
    return tuple(out + [0] * (3 - len(out)))


@functools.lru_cache(maxsize=None)
def _import_deepspeed():
    """``deepspeed``, after checking its version. Imported here only: the package must import
    without DeepSpeed installed."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("moe_flashcomm.enable_deepspeed needs DeepSpeed: pip install deepspeed "
                          f"(tested with {', '.join(TESTED_VERSIONS)})") from e
    version = getattr(deepspeed, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        raise RuntimeError(f"moe_flashcomm supports DeepSpeed >= {'.'.join(map(str, MIN_VERSION))} "
                           f"(tested: {', '.join(TESTED_VERSIONS)}); found {version}")
    if version.split("+")[0] not in TESTED_VERSIONS:
        _ds_logger().warning(
            f"moe_flashcomm: DeepSpeed {version} is untested (tested: {', '.join(TESTED_VERSIONS)}). "
            "Layers are patched only where DeepSpeed's code has the expected shape, and every "
            "forward checks that its all-to-alls went through moe_flashcomm.")
    return deepspeed


def _ds_logger() -> logging.Logger:
    try:
        from deepspeed.utils import logger
        return logger
    except ImportError:
        return _log


# ---- where DeepSpeed sends its MoE all-to-alls ---------------------------------------------
@dataclass(frozen=True)
class _Site:
    """One DeepSpeed MoE layer class and how it is patched.

    method:   the method a patched instance overrides with an instance attribute.
    a2a_name: the global name of DeepSpeed's all-to-all autograd Function in ``method``'s
              code (resolving to moe_flashcomm's stand-in in the patched instance's copy
              of ``method``), or None when the instance's ``_alltoall`` is replaced instead.
    """

    kind: str
    cls: type
    method: str
    a2a_name: Optional[str]

    def expected_exchanges(self, layer: nn.Module) -> int:
        """All-to-alls one forward of ``layer`` makes through moe_flashcomm."""
        if self.a2a_name is None:  # DeepSpeedMoEInference calls _alltoall twice, always
            return 2
        return 2 if int(getattr(layer, "ep_size", 1)) > 1 else 0


def _sites() -> list[_Site]:
    """The MoE layer classes of the DeepSpeed in this process. A class is looked up only in
    modules already imported: an instance cannot exist otherwise, and importing the
    inference module needlessly would load its op bindings."""
    sites = []
    for module, cls, kind, method, a2a in (
            ("deepspeed.moe.sharded_moe", "MOELayer", "MOELayer", "forward", "_AllToAll"),
            ("deepspeed.module_inject.auto_ep_layer", "AutoEPMoELayer", "AutoEPMoELayer", "_forward",
             "_AllToAllV"),
            ("deepspeed.ops.transformer.inference.moe_inference", "DeepSpeedMoEInference",
             "DeepSpeedMoEInference", "forward", None)):
        mod = sys.modules.get(module)
        klass = getattr(mod, cls, None) if mod is not None else None
        if isinstance(klass, type):
            sites.append(_Site(kind, klass, method, a2a))
    return sites


def _unsupported(what: str) -> RuntimeError:
    version = getattr(sys.modules.get("deepspeed"), "__version__", "?")
    return RuntimeError(
        f"moe_flashcomm: {what}. DeepSpeed {version} does not route its MoE all-to-all the way "
        f"moe_flashcomm patches it (tested: DeepSpeed {', '.join(TESTED_VERSIONS)}); it cannot be "
        "enabled on this layer.")


def _check_site(site: _Site, layer: nn.Module, name: str) -> Callable:
    """The function to run as ``layer``'s patched ``site.method``; raises if DeepSpeed's code
    does not have the shape this module relies on."""
    fn = getattr(type(layer), site.method, None)
    if not isinstance(fn, types.FunctionType):
        raise _unsupported(f"{site.kind} '{name}' has no plain method {site.method}()")
    for attr in (site.method, "_alltoall" if site.a2a_name is None else None):
        if attr is not None and attr in vars(layer):
            raise RuntimeError(
                f"moe_flashcomm: {site.kind} '{name}' already has an instance attribute "
                f"'{attr}' (another wrapper?); enable moe_flashcomm before wrapping the layer")
    if site.a2a_name is None:
        if not isinstance(getattr(type(layer), "_alltoall", None), types.FunctionType):
            raise _unsupported(f"{site.kind} '{name}' has no _alltoall() method")
        return fn
    target = fn.__globals__.get(site.a2a_name)
    if site.a2a_name not in fn.__code__.co_names or not hasattr(target, "apply"):
        raise _unsupported(f"{type(layer).__qualname__}.{site.method}() of '{name}' does not call "
                           f"{site.a2a_name}.apply")
    return _rebound(fn, site.a2a_name)


class _Globals(dict):
    """Globals of a rebound function: the names stored here, every other name looked up live
    in the defining module (so later changes to DeepSpeed's module globals are seen)."""

    def __init__(self, module_globals: dict, names: Mapping[str, Any]) -> None:
        super().__init__(names)
        self["__builtins__"] = module_globals.get("__builtins__", builtins)
        self.module_globals = module_globals

    def __missing__(self, key: str) -> Any:
        return self.module_globals[key]


@functools.lru_cache(maxsize=None)
def _rebound(fn: types.FunctionType, a2a_name: str) -> types.FunctionType:
    """DeepSpeed's function ``fn`` (same code object, defaults and closure) with the global
    ``a2a_name`` resolving to moe_flashcomm's stand-in. One per DeepSpeed function; the layer
    it runs for is found at call time (``_running``)."""
    new = types.FunctionType(fn.__code__, _Globals(fn.__globals__, {a2a_name: _AllToAllStandIn}),
                             fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


# ---- running a patched layer -----------------------------------------------------------------
_local = threading.local()


def _running() -> "_LayerState":
    stack = getattr(_local, "stack", None)
    if not stack:
        raise RuntimeError("moe_flashcomm: a patched DeepSpeed all-to-all ran outside its layer's forward")
    return stack[-1]


class _AllToAllStandIn:
    """What a patched layer's DeepSpeed code finds under the name ``_AllToAll`` (called as
    ``.apply(group, x)``) or ``_AllToAllV`` (``.apply(group, x, input_splits, output_splits)``)."""

    @staticmethod
    def apply(group, x: torch.Tensor, input_splits=None, output_splits=None) -> torch.Tensor:
        return _running().exchange(group, x, input_splits, output_splits)


class _LayerState:
    """A patched layer: its name, resolved config, counters and what to run."""

    def __init__(self, name: str, site: _Site, config: FlashCommConfig, impl: Callable) -> None:
        self.name, self.site, self.impl = name, site, impl
        self.stats = ExchangeStats()
        self.configure(config)
        self.calls = 0  # exchanges in the running forward

    def configure(self, config: FlashCommConfig) -> None:
        self.config = config
        self.gate = SizeGate.coerce(config.gate)

    def run(self, layer: nn.Module, args: tuple, kwargs: dict) -> Any:
        stack = _local.__dict__.setdefault("stack", [])
        outer_calls, self.calls = self.calls, 0
        stack.append(self)
        try:
            out = self.impl(layer, *args, **kwargs)
            calls = self.calls
        finally:
            stack.pop()
            self.calls = outer_calls
        expected = self.site.expected_exchanges(layer)
        if calls != expected:
            raise _unsupported(f"{self.site.kind} '{self.name}' made {calls} all-to-all(s) through "
                               f"moe_flashcomm in one forward where {expected} were expected")
        return out

    def exchange(self, group, x: torch.Tensor, input_splits=None, output_splits=None) -> torch.Tensor:
        """DeepSpeed's all-to-all of ``x`` (dim 0 routed like ``all_to_all_single``): the
        first of a forward is the dispatch, the second the combine."""
        direction = "dispatch" if self.calls % 2 == 0 else "combine"
        self.calls += 1
        cfg = self.config
        codec, grad_codec = ((cfg.dispatch, cfg.dispatch_grad) if direction == "dispatch"
                             else (cfg.combine, cfg.combine_grad))
        stats, gate = self.stats, self.gate
        began = stats.start(x.device)
        out = all_to_all(x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                         group=group, codec=codec, grad_codec=grad_codec, gate=self.gate,
                         chunks=cfg.chunks, algorithm=cfg.algorithm)
        stats.stop(direction, began)
        stats.record(direction, x, input_splits, group, codec, gate)
        if out.requires_grad:
            grad_began = []

            def before_backward(g):  # the gradient reached the output: its exchange comes next
                stats.record(direction + "_grad", g, output_splits, group, grad_codec, gate)
                grad_began.append(stats.start(g.device))

            out.register_hook(before_backward)
            if x.requires_grad:  # x's gradient is what the backward exchange produces
                x.register_hook(lambda g: stats.stop(direction + "_grad", grad_began.pop())
                                if grad_began else None)
        return out


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Instance ``forward`` (``_forward`` for AutoEP) of a patched layer."""
    return self.__dict__[_STATE].run(self, args, kwargs)


def _patched_alltoall(self: nn.Module, dispatched: torch.Tensor) -> torch.Tensor:
    """Instance ``_alltoall`` of a patched DeepSpeedMoEInference: both its all-to-alls
    (dispatch, then combine; the patched ``forward`` restarts the count)."""
    state = self.__dict__[_STATE]
    group = self.ep_group
    if dist.get_world_size(group=group) > 1:
        return state.exchange(group, dispatched)
    state.calls += 1  # DeepSpeed's own _alltoall is a no-op on one rank
    return dispatched


def _patch(layer: nn.Module, name: str, site: _Site, config: FlashCommConfig) -> _LayerState:
    state = vars(layer).get(_STATE)
    if state is not None:  # enabled again: new config, same counters
        state.configure(config)
        return state
    impl = _check_site(site, layer, name)
    if site.kind == "AutoEPMoELayer" and getattr(layer, "comm_backend", "comm") != "comm":
        raise ValueError(f"moe_flashcomm: AutoEP layer '{name}' uses comm_backend="
                         f"{layer.comm_backend!r} (DeepEP), whose transport moe_flashcomm cannot "
                         'replace; set expert_parallel.comm_backend to "comm", or disable this layer '
                         'with a rule {"match": ..., "enabled": false}')
    state = _LayerState(name, site, config, impl)
    layer.__dict__[_STATE] = state
    layer.__dict__[site.method] = types.MethodType(_patched_forward, layer)
    if site.a2a_name is None:
        layer.__dict__["_alltoall"] = types.MethodType(_patched_alltoall, layer)
    return state


def _unpatch(layer: nn.Module) -> Optional[_LayerState]:
    state = layer.__dict__.pop(_STATE, None)
    if state is not None:
        layer.__dict__.pop(state.site.method, None)
        if state.site.a2a_name is None:
            layer.__dict__.pop("_alltoall", None)
    return state


# ---- public API --------------------------------------------------------------------------------
def _unwrap(model: Any) -> tuple[nn.Module, Any]:
    """(the module tree, its DeepSpeed config or None) of a model or a DeepSpeed engine."""
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None)
    inference_cls = getattr(ds, "InferenceEngine", None)
    if engine_cls is not None and isinstance(model, engine_cls):
        return model.module, model._config
    if inference_cls is not None and isinstance(model, inference_cls):
        return model.module, None
    if isinstance(model, nn.Module):
        return model, None
    raise TypeError(f"model must be a torch.nn.Module or a DeepSpeed engine, got {type(model).__name__}")


def resolve(model: Any, config: Union[FlashCommConfig, Mapping[str, Any], None]
            ) -> tuple[nn.Module, FlashCommConfig]:
    """The module to patch and the config to use: ``config`` coerced, or with None the
    ``"moe_flashcomm"`` section of the engine's DeepSpeed config (defaults without one)."""
    root, ds_config = _unwrap(model)
    if config is None and ds_config is not None:
        return root, FlashCommConfig.from_deepspeed_config(ds_config) or FlashCommConfig()
    return root, FlashCommConfig.coerce(config)


def _find_layers(root: nn.Module) -> list[tuple[str, nn.Module, _Site]]:
    sites = _sites()
    found = []
    for name, module in root.named_modules():
        for site in sites:
            if isinstance(module, site.cls):
                found.append((name, module, site))
                break
    return found


def _check_rules(cfg: FlashCommConfig, names: list[str]) -> None:
    for i, rule in enumerate(cfg.layers):
        for idx in rule.index:
            if idx >= len(names):
                raise ConfigError(f"FlashCommConfig.layers[{i}].index: {idx} is out of range, the "
                                  f"model has {len(names)} DeepSpeed MoE layer(s)")
        if rule.match and not any(fnmatch.fnmatchcase(n, p) for n in names for p in rule.match):
            _ds_logger().warning(f"moe_flashcomm: layers[{i}].match {list(rule.match)} selects no "
                                 f"layer; the MoE layers are: {names}")


def _prepare_algorithms(layers: list[tuple[nn.Module, FlashCommConfig]]) -> None:
    """One small collective per enable, on every rank: ranks must agree on the algorithms, and
    a non-flat algorithm needs the stage groups of every expert-parallel group created by all
    processes together (expert-parallel groups are usually smaller than the job)."""
    if not dist.is_initialized():
        return
    algorithms = sorted({cfg.algorithm for _, cfg in layers})
    ep_groups = sorted({tuple(dist.get_process_group_ranks(layer.ep_group)) for layer, _ in layers
                        if getattr(layer, "ep_group", None) is not None})
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (algorithms, ep_groups))
    if any(g[0] != algorithms for g in gathered):
        raise ConfigMismatchError("moe_flashcomm.enable_deepspeed: ranks were enabled with different "
                                  f"algorithms: {[g[0] for g in gathered]} (rank order)")
    if algorithms != ["flat"]:
        all_groups = sorted({ranks for _, groups in gathered for ranks in groups})
        create_stage_groups([r for r in all_groups if len(r) < dist.get_world_size()])


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def enable_deepspeed(model: Any, config: Union[FlashCommConfig, Mapping[str, Any], None] = None
                     ) -> dict[str, ExchangeStats]:
    """Send every DeepSpeed MoE all-to-all of ``model`` through moe_flashcomm.

    model:  an ``nn.Module`` holding ``deepspeed.moe.layer.MoE`` / ``MOELayer``,
            ``AutoEPMoELayer`` or ``DeepSpeedMoEInference`` layers, or the engine returned by
            ``deepspeed.initialize`` / ``deepspeed.init_inference``.
    config: a FlashCommConfig, a dict of its fields, a whole DeepSpeed config dict (its
            ``"moe_flashcomm"`` section is used), or None: the engine's DeepSpeed config
            section when ``model`` is a training engine, else the defaults.

    AutoEP replaces layers inside ``deepspeed.initialize``: enable on the engine it returns.
    A config with ``all_reduce`` set also installs the tensor-parallel all-reduce hooks
    (``enable_all_reduce``); ``disable_deepspeed`` removes both.
    Calling again updates the configs (the counters continue). Returns the live
    ExchangeStats of every enabled layer, by qualified module name.
    """
    ds = _import_deepspeed()
    root, cfg = resolve(model, config)
    layers = _find_layers(root)
    if not layers:
        raise ValueError(f"moe_flashcomm.enable_deepspeed: {type(root).__name__} holds no DeepSpeed MoE "
                         "layer (deepspeed.moe.layer.MoE / MOELayer, AutoEPMoELayer, "
                         "DeepSpeedMoEInference)")
    _check_rules(cfg, [n for n, _, _ in layers])
    enabled: dict[str, ExchangeStats] = {}
    lines = []
    resolved = [(layer, cfg.for_layer(name, index)) for index, (name, layer, _) in enumerate(layers)]
    _prepare_algorithms([(layer, lcfg) for layer, lcfg in resolved if lcfg.enabled])
    for (name, layer, site), (_, lcfg) in zip(layers, resolved):
        label = f"{name or '<root>'} [{site.kind}, ep_size={getattr(layer, 'ep_size', '?')}]"
        if not lcfg.enabled:
            _unpatch(layer)
            lines.append(f"  {label}: stock DeepSpeed (disabled by config)")
            continue
        enabled[name] = _patch(layer, name, site, lcfg).stats
        lines.append(f"  {label}: {lcfg.describe()}")
    if cfg.all_reduce is not None:  # tensor-parallel all-reduce hooks, from the same config
        from .allreduce import enable_all_reduce
        enable_all_reduce(model, cfg)
    if _rank0():
        _ds_logger().info(f"moe_flashcomm: {len(enabled)} of {len(layers)} DeepSpeed MoE layer(s) "
                          f"send their all-to-alls through moe_flashcomm (DeepSpeed {ds.__version__}):\n"
                          + "\n".join(lines))
    return enabled


def disable_deepspeed(model: Any) -> dict[str, ExchangeStats]:
    """Restore stock DeepSpeed on every layer ``enable_deepspeed`` patched in ``model``
    (removes the per-instance attributes). Returns the final ExchangeStats of those layers."""
    from .allreduce import disable_all_reduce

    root, _ = _unwrap(model)
    disable_all_reduce(root)
    restored = {}
    for name, module in root.named_modules():
        state = _unpatch(module)
        if state is not None:
            restored[name] = state.stats
    if restored and _rank0():
        _ds_logger().info(f"moe_flashcomm: restored stock DeepSpeed on {len(restored)} MoE layer(s)")
    return restored


def exchange_stats(model: Any) -> dict[str, ExchangeStats]:
    """The live ExchangeStats of every patched layer of ``model``, by module name; sum them
    with ``ExchangeStats.total(...)``."""
    root, _ = _unwrap(model)
    return {name: vars(m)[_STATE].stats for name, m in root.named_modules() if _STATE in vars(m)}


__all__ = ["TESTED_VERSIONS", "disable_deepspeed", "enable_deepspeed", "exchange_stats"]
