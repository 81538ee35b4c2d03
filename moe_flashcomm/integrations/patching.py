"""Reversible, per-instance patching of DeepSpeed layers: what the MoE all-to-all integration
(``integrations.deepspeed``) and the tensor-parallel all-reduce integration
(``integrations.allreduce``) share.

A patched layer *instance* gets

* ``__dict__[state.ATTR]``: its state (a ``PatchState`` subclass: name, site, config,
  counters), and
* for each method it overrides, an instance attribute that calls the state (``_StateCall``,
  which holds the layer weakly, so a deleted model is freed at once; the layer still
  pickles and deep-copies: the state pickles as ``(name, site, config)``, with fresh
  counters, and re-derives what it runs from the layer's class on its first call).

The state's own copy of a DeepSpeed method is that method's code object run with a few
global names resolved to moe_flashcomm (``rebind``); every other global name is looked up
live in DeepSpeed's module. Nothing global is touched; ``unpatch`` deletes the instance
attributes, so the class's methods are found again: stock behaviour, exactly.
"""
from __future__ import annotations

import builtins
import copy
import datetime
import functools
import logging
import os
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch.distributed as dist
import torch.nn as nn

from .. import env
from ..codec import CodecConfig
from ..comm import direct
from ..comm.check import ConfigMismatchError
from ..comm.frame import PeerTimeoutError
from ..comm.gate import SizeGate
from ..comm.topology import LinkCodecs
from ..config import FlashCommConfig, missing_section_message, read_deepspeed_config

TESTED_VERSIONS = ("0.19.8",)
"""DeepSpeed versions the test suite ran against."""
MIN_VERSION = (0, 16, 0)
"""Older DeepSpeed is refused (setup.py requires deepspeed>=0.16)."""

_log = logging.getLogger(__name__)


# ---- DeepSpeed, lazily ----------------------------------------------------------------------
def version_tuple(version: str) -> tuple:
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
def import_deepspeed():
    """``deepspeed``, after checking its version (once per process). Imported here only: the
    package must import without DeepSpeed installed."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("moe_flashcomm.enable_deepspeed needs DeepSpeed: pip install deepspeed "
                          f"(tested with {', '.join(TESTED_VERSIONS)})") from e
    version = getattr(deepspeed, "__version__", "0")
    if version_tuple(version) < MIN_VERSION:
        raise RuntimeError(f"moe_flashcomm supports DeepSpeed >= {'.'.join(map(str, MIN_VERSION))} "
                           f"(tested: {', '.join(TESTED_VERSIONS)}); found {version}")
    if version.split("+")[0] not in TESTED_VERSIONS:
        ds_logger().warning(
            f"moe_flashcomm: DeepSpeed {version} is untested (tested: {', '.join(TESTED_VERSIONS)}). "
            "Layers are patched only where DeepSpeed's code has the expected shape, and every "
            "forward checks that its collectives went through moe_flashcomm.")
    return deepspeed


def ds_logger() -> logging.Logger:
    try:
        from deepspeed.utils import logger
        return logger
    except ImportError:
        return _log


def unsupported(what: str) -> RuntimeError:
    version = getattr(sys.modules.get("deepspeed"), "__version__", "?")
    return RuntimeError(
        f"moe_flashcomm: {what}. DeepSpeed {version} does not route this collective the way "
        f"moe_flashcomm patches it (tested: DeepSpeed {', '.join(TESTED_VERSIONS)}); it cannot be "
        "enabled on this layer.")


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def unwrap(model: Any) -> tuple[nn.Module, Any]:
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


def resolve(model: Any, config: Union[FlashCommConfig, Mapping[str, Any], str, os.PathLike, None]
            ) -> tuple[nn.Module, FlashCommConfig]:
    """The module to patch and the config to use: ``config`` coerced, or the
    ``"moe_flashcomm"`` section of a DeepSpeed config: a JSON file's given as ``config``, or
    with None the engine's. Without a section the defaults, with a warning (rank 0): DeepSpeed
    accepts unknown top-level keys, so a misspelt section would go unnoticed."""
    root, engine_config = unwrap(model)
    if config is None and engine_config is not None:
        ds_config = read_deepspeed_config(engine_config)
    elif isinstance(config, (str, os.PathLike)):
        ds_config = read_deepspeed_config(config)
    else:
        return root, FlashCommConfig.coerce(config)
    section = FlashCommConfig.from_deepspeed_config(ds_config)
    if section is None and rank0():
        ds_logger().warning(missing_section_message(ds_config))
    return root, section or FlashCommConfig()


# ---- every rank agrees on what it enables --------------------------------------------------------
def group_ranks(group, name: str, field: str) -> tuple:
    """The global ranks of ``group``, layer ``name``'s ``field`` (``ep_group``, ``mp_group``);
    a group destroyed since the model was built is named (torch raised a bare KeyError)."""
    if not direct.is_live(group):
        raise ValueError(f"layer {name or '<root>'!r}: its {field} is a process group that was "
                         "destroyed (torch.distributed.destroy_process_group); the layer needs "
                         "a group of the job now running")
    return tuple(dist.get_process_group_ranks(group))


def agree(prepare: Callable[[], Any], summary: Callable[[Any], tuple], what: str, rule: str
          ) -> tuple[Any, list]:
    """``prepare()`` (which validates the model and config and returns what the caller
    needs), then one small collective on every rank: a rank whose ``prepare`` raised still
    joins it, so every rank raises instead of leaving the others waiting.

    ``summary(prepare())``: (this rank's layers as [(name, {field: repr})], the ranks it must
    agree with (None: every rank), what every rank should see of it). Two ranks that must
    agree (either one naming the other) and differ make every rank raise
    ConfigMismatchError naming them, the first difference and ``rule``, so that no rank goes
    on to wait for them. Returns ``prepare()`` and every rank's third element."""
    if not dist.is_initialized():  # one process: nothing to agree with
        return prepare(), []
    error = out = None
    timeout_s = env.DEFAULT_TIMEOUT_S
    try:
        timeout_s = env.timeout_s()
        out = prepare()
        layers, ranks, shared = summary(out)
    except Exception as e:  # noqa: BLE001 - raised again below, on this rank
        error = e
    mine = (("error", f"{type(error).__name__}: {error}") if error is not None
            else ("ok", layers, None if ranks is None else sorted(ranks), shared))
    meeting = _Meeting(what, timeout_s)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    meeting.close()
    if error is not None:
        raise error
    failed = {r: g[1] for r, g in enumerate(gathered) if g[0] == "error"}
    if failed:
        raise ConfigMismatchError(f"{what} failed on rank(s) {sorted(failed)}: "
                                  + "; ".join(f"rank {r}: {m}" for r, m in failed.items()))
    pair = _disagreeing_pair(gathered)
    if pair is not None:
        a, b = pair if dist.get_rank() != pair[1] else pair[::-1]  # this rank first, if in it
        difference = _difference(gathered[a][1], gathered[b][1],
                                 "this rank" if a == dist.get_rank() else f"rank {a}", f"rank {b}")
        raise ConfigMismatchError(f"{what}: ranks {pair[0]} and {pair[1]} resolved different "
                                  f"layer configs: {difference}; {rule}")
    return out, [g[3] for g in gathered]


class _Meeting:
    """Every rank of the job reaching its n-th agreement, waited for at most ``timeout_s``
    through the job's store before the collective: a rank that never calls ``what`` is named
    (PeerTimeoutError) instead of leaving the others in the collective until the process
    group's timeout, unnamed. Each rank counts its agreements in the store; whether the n-th
    meeting happened is decided once, atomically ("met" by the last rank to arrive, or
    "abandoned" by a rank that gave up), so a rank that comes after the others gave up raises
    too instead of waiting alone in the collective, and the counts say which ranks are
    behind (silent) or ahead (this rank skipped a call)."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, world = dist.get_rank(), dist.get_world_size()
        number = self.store.add(self._count(self.rank), 1)
        self.at = f"moe_flashcomm/agreement/{number}"
        if self.store.add(f"{self.at}/arrived", 1) == world:
            self.store.compare_set(f"{self.at}/outcome", "", "met")
        try:
            self.store.wait([f"{self.at}/outcome"], datetime.timedelta(seconds=timeout_s))
        except dist.DistStoreError:  # timed out: give up, unless the last rank came meanwhile
            pass
        if self.store.compare_set(f"{self.at}/outcome", "", "abandoned") == b"met":
            return
        calls = [self.store.add(self._count(q), 0) for q in range(world)]
        silent = [q for q, n in enumerate(calls) if n < number]
        ahead = [q for q, n in enumerate(calls) if n > number]
        waited = f"{timeout_s:g} s (MOE_FLASHCOMM_TIMEOUT_S)"
        if silent:
            raise PeerTimeoutError(f"{what}: ranks {silent} did not call it within {waited}; "
                                   "every rank must call it, at the same point")
        if ahead:
            raise PeerTimeoutError(
                f"{what}: ranks {ahead} have made more calls of enable_deepspeed / "
                f"enable_all_reduce ({max(calls)}) than this rank ({number}): this rank skipped "
                f"one, or came to this one after they stopped waiting ({waited}); every rank "
                "must make the same calls")
        raise PeerTimeoutError(f"{what}: every rank called it, but not within {timeout_s:g} s "
                               "of each other (MOE_FLASHCOMM_TIMEOUT_S): the first ranks stopped "
                               "waiting for the last ones")

    @staticmethod
    def _count(rank: int) -> str:
        return f"moe_flashcomm/agreements/{rank}"

    def close(self) -> None:
        """Forget the meeting's keys, once every rank has been through the collective (each
        read the outcome before it)."""
        if self.rank == 0:
            self.store.delete_key(f"{self.at}/arrived")
            self.store.delete_key(f"{self.at}/outcome")


def compared_fields(cfg: FlashCommConfig, names) -> dict:
    """``cfg``'s fields ``names`` as ``agree`` compares them and its errors show them: their
    reprs, a codec in its short form (int4/g128+spikes: all of a codec once normalised),
    and a gate by its tables (ranks may read equal tables from files of different paths)."""
    def shown(name: str) -> str:
        if name == "gate":
            return f"tables {SizeGate.coerce(cfg.gate).digest}"
        value = getattr(cfg, name)
        return str(value) if isinstance(value, (LinkCodecs, CodecConfig)) else repr(value)
    return {name: shown(name) for name in names}


def _disagreeing_pair(gathered: list) -> Optional[tuple[int, int]]:
    """The first two ranks (the same on every rank) that must agree and summarised different
    layers (``agree``)."""
    kinds: list = []  # the distinct summaries (few): each rank's is compared by its index
    kind = []
    for g in gathered:
        kind.append(next((i for i, k in enumerate(kinds) if k == g[1]), len(kinds)))
        if kind[-1] == len(kinds):
            kinds.append(g[1])
    if len(kinds) == 1:
        return None
    for a, g in enumerate(gathered):
        for b in (range(len(gathered)) if g[2] is None else g[2]):
            if kind[a] != kind[b]:
                return min(a, b), max(a, b)
    return None


def _difference(first: list, second: list, first_name: str, second_name: str) -> str:
    """What differs between two ranks' [(layer name, fields)] lists."""
    if [n for n, _ in first] != [n for n, _ in second]:
        return (f"{first_name} has layers {[n for n, _ in first]}, {second_name} "
                f"{[n for n, _ in second]}")
    for (name, a), (_, b) in zip(first, second):
        for field in a:
            if a[field] != b.get(field):
                return (f"layer {name!r}: {field} differs ({first_name} {a[field]}, "
                        f"{second_name} {b.get(field)})")
    return "?"


# ---- DeepSpeed's code with some global names changed -------------------------------------------
class _LiveGlobals(dict):
    """Globals of a rebound function: the names stored here, every other name looked up live
    in the defining module (so later changes to DeepSpeed's module globals are seen)."""

    def __init__(self, module_globals: dict, names: Mapping[str, Any]) -> None:
        super().__init__(names)
        self["__builtins__"] = module_globals.get("__builtins__", builtins)
        self.module_globals = module_globals

    def __missing__(self, key: str) -> Any:
        return self.module_globals[key]


def rebind(fn: types.FunctionType, names: Mapping[str, Any]) -> types.FunctionType:
    """``fn`` (its code, defaults and closure) with the global ``names`` resolving to the
    given objects; every other global looked up live in its module. The code object is a
    copy: torch.compile caches what it compiles per code object and installs its compiled
    functions in the globals of the first frame it compiled, so two layers' functions that
    shared one code object would run the other's compiled code without its globals."""
    new = types.FunctionType(fn.__code__.replace(), _LiveGlobals(fn.__globals__, names),
                             fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def uses_global(fn: Any, name: str) -> bool:
    """Whether ``fn`` is a plain function whose code reads the module global ``name``."""
    return (isinstance(fn, types.FunctionType) and name in fn.__code__.co_names
            and name in fn.__globals__)


# ---- sites and patched layers ------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """A DeepSpeed layer class (looked up by module and name, only in modules already
    imported: an instance cannot exist otherwise), the method a patched instance overrides,
    and the global name of that method that resolves to moe_flashcomm (None where the
    instance overrides another method instead)."""

    module: str
    cls_name: str
    method: str
    global_name: Optional[str]

    def cls(self) -> Optional[type]:
        mod = sys.modules.get(self.module)
        klass = getattr(mod, self.cls_name, None) if mod is not None else None
        return klass if isinstance(klass, type) else None


class PatchState:
    """What a patched layer instance holds: its name, site, config and counters, and the
    function it runs in place of ``site.method`` (``bind``, derived from the layer's class).

    Subclasses set ``ATTR`` (the instance attribute holding the state), implement
    ``configure``, ``new_stats`` and ``bind``, and may add to ``methods`` (layer method ->
    state method that stands in for it)."""

    ATTR: ClassVar[str]

    def __init__(self, name: str, site: Site, config: FlashCommConfig) -> None:
        self.name, self.site = name, site
        self.stats = self.new_stats()
        self.configure(config)
        self._impl: Optional[Callable] = None

    def configure(self, config: FlashCommConfig) -> None:
        self.config = config

    def new_stats(self) -> Any:
        raise NotImplementedError

    def bind(self, layer: nn.Module) -> Callable:
        """The function run as ``layer``'s ``site.method``; raises ``unsupported`` when
        DeepSpeed's code does not have the shape the subclass relies on."""
        raise NotImplementedError

    def impl(self, layer: nn.Module) -> Callable:
        if self._impl is None:  # after unpickling / deep-copying: derived again
            self._impl = self.bind(layer)
        return self._impl

    def methods(self) -> dict:
        return {self.site.method: "run"}

    def __reduce__(self):
        """Pickled and deep-copied as what it was enabled with: the copy has fresh counters
        and re-derives its function from its layer's class."""
        return type(self), (self.name, self.site, self.config)


class StandIn:
    """What a patched layer's rebound code finds under a global name, and reaches the
    layer's state through. The state is held weakly: the state holds its stand-in (in its
    function's globals), and a strong reference back would close a cycle that kept both,
    with the state's communicator, until the cyclic garbage collector ran."""

    def __init__(self, state: "PatchState") -> None:
        self._state_ref = weakref.ref(state)

    @property
    def state(self) -> "PatchState":
        return self._state_ref()


_COPYING = "moe_flashcomm: a patched layer being copied"  # (a deepcopy memo key's tag)


class _StateCall:
    """A patched instance attribute: calls ``layer``'s state (``vars(layer)[attr]``)
    ``method``. It holds its layer weakly: held strongly, the layer would hold itself, and a
    model deleted would keep its weights (and communicators) until the cyclic garbage
    collector ran. Pickled and deep-copied bound to the copy of its layer."""

    __slots__ = ("attr", "method", "layer", "_held")

    def __init__(self, attr: str, method: str, layer: nn.Module, held: bool = False) -> None:
        self.attr, self.method, self.layer = attr, method, weakref.ref(layer)
        self._held = layer if held else None  # (see __deepcopy__)

    def _layer(self) -> nn.Module:
        layer = self.layer()
        if layer is None:  # (a bound method kept past its layer)
            raise ReferenceError(f"moe_flashcomm: the layer of this {self.method} was deleted")
        return layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self._layer()
        return getattr(layer.__dict__[self.attr], self.method)(layer, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self.attr, self.method, self._layer(), self._held is not None)

    def __deepcopy__(self, memo: dict) -> "_StateCall":
        # nn.Module's deepcopy puts the layer's copy in the memo before it copies the layer's
        # attributes (this one): bound to it, weakly. A layer class whose own __deepcopy__
        # memoizes its copy only after its attributes (DeepSpeed's LinearAllreduce) makes
        # this call copy the layer once more, and that copy has no holder but this call
        # (memoized first, as any object that its copies may reach again)
        original, new = self._layer(), object.__new__(type(self))
        memo[id(self)] = new
        if id(original) in memo:  # the layer's copy is made: bound to it
            type(self).__init__(new, self.attr, self.method, memo[id(original)])
            return new
        # the layer's other calls, met while it is copied (below), are bound to the same
        # copy, not copy it again: a copy of a copy would hold a chain of extra copies
        key = (_COPYING, id(original))
        if key in memo:
            memo[key].append((new, self))
            return new
        memo[key] = pending = [(new, self)]
        layer = copy.deepcopy(original, memo)
        del memo[key]
        for call, of in pending:
            type(self).__init__(call, of.attr, of.method, layer)
        new._held = layer
        # the extra copy's own calls (this one) bound to it weakly: no cycle
        for name, value in list(vars(layer).items()):
            if value is new:
                vars(layer)[name] = type(self)(self.attr, self.method, layer)
        return new


def check_patchable(layer: nn.Module, state: PatchState) -> None:
    """Raise what would keep ``state`` from being installed on ``layer`` (an instance
    attribute of another wrapper where a method goes; DeepSpeed code of another shape),
    changing nothing: callers check every layer before the ranks agree."""
    for attr in state.methods():
        if attr in vars(layer):
            raise RuntimeError(
                f"moe_flashcomm: {state.site.cls_name} '{state.name}' already has an instance "
                f"attribute '{attr}' (another wrapper?); enable moe_flashcomm before wrapping "
                "the layer")
    state.impl(layer)


def patch(layer: nn.Module, state: PatchState) -> PatchState:
    """Install ``state`` on ``layer``, checked first (``check_patchable``), so nothing is
    changed on a layer that cannot be patched."""
    check_patchable(layer, state)
    layer.__dict__[state.ATTR] = state
    for attr, method in state.methods().items():
        layer.__dict__[attr] = _StateCall(state.ATTR, method, layer)
    return state


def unpatch(layer: nn.Module, attr: str) -> Optional[PatchState]:
    """Remove the state stored under ``attr`` and its instance methods; the state or None."""
    state = layer.__dict__.pop(attr, None)
    if state is not None:
        for name in state.methods():
            layer.__dict__.pop(name, None)
    return state


def states(root: nn.Module, attr: str) -> dict:
    """``{module name: state}`` of the modules of ``root`` patched under ``attr``."""
    return {n: vars(m)[attr] for n, m in root.named_modules() if attr in vars(m)}
