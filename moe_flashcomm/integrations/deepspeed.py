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
  With ``skip_padding`` a forward hook on its gate (present during the patched forward only)
  reads the routes, and the exchanges send only the filled capacity slots (padding.py).
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
methods are found again: stock behaviour, exactly. The patching itself (shared with the
all-reduce integration, copies and pickles included) is in patching.py.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..comm import Communicator, create_stage_groups
from ..comm.check import ConfigMismatchError
from ..comm.communicator import communicator
from ..comm.direct import process_group
from ..comm.gate import SizeGate
from ..config import ConfigError, FlashCommConfig
from .allreduce import disable_all_reduce, enable_from_section
from .padding import RouteCounts, SlotPlan, filled_slots
from .patching import (TESTED_VERSIONS, PatchState, Site, StandIn, agree, check_patchable,
                       compared_fields, ds_logger, group_ranks, import_deepspeed, patch, rank0,
                       rebind, resolve, states, unpatch, unsupported, unwrap, uses_global)
from .stats import ExchangeStats

_STATE = "_moe_flashcomm"  # instance attribute holding a patched layer's _LayerState


# ---- where DeepSpeed sends its MoE all-to-alls ---------------------------------------------
def _sites() -> list[Site]:
    """The MoE layer sites: ``global_name`` is DeepSpeed's all-to-all autograd Function in
    ``method``'s code, or None where the instance's ``_alltoall`` is replaced instead."""
    return [Site("deepspeed.moe.sharded_moe", "MOELayer", "forward", "_AllToAll"),
            Site("deepspeed.module_inject.auto_ep_layer", "AutoEPMoELayer", "_forward", "_AllToAllV"),
            Site("deepspeed.ops.transformer.inference.moe_inference", "DeepSpeedMoEInference",
                 "forward", None)]


def _exchanges(layer: nn.Module) -> bool:
    """Whether a MOELayer / AutoEPMoELayer exchanges tokens (DeepSpeed skips its all-to-alls
    for an expert-parallel group of one)."""
    return int(getattr(layer, "ep_size", 1)) > 1


def _expected_exchanges(site: Site, layer: nn.Module) -> int:
    """All-to-alls one forward of ``layer`` makes through moe_flashcomm."""
    if site.global_name is None:  # DeepSpeedMoEInference calls _alltoall twice, always
        return 2
    return 2 if _exchanges(layer) else 0


# ---- running a patched layer -----------------------------------------------------------------
class _AllToAllStandIn(StandIn):
    """What one patched layer's DeepSpeed code finds under the name ``_AllToAll`` (called as
    ``.apply(group, x)``) or ``_AllToAllV`` (``.apply(group, x, input_splits, output_splits)``):
    each layer's rebound code gets its own, so the call reaches that layer's state."""

    def apply(self, group, x: torch.Tensor, input_splits=None, output_splits=None) -> torch.Tensor:
        return self.state.exchange(group, x, input_splits, output_splits)


class _Made:
    """The library calls one forward of a patched layer entered: the count exchange
    (skip_padding), the all-to-alls, and the communicator of the last; ``answered``: one of
    them raised, and answered its peers itself (Communicator.answering, the frames' own
    errors)."""

    __slots__ = ("counted", "sent", "answered", "comm")

    def __init__(self) -> None:
        self.counted, self.sent, self.answered = False, 0, False
        self.comm: Optional[Communicator] = None


def _quiet_until_first_call(site: Site, layer: nn.Module) -> bool:
    """Whether a forward of ``layer`` makes no collective on its expert-parallel group
    before its first moe_flashcomm call: a MOELayer whose gate drops tokens (without, the
    gate agrees on a capacity by an all_reduce on the group; AutoEP plans its splits with
    an all_to_all_single of its own; DeepSpeedMoEInference is not looked into)."""
    return (site.cls_name == "MOELayer"
            and getattr(getattr(layer, "gate", None), "drop_tokens", None) is True)


def _first_tensor(args: tuple, kwargs: dict, layer: nn.Module) -> Optional[torch.Tensor]:
    """A tensor of the forward's (its device tells CPU, framed over gloo, from CUDA)."""
    for a in (*args, *kwargs.values()):
        if torch.is_tensor(a):
            return a
    return next(layer.parameters(), None)


class _LayerState(PatchState):
    """A patched MoE layer: its name, resolved config, counters and what to run."""

    ATTR = _STATE

    def __init__(self, name: str, site: Site, config: FlashCommConfig) -> None:
        super().__init__(name, site, config)
        self.calls = 0  # exchanges in the running forward
        self.counts: Optional[RouteCounts] = None  # skip_padding: the running forward's routes
        self.plan: Optional[SlotPlan] = None  # skip_padding: its exchanges
        self.made: Optional[_Made] = None  # the running forward's library calls
        self.comm: Optional[Communicator] = None  # of the layer's expert-parallel group
        # comm is one enable_deepspeed made for the layers of its group and gate (closed with
        # them), not the group's default one, which the whole process shares
        self.owns_comm = False

    def configure(self, config: FlashCommConfig) -> None:
        self.config = config
        self.gate = SizeGate.coerce(config.gate)

    def new_stats(self) -> ExchangeStats:
        return ExchangeStats()

    def methods(self) -> dict:
        if self.site.global_name is None:  # DeepSpeedMoEInference: both all-to-alls
            return {self.site.method: "run", "_alltoall": "alltoall"}
        return {self.site.method: "run"}

    def bind(self, layer: nn.Module) -> Callable:
        site, name = self.site, self.name
        fn = getattr(type(layer), site.method, None)
        if not isinstance(fn, types.FunctionType):
            raise unsupported(f"{site.cls_name} '{name}' has no plain method {site.method}()")
        if site.global_name is None:
            if not isinstance(getattr(type(layer), "_alltoall", None), types.FunctionType):
                raise unsupported(f"{site.cls_name} '{name}' has no _alltoall() method")
            return fn
        if not uses_global(fn, site.global_name) or not hasattr(fn.__globals__[site.global_name], "apply"):
            raise unsupported(f"{type(layer).__qualname__}.{site.method}() of '{name}' does not call "
                              f"{site.global_name}.apply")
        return rebind(fn, {site.global_name: _AllToAllStandIn(self)})

    def run(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``layer``'s forward (``_forward`` for AutoEP), counting its exchanges."""
        impl = self.impl(layer)
        outer = self.calls, self.counts, self.plan, self.made
        self.calls, self.counts, self.plan, self.made = 0, None, None, _Made()
        made = self.made
        watch = self._watch_gate(layer)
        expected = _expected_exchanges(self.site, layer)
        try:
            out = impl(layer, *args, **kwargs)
            calls = self.calls
        except Exception:
            self._answer_owed(layer, made, watch is not None, expected,
                              _first_tensor(args, kwargs, layer))
            raise
        finally:
            if watch is not None:
                watch.remove()
            self.calls, self.counts, self.plan, self.made = outer
        if calls != expected:
            raise unsupported(f"{self.site.cls_name} '{self.name}' made {calls} all-to-all(s) through "
                              f"moe_flashcomm in one forward where {expected} were expected")
        return out

    # ---- skip_padding (integrations/padding.py) ----
    def _watch_gate(self, layer: nn.Module):
        """With skip_padding on a MOELayer that exchanges, a hook (removed after this forward)
        that reads the routes its gate returns."""
        if not (self.config.skip_padding and self.site.cls_name == "MOELayer"
                and _exchanges(layer)):
            return None
        return layer.gate.register_forward_hook(functools.partial(self._gate_routes, layer))

    def _gate_routes(self, layer: nn.Module, gate: nn.Module, args: tuple, output: Any) -> None:
        """The gate's ``(l_aux, C, E, indices, locations, gates, exp_counts)``: count the
        filled slots per expert and exchange the counts (padding.py says why this is exact)."""
        if not (isinstance(output, tuple) and len(output) == 7 and torch.is_tensor(output[3])
                and torch.is_tensor(output[4])):
            raise unsupported(f"the gate of MOELayer '{self.name}' did not return sparse routes "
                              "(l_aux, C, E, indices, locations, gates, exp_counts); set "
                              '"skip_padding": false to exchange the padded tensor')
        if _tensor_parallel_size(layer) > 1:  # drop_tokens splits the capacity: padded exchange
            return
        mine = filled_slots(output[3], output[4], int(output[2]))
        comm = self.communicator(layer.ep_group)
        self.counts = RouteCounts.exchange(
            mine, output[1], functools.partial(self._library, "counts", comm, comm.exchange_counts))

    def alltoall(self, layer: nn.Module, dispatched: torch.Tensor) -> torch.Tensor:
        """Instance ``_alltoall`` of a patched DeepSpeedMoEInference: both its all-to-alls
        (dispatch, then combine; the patched ``forward`` restarts the count)."""
        group = layer.ep_group
        if dist.get_world_size(group=group) > 1:
            return self.exchange(group, dispatched)
        self.calls += 1  # DeepSpeed's own _alltoall is a no-op on one rank
        return dispatched

    def exchange(self, group, x: torch.Tensor, input_splits=None, output_splits=None) -> torch.Tensor:
        """DeepSpeed's all-to-all of ``x`` (dim 0 routed like ``all_to_all_single``): the
        first of a forward is the dispatch, the second the combine. With skip_padding, only
        the filled slots of ``x`` [E, C, M] go and the output is restored to that shape."""
        direction = "dispatch" if self.calls % 2 == 0 else "combine"
        self.calls += 1
        cfg = self.config
        codec, grad_codec = ((cfg.dispatch, cfg.dispatch_grad) if direction == "dispatch"
                             else (cfg.combine, cfg.combine_grad))
        if direction == "dispatch" and self.counts is not None:
            self.plan = self.counts.plan(x.shape, dist.get_world_size(group))
        plan = self.plan if input_splits is None else None
        stock_slots = None
        if plan is not None:
            x, input_splits, output_splits = plan.pack(x, direction)
            stock_slots = plan.stock_slots
        stats, comm = self.stats, self.communicator(group)
        began = stats.start(x.device)
        out = self.send(x, comm, codec, grad_codec, input_splits, output_splits)
        stats.stop(direction, began)
        stats.record(direction, x, input_splits, comm, codec, stock_slots)
        if out.requires_grad:
            grad_began = []

            def before_backward(g):  # the gradient reached the output: its exchange comes next
                stats.record(direction + "_grad", g, output_splits, comm, grad_codec,
                             stock_slots)
                grad_began.append(stats.start(g.device))

            out.register_hook(before_backward)
            if x.requires_grad:  # x's gradient is what the backward exchange produces
                x.register_hook(lambda g: stats.stop(direction + "_grad", grad_began.pop())
                                if grad_began else None)
        return out if plan is None else plan.unpack(out, direction)

    # ---- the transport: the only calls a patched MoE layer makes on its group ----
    def communicator(self, group) -> Communicator:
        """The Communicator of ``group`` that ``enable_deepspeed`` made; a copied or unpickled
        layer, or one enabled before its groups existed, takes the group's default one (made,
        collectively, at its first exchange)."""
        comm = self.comm
        if comm is None or comm.closed or comm.group is not process_group(group):
            comm = self.comm = communicator(group, gate=self.gate)
            self.owns_comm = False
        return comm

    def send(self, x: torch.Tensor, comm: Communicator, codec, grad_codec, input_splits,
             output_splits) -> torch.Tensor:
        """One all-to-all of ``x`` (and its backward) through moe_flashcomm."""
        cfg = self.config
        return self._library("all_to_all", comm, comm.all_to_all, x, output_splits,
                             input_splits, codec=codec, grad_codec=grad_codec,
                             chunks=cfg.chunks, algorithm=cfg.algorithm)

    def _library(self, step: str, comm: Communicator, run: Callable, *args: Any,
                 **kwargs: Any) -> Any:
        """``run``, one of the running forward's library calls on ``comm`` (``step``:
        "counts" or "all_to_all"), noted in ``made``."""
        made = self.made
        if made is not None:
            made.comm = comm
            if step == "counts":
                made.counted = True
            else:
                made.sent += 1
        try:
            return run(*args, **kwargs)
        except Exception:
            if made is not None:
                made.answered = True
            raise

    def _answer_owed(self, layer: nn.Module, made: _Made, counting: bool, expected: int,
                     x: Optional[torch.Tensor]) -> None:
        """A forward failed on this rank on its own between its library calls (in the gate,
        the experts, packing the slots: out of memory, ...). Over gloo the peers wait in
        its next call: answer it with a rejected frame, so that they raise in this forward
        and the next forwards pair up (else each peer's forward k met this rank's k + 1,
        one call apart, from then on). ``counting``: the forward exchanges counts first.
        Before the forward's first library call only where DeepSpeed makes no collective of
        its own on the group before it (_quiet_until_first_call): a frame meeting one
        would wedge the group."""
        comm = made.comm
        if comm is None:  # no library call yet
            comm = self.comm
            if (not _quiet_until_first_call(self.site, layer) or comm is None
                    or comm.group is not process_group(getattr(layer, "ep_group", None))):
                return
        if made.answered or comm.closed or comm.world == 1:
            return
        try:
            if counting and not made.counted and _tensor_parallel_size(layer) == 1:
                owed = "skip_padding counts"
            elif made.sent < expected:
                owed = "all_to_all"
            else:
                return  # (every call made: the peers are not waiting for this rank)
            comm._reject(x, owed)
        except Exception:  # noqa: BLE001 - the forward's own error is the one to report
            pass


def _tensor_parallel_size(layer: nn.Module) -> int:
    """The tensor-parallel world size DeepSpeed's ``MOELayer.forward`` sees (above 1 it
    splits the capacity dimension across those ranks before the all-to-all)."""
    ds = type(layer).forward.__globals__
    try:
        return int(ds["bwc_tensor_model_parallel_world_size"](ds["groups"].mpu))
    except KeyError as e:
        raise unsupported(f"MOELayer.forward has no global {e}, needed by skip_padding; set "
                          '"skip_padding": false') from None


def _state_for(layer: nn.Module, name: str, site: Site, config: FlashCommConfig) -> _LayerState:
    """What ``layer`` will hold: its own state where it is enabled already (configured anew
    once the ranks agree, its counters kept), else a new one checked to be installable, so
    that whatever keeps a layer from being patched raises before the ranks agree."""
    state = vars(layer).get(_STATE)
    if state is not None:
        return state
    if site.cls_name == "AutoEPMoELayer" and getattr(layer, "comm_backend", "comm") != "comm":
        raise ValueError(f"moe_flashcomm: AutoEP layer '{name}' uses comm_backend="
                         f"{layer.comm_backend!r} (DeepEP), whose transport moe_flashcomm cannot "
                         'replace; set expert_parallel.comm_backend to "comm", or disable this layer '
                         'with a rule {"match": ..., "enabled": false}')
    state = _LayerState(name, site, config)
    check_patchable(layer, state)
    return state


# ---- public API --------------------------------------------------------------------------------
def _find_layers(root: nn.Module) -> list[tuple[str, nn.Module, Site]]:
    sites = [(site, site.cls()) for site in _sites()]
    sites = [(site, cls) for site, cls in sites if cls is not None]
    found = []
    for name, module in root.named_modules():
        for site, cls in sites:
            if isinstance(module, cls):
                found.append((name, module, site))
                break
    return found


def _found(cfg: FlashCommConfig, names: list[str]) -> tuple:
    """What ``_check_rules`` needs of this rank: its number of MoE layers, its rules' largest
    index (-1: none) and the globs of its match rules that select one of its layers."""
    top = max((idx for rule in cfg.layers for idx in rule.index), default=-1)
    matched = [rule.match for rule in cfg.layers
               if rule.match and any(fnmatch.fnmatchcase(n, p) for n in names for p in rule.match)]
    return len(names), top, matched


def _check_rules(root: nn.Module, cfg: FlashCommConfig, names: list[str], found: list) -> None:
    """The model and its rules against what every rank found (``_found``; pipeline stages
    hold different MoE layers, and an ``index`` counts the stage's own): no MoE layer on any
    rank, or an index past the last MoE layer of every rank, raises on every rank (each
    decides alike, from what all ranks sent), before anything is changed; a match rule that
    selects no layer on any rank is a warning. A rank without MoE layers enables nothing."""
    most = max(n for n, _, _ in found)
    if most == 0:
        raise ValueError(f"moe_flashcomm.enable_deepspeed: {type(root).__name__} holds no "
                         "DeepSpeed MoE layer (deepspeed.moe.layer.MoE / MOELayer, "
                         "AutoEPMoELayer, DeepSpeedMoEInference)"
                         + (", nor does the model of any other rank" if len(found) > 1 else ""))
    has = (f"the model has {most}" if all(n == most for n, _, _ in found)
           else f"no rank's model has more than {most}")
    for i, rule in enumerate(cfg.layers):
        for idx in rule.index:
            if idx >= most:
                raise ConfigError(f"FlashCommConfig.layers[{i}].index: {idx} is out of range, "
                                  f"{has} DeepSpeed MoE layer(s)")
    bad = [r for r, (_, top, _) in enumerate(found) if top >= most]
    if bad:  # (this rank's rules are fine: it raises with the others)
        raise ConfigMismatchError(f"moe_flashcomm.enable_deepspeed failed on rank(s) {bad}: a "
                                  f"layers[].index rule is out of range, {has} DeepSpeed MoE "
                                  "layer(s)")
    for i, rule in enumerate(cfg.layers):
        if rule.match and not any(rule.match in matched for _, _, matched in found) and rank0():
            # (rank 0 speaks for every rank: the layers it names are its own, which in a
            # pipeline job are its stage's)
            whose = "rank 0's" if len(found) > 1 else "the"
            ds_logger().warning(f"moe_flashcomm: layers[{i}].match {list(rule.match)} selects no "
                                f"layer on any rank; {whose} MoE layers are: {names}")


class _Prepared(NamedTuple):
    """What ``enable_deepspeed``'s ``prepare`` resolves on a rank."""
    resolved: list  # [(name, layer, its FlashCommConfig)] per MoE layer
    layers: list    # [(name, layer, Site)] per MoE layer
    cfg: FlashCommConfig
    states: list    # the _LayerState of every enabled layer, None for the others
    root: Any       # the model's module


class _Shared(NamedTuple):
    """What every rank sees of a rank's ``_summary`` (``patching.agree``'s third element)."""
    stage_groups: list  # the expert-parallel groups (their ranks) that need stage groups
    kept: list          # the communicator keys this rank can keep
    found: tuple        # what ``_check_rules`` needs (``_found``)


def _agree(prepare: Callable[[], _Prepared]) -> tuple:
    """``prepare()`` on every rank, then their agreement (``patching.agree``): a rank that
    fails makes every rank raise, and so do ranks that share an expert-parallel group (every
    rank, where a layer has no group yet) and resolved different layer configs; pipeline
    stages, which hold different layers, need not agree. A non-flat algorithm then gets the
    stage groups of its expert-parallel groups, created by all processes together
    (expert-parallel groups are usually smaller than the job). Returns ``prepare()``, the
    communicator keys kept and every rank's ``_found`` (one: this process's, without
    torch.distributed)."""
    out, shared = agree(prepare, _summary, "moe_flashcomm.enable_deepspeed",
                        "ranks that share an expert-parallel group must enable the same "
                        "MoE layers with the same config")
    stage_groups = sorted({ranks for s in shared for ranks in s.stage_groups})
    if stage_groups:  # (every rank decides alike: from what all ranks sent)
        create_stage_groups([r for r in stage_groups if len(r) < dist.get_world_size()])
    # a communicator is kept only where every rank of its group keeps its own: making one
    # is collective in the group (every rank decides alike: from what all ranks sent)
    keep = {key for key in (shared[dist.get_rank()].kept if shared else ())
            if all(key in shared[r].kept for r in key[0])}
    found = ([s.found for s in shared] if shared
             else [_found(out.cfg, [n for n, _, _ in out.resolved])])
    return out + (keep, found)


def _summary(out: _Prepared) -> tuple:
    """What ``agree`` compares of ``prepare()``: per MoE layer what its exchanges use (of a
    disabled layer only that: its other fields are never used; ``all_reduce`` is agreed per
    tensor-parallel group by ``enable_from_section``); the ranks of its expert-parallel
    groups; the groups of the layers that need stage groups, the communicators this rank
    can keep and what ``_check_rules`` needs."""
    resolved = out.resolved
    groups = [None if getattr(layer, "ep_group", None) is None
              else group_ranks(layer.ep_group, name, "ep_group") for name, layer, _ in resolved]
    return ([(name, {**compared_fields(lcfg, [f.name for f in dataclasses.fields(lcfg)
                                              if f.name != "all_reduce"]), **_gating(layer)}
              if lcfg.enabled else compared_fields(lcfg, ["enabled"]))
             for name, layer, lcfg in resolved],
            None if None in groups else {r for g in groups for r in g},
            _Shared(sorted({g for g, (_, _, lcfg) in zip(groups, resolved)
                            if g is not None and lcfg.enabled and lcfg.algorithm != "flat"}),
                    sorted(_kept_communicators(resolved, out.states)),
                    _found(out.cfg, [n for n, _, _ in resolved])))


# What sizes a MOELayer's exchanges besides the config: its gate's settings (DeepSpeed's
# TopKGate). Ranks that differ there (one with drop_tokens, say) enter different collectives
# at the first forward, stock or patched, and wait there until the timeout.
GATING = ("k", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens",
          "drop_policy")


def _gating(layer: nn.Module) -> dict:
    """The gate settings of an enabled layer that ``agree`` compares (none for a layer
    without DeepSpeed's TopKGate)."""
    gate = getattr(layer, "gate", None)
    wg = getattr(gate, "wg", None)
    if not isinstance(getattr(wg, "weight", None), torch.Tensor):
        return {}
    settings = {a: getattr(gate, a) for a in GATING if hasattr(gate, a)}
    return {"gate settings": repr({"experts": wg.weight.shape[0], **settings})}


def _comm_key(layer: nn.Module, gate: SizeGate) -> Optional[tuple]:
    """Which communicator an enabled layer uses: (its group's global ranks, gate tables)."""
    group = getattr(layer, "ep_group", None)
    if group is None or not dist.is_initialized():
        return None
    return tuple(dist.get_process_group_ranks(group)), gate.digest


def _kept_communicators(resolved: list, states: list) -> set:
    """The communicator keys (``_comm_key``) this rank can keep: every layer of the key is
    enabled already, stays enabled and holds the same open communicator that
    ``enable_deepspeed`` made for its group and gate. Calling ``enable_deepspeed`` again keeps
    it, so the backward of a forward made before the call still has its transport."""
    kept: dict = {}  # key -> its layers' one communicator, or None
    for (_, layer, lcfg), state in zip(resolved, states):
        key = None if state is None else _comm_key(layer, SizeGate.coerce(lcfg.gate))
        if key is None:
            continue
        comm = state.comm
        usable = (state is vars(layer).get(_STATE) and state.owns_comm and not comm.closed
                  and comm.group is layer.ep_group and comm.gate.digest == key[1])
        kept[key] = comm if usable and kept.get(key, comm) is comm else None
    return {key for key, comm in kept.items() if comm is not None}


def _communicators(enabled: list[tuple[nn.Module, SizeGate, Optional["_LayerState"]]],
                   keep: set, made: list) -> list:
    """The communicator of each layer to enable (None: its groups do not exist yet, the
    default communicator at first use): one per expert-parallel group and size gate, made by
    every member in the same order (layers in module order, agreed by ``_agree``); the layers
    share it. Where every rank of the group keeps the one it has (``keep``, agreed), it stays:
    a new one would close the old one under the backward of a forward made before this call.
    Each one made here is appended to ``made`` at once (the caller closes them if the call
    fails, here or later); nothing else changes."""
    mine_of: dict = {}
    out = []
    for layer, gate, state in enabled:
        key = _comm_key(layer, gate)
        if key is None:
            out.append(None)
            continue
        mine = (id(layer.ep_group), key[1])  # (per group object, as its forward checks)
        if mine not in mine_of:
            if key in keep:
                mine_of[mine] = state.comm
            else:
                mine_of[mine] = Communicator(layer.ep_group, gate=gate)
                made.append(mine_of[mine])
        out.append(mine_of[mine])
    return out


def enable_deepspeed(model: Any,
                     config: Union[FlashCommConfig, Mapping[str, Any], str, os.PathLike, None] = None
                     ) -> dict[str, ExchangeStats]:
    """Send every DeepSpeed MoE all-to-all of ``model`` through moe_flashcomm.

    model:  an ``nn.Module`` holding ``deepspeed.moe.layer.MoE`` / ``MOELayer``,
            ``AutoEPMoELayer`` or ``DeepSpeedMoEInference`` layers, or the engine returned by
            ``deepspeed.initialize`` / ``deepspeed.init_inference``.
    config: a FlashCommConfig, a dict of its fields, a whole DeepSpeed config dict (its
            ``"moe_flashcomm"`` section is used), a DeepSpeed JSON config file's path (its
            section), or None: the engine's DeepSpeed config section when ``model`` is a
            training engine, else the defaults. A DeepSpeed config (a file's or the
            engine's) without the section gives the defaults, with a warning on rank 0
            that names a top-level key that looks like a misspelt section.

    AutoEP replaces layers inside ``deepspeed.initialize``: enable on the engine it returns.
    The config's ``all_reduce`` applies too: set, it installs or updates the tensor-parallel
    all-reduce hooks (``enable_all_reduce``); off, it removes those an earlier call of this
    function installed (hooks of a separate ``enable_all_reduce`` call stay).
    ``disable_deepspeed`` removes both.
    Every rank resolves the model and config first and then all agree (one small collective):
    a rank that fails, or resolves different layer configs, makes every rank raise; a rank
    whose model holds no MoE layer (a pipeline stage) enables nothing, unless no rank's model
    holds one (an error). A call that raises leaves the model as it was. The
    layers of one expert-parallel group share one ``moe_flashcomm.Communicator``, made here
    (collectively in the group). Calling again updates the configs (the counters continue)
    and keeps a layer's communicator where its group and gate stay, so the backward of a
    forward made before the call still runs (with the codecs of that forward).
    Returns the live ExchangeStats of every enabled layer, by qualified module name.
    """
    ds = import_deepspeed()

    def prepare() -> _Prepared:
        root, cfg = resolve(model, config)
        layers = _find_layers(root)
        resolved = [(name, layer, cfg.for_layer(name, index))
                    for index, (name, layer, _) in enumerate(layers)]
        states = [_state_for(layer, name, site, lcfg) if lcfg.enabled else None
                  for (name, layer, site), (_, _, lcfg) in zip(layers, resolved)]
        return _Prepared(resolved, layers, cfg, states, root)

    resolved, layers, cfg, states, root, keep, found = _agree(prepare)
    _check_rules(root, cfg, [n for n, _, _ in layers], found)
    # What can fail (making communicators, the all-reduce hooks) comes before any layer
    # changes: a call that raises leaves the model as it was.
    on = [(layer, SizeGate.coerce(lcfg.gate), state)
          for (_, layer, lcfg), state in zip(resolved, states) if lcfg.enabled]
    made: list = []
    try:
        comms = _communicators(on, keep, made)
        enable_from_section(model, cfg)  # the tensor-parallel all-reduce hooks
    except BaseException:  # (the communicators made so far: this call's, and no layer's)
        for comm in made:
            comm.close()
        raise
    comm_of = {id(layer): comm for (layer, _, _), comm in zip(on, comms)}
    # the communicators of the layers enabled before: closed below where no layer keeps them
    before = [s.comm for s in (vars(layer).get(_STATE) for _, layer, _ in layers)
              if s is not None and s.owns_comm]
    enabled: dict[str, ExchangeStats] = {}
    lines = []
    for (name, layer, site), (_, _, lcfg), state in zip(layers, resolved, states):
        label = f"{name or '<root>'} [{site.cls_name}, ep_size={getattr(layer, 'ep_size', '?')}]"
        if not lcfg.enabled:
            unpatch(layer, _STATE)
            lines.append(f"  {label}: stock DeepSpeed (disabled by config)")
            continue
        if state is vars(layer).get(_STATE):  # enabled again: new config, same counters
            state.configure(lcfg)
        else:
            patch(layer, state)
        comm = comm_of[id(layer)]
        if comm is not None:  # (None: the default communicator at its first exchange)
            state.comm, state.owns_comm = comm, True
        enabled[name] = state.stats
        lines.append(f"  {label}: {lcfg.describe()}")
    in_use = {id(state.comm) for state in states if state is not None}
    for comm in before:  # only after every layer has its own: layers may share one
        if id(comm) not in in_use:
            comm.close()
    if not layers:  # (another rank's model holds some: _check_rules)
        ds_logger().info(f"moe_flashcomm: rank {dist.get_rank()} holds no DeepSpeed MoE layer "
                          "(a pipeline stage without one?): nothing enabled on it")
    elif rank0():
        ds_logger().info(f"moe_flashcomm: {len(enabled)} of {len(layers)} DeepSpeed MoE layer(s) "
                          f"send their all-to-alls through moe_flashcomm (DeepSpeed {ds.__version__}):\n"
                          + "\n".join(lines))
    return enabled


def disable_deepspeed(model: Any) -> dict[str, ExchangeStats]:
    """Restore stock DeepSpeed on every layer ``enable_deepspeed`` patched in ``model``
    (removes the per-instance attributes) and close the layers' communicators (their
    peer-to-peer memory is freed). Returns the final ExchangeStats of those layers.

    Not a collective, but every rank calls it at the same point, as ``enable_deepspeed``:
    a rank restored alone runs DeepSpeed's own all-to-all while its peers wait for it in
    moe_flashcomm's."""
    root, _ = unwrap(model)
    disable_all_reduce(root)
    restored = {}
    for name, module in root.named_modules():
        state = unpatch(module, _STATE)
        if state is not None:
            restored[name] = state.stats
            if state.owns_comm:  # frees its peer-to-peer memory (shared: closed once)
                state.comm.close()
    if restored and rank0():
        ds_logger().info(f"moe_flashcomm: restored stock DeepSpeed on {len(restored)} MoE layer(s)")
    return restored


def exchange_stats(model: Any) -> dict[str, ExchangeStats]:
    """The live ExchangeStats of every patched layer of ``model``, by module name; sum them
    with ``ExchangeStats.total(...)``."""
    root, _ = unwrap(model)
    return {name: state.stats for name, state in states(root, _STATE).items()}


__all__ = ["TESTED_VERSIONS", "disable_deepspeed", "enable_deepspeed", "exchange_stats"]
