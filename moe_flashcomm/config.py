"""FlashCommConfig: what ``moe_flashcomm.enable_deepspeed`` does to each DeepSpeed MoE layer.

The same fields are read from a ``"moe_flashcomm"`` section of a DeepSpeed JSON config::

    "moe_flashcomm": {
        "dispatch": {"bits": 4, "group_size": 128},
        "combine": 8,
        "dispatch_grad": 8,
        "combine_grad": {"bits": 8, "rounding": "stochastic"},
        "all_reduce": 4,
        "layers": [
            {"match": "*.layers.0.*", "dispatch": "bf16"},
            {"index": [3, 5], "combine": {"intra_node": "bf16", "inter_node": 4}},
            {"match": "decoder.*", "enabled": false}
        ]
    }

A codec field takes what ``CodecConfig.coerce`` takes (a bits value: 2..8, "fp8", "bf16",
which rounds fp32 tokens to bf16, or "native", the tokens in their own dtype, exact for fp32,
bf16 and fp16; a dict of CodecConfig fields; a CodecConfig) or ``{"intra_node": ..., "inter_node": ...}`` for a codec per link
class (``moe_flashcomm.comm.LinkCodecs``). Every field has a default, which null (None) also
means; in a layer rule null leaves the field as the base config has it. A bad value raises
``ValueError`` naming the field and the allowed values; unknown keys are errors.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence

from .codec import CodecConfig
from .comm.all_reduce import check_codecs as check_all_reduce_codecs
from .comm.exchange import ALGORITHMS  # the transport's algorithms
from .comm.gate import unique_keys
from .comm.topology import LinkCodecs

SECTION = "moe_flashcomm"
"""Key of the section in a DeepSpeed JSON config."""

CODEC_FIELDS = ("dispatch", "combine", "dispatch_grad", "combine_grad")

# Top-level keys of a DeepSpeed config: a dict with any of them given where the section's
# fields go is a whole DeepSpeed config, not the section.
DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps", "optimizer", "scheduler", "fp16", "bf16",
                  "zero_optimization")


class ConfigError(ValueError):
    """A FlashCommConfig field has a bad value; the message names the field."""


def _codec(value: Any, where: str) -> LinkCodecs:
    try:
        return LinkCodecs.coerce(value, name=where)
    except (TypeError, ValueError) as e:
        msg = f"{e}" if str(e).startswith(where) else f"{where}: {e}"
        bits = _int_spelling(value, msg)
        raise ConfigError(msg + (f"; did you mean {bits}?" if bits else "")) from None


def _int_spelling(value: Any, msg: str) -> Optional[int]:
    """N of the "intN" / "int N" bits value in a codec (the tools' --codecs spelling) that
    the error ``msg`` rejected ("got 'int4'"), where N is a width the JSON takes as N."""
    if isinstance(value, Mapping):
        return next((n for v in value.values() if (n := _int_spelling(v, msg))), None)
    if not isinstance(value, str) or f"got {value!r}" not in msg:
        return None
    m = re.fullmatch(r"\s*int\s*([2-8])\s*", value, re.IGNORECASE)
    return int(m[1]) if m else None


def read_deepspeed_config(ds_config: Any) -> Mapping:
    """A DeepSpeed config as a dict: from a dict, a JSON file path or a ``DeepSpeedConfig``."""
    if isinstance(ds_config, (str, os.PathLike)):
        try:
            f = open(ds_config)
        except OSError as e:  # ("int4" given as the config: say how a string is read)
            raise ConfigError(f"cannot read DeepSpeed config {os.fspath(ds_config)!r}: "
                              f"{e.strerror} (a config given as a string is a DeepSpeed "
                              "JSON file's path)") from None
        with f:
            try:  # (repeated keys refused, as DeepSpeed's own loader does)
                ds_config = json.load(f, object_pairs_hook=unique_keys)
            except ValueError as e:  # (not JSON, or not UTF-8 text): name the file
                raise ConfigError(f"DeepSpeed config {f.name!r} cannot be read as JSON: {e}") from None
        if not isinstance(ds_config, Mapping):
            raise ConfigError(f"DeepSpeed config {f.name!r} must hold a JSON object, got "
                              f"{type(ds_config).__name__}")
    elif hasattr(ds_config, "_param_dict"):  # deepspeed.runtime.config.DeepSpeedConfig
        ds_config = ds_config._param_dict
    if not isinstance(ds_config, Mapping):
        raise TypeError(f"expected a DeepSpeed config dict or JSON path, got {type(ds_config).__name__}")
    return ds_config


def _misspelt_section(keys: Any) -> str:
    """"; did you mean ...?" naming the keys that look like a misspelt section, else ""."""
    def near(k: str) -> bool:
        bare = k.lower().replace("_", "").replace("-", "")
        return bare.startswith(("moe", "flashcomm")) or bool(
            difflib.get_close_matches(SECTION, [k], cutoff=0.8))
    close = [k for k in keys if isinstance(k, str) and k != SECTION and near(k)]
    if not close:
        return ""
    return (f"; {'key' if len(close) == 1 else 'keys'} {', '.join(map(repr, close))} "
            f"{'is' if len(close) == 1 else 'are'} not read: did you mean \"{SECTION}\"?")


def missing_section_message(ds_config: Mapping) -> str:
    """What to warn of a DeepSpeed config without a ``"moe_flashcomm"`` section: the defaults
    run (DeepSpeed accepts unknown top-level keys, so a misspelt section goes unnoticed)."""
    return (f"moe_flashcomm: the DeepSpeed config has no \"{SECTION}\" section: the defaults "
            f"are used ({FlashCommConfig().describe()})" + _misspelt_section(ds_config))


def _codec_to_json(c: LinkCodecs) -> Any:
    if c.intra_node == c.inter_node:
        return c.intra_node.to_dict()
    return {"intra_node": c.intra_node.to_dict(), "inter_node": c.inter_node.to_dict()}


@dataclass(frozen=True)
class LayerRule:
    """Per-layer override: the layers it selects get ``overrides`` on top of the base config.

    match:  fnmatch globs over the layer's qualified module name (as in ``named_modules()``
            of the model given to ``enable_deepspeed``, e.g. ``blocks.3.moe.deepspeed_moe``).
    index:  0-based positions among the DeepSpeed MoE layers of the model, in module order.
    A rule has exactly one of the two. ``overrides`` holds (field, value) pairs of the
    per-layer FlashCommConfig fields; a rule made by hand is checked when a config takes it,
    as the dict ``{"match" or "index": ..., **overrides}`` would be.
    """

    match: tuple[str, ...] = ()
    index: tuple[int, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()

    def __hash__(self) -> int:  # (an override's gate tables are dicts: hashed as their JSON)
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def selects(self, name: str, index: int) -> bool:
        if self.index:
            return index in self.index
        return any(fnmatch.fnmatchcase(name, p) for p in self.match)

    def to_dict(self) -> dict:
        d: dict = {"match": list(self.match)} if self.match else {"index": list(self.index)}
        for k, v in self.overrides:
            if k in CODEC_FIELDS:
                v = _codec_to_json(v)
            elif k == "chunks" and v is None:  # "auto": a null in a rule keeps the base's chunks
                v = "auto"
            d[k] = v
        return copy.deepcopy(d)  # (the gate's tables: what the caller changes stays its own)


@dataclass(frozen=True)
class FlashCommConfig:
    """How DeepSpeed MoE layers send their all-to-alls through moe_flashcomm.

    enabled:       False leaves the layers stock (useful in a JSON config or a layer rule).
    dispatch:      codec of the tokens sent to the experts (forward, 1st all-to-all).
    combine:       codec of the expert outputs sent back (forward, 2nd all-to-all).
    dispatch_grad: codec of the dispatch's gradient (backward of the 1st all-to-all).
    combine_grad:  codec of the combine's gradient (backward of the 2nd all-to-all).
    algorithm:     all-to-all algorithm: "flat", "hierarchical" or "auto" (all_to_all's).
    gate:          size gate: True = the tuned thresholds (``$MOE_FLASHCOMM_GATE_FILE`` or
                   the measured defaults), False = always use the codec, a thresholds dict
                   ``{path: {codec: bytes}}`` or the path of a JSON file written by
                   ``python -m moe_flashcomm.tune_gate`` (read when the config is built, so
                   a bad file fails there, naming the field; the config keeps the tables
                   read, ``{"thresholds": ..., "all_reduce": ...}``, not the path, so copies
                   and pickles of a patched model carry them). Below its threshold a message
                   goes as bf16.
    chunks:        pipeline each exchange in this many chunks (encode / transfer / decode
                   overlap on CUDA); None or "auto": chosen by message size; 1: no chunking.
    layers:        per-layer rules (LayerRule), applied in order, later rules winning.
    skip_padding:  DeepSpeed ``MOELayer``: send only each expert's filled capacity slots on
                   the dispatch, the combine and their gradients (uneven all-to-all; the
                   receiver restores the zero rows). Exact: outputs and gradients are those of
                   the padded exchange. No effect on AutoEP (already dropless) and
                   DeepSpeedMoEInference layers, or with tensor parallelism (the exchange
                   stays padded there).
    all_reduce:    tensor-parallel inference all-reduces of activations through
                   ``moe_flashcomm.all_reduce`` (``moe_flashcomm.enable_all_reduce``): None /
                   false (default) = off, else their codec (``{"intra_node": ...,
                   "inter_node": ...}`` with different codecs: the hierarchical all-reduce;
                   "native" on both links or on neither). Uses ``gate`` and ``chunks``
                   too. Not a per-layer field.
    """

    enabled: bool = True
    dispatch: Any = field(default_factory=CodecConfig)
    combine: Any = field(default_factory=CodecConfig)
    dispatch_grad: Any = field(default_factory=lambda: CodecConfig(bits=8))
    combine_grad: Any = field(default_factory=lambda: CodecConfig(bits=8))
    algorithm: str = "flat"
    gate: Any = True
    chunks: Optional[int] = None
    layers: tuple = ()
    all_reduce: Any = None
    skip_padding: bool = True

    def __post_init__(self) -> None:
        self._validate("FlashCommConfig")

    def __hash__(self) -> int:  # (a gate's tables are dicts: hashed as the JSON they write)
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def _validate(self, where: str) -> None:
        set_ = object.__setattr__
        for f in fields(self):  # None (JSON null): the field's default, not CodecConfig's int4
            if getattr(self, f.name) is None:
                set_(self, f.name, _default(f))
        for name in ("enabled", "skip_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}.{name} must be true or false, got {getattr(self, name)!r}")
        for name in CODEC_FIELDS:
            set_(self, name, _codec(getattr(self, name), f"{where}.{name}"))
        if not (isinstance(self.algorithm, str) and self.algorithm in ALGORITHMS):
            raise ConfigError(f"{where}.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        set_(self, "gate", _check_gate(self.gate, f"{where}.gate"))
        if self.chunks == "auto":
            set_(self, "chunks", None)
        elif self.chunks is not None and (isinstance(self.chunks, bool)
                                          or not isinstance(self.chunks, int) or self.chunks < 1):
            raise ConfigError(f"{where}.chunks must be an int >= 1 or \"auto\", got {self.chunks!r}")
        layers = self.layers
        if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
            raise ConfigError(f"{where}.layers must be a list of rules (dicts with 'match' or "
                              f"'index' and the fields to override), got {layers!r}")
        set_(self, "layers", tuple(_rule(r, f"{where}.layers[{i}]") for i, r in enumerate(layers)))
        if self.all_reduce is None or self.all_reduce is False:
            set_(self, "all_reduce", None)
        else:
            try:
                ar = _codec(None if self.all_reduce is True else self.all_reduce,
                            f"{where}.all_reduce")
            except ConfigError as e:  # (its bool and null are not codec values)
                raise ConfigError(f"{e} (all_reduce also takes true: int4, or false / null: "
                                  "off)") from None
            try:
                check_all_reduce_codecs(ar, f"{where}.all_reduce", f"{where}.all_reduce")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            set_(self, "all_reduce", ar)

    # ---- per layer -----------------------------------------------------------------------
    def for_layer(self, name: str, index: int) -> "FlashCommConfig":
        """The config of the MoE layer ``name`` (``index``-th in the model): the base with
        every selecting rule applied in order. The result has no rules."""
        overrides: dict = {}
        for rule in self.layers:
            if rule.selects(name, index):
                overrides.update(rule.overrides)
        return replace(self, layers=(), **overrides)

    # ---- dict / JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in CODEC_FIELDS or (f.name == "all_reduce" and v is not None):
                v = _codec_to_json(v)
            elif f.name == "layers":
                v = [r.to_dict() for r in v]
            d[f.name] = v
        return copy.deepcopy(d)  # (the gate's tables: what the caller changes stays its own)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "FlashCommConfig") -> "FlashCommConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} must be a dict, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed), key=repr)  # (keys of any type: YAML makes some)
        if unknown and set(unknown) & set(DEEPSPEED_KEYS):  # (an error: guessing is not safer)
            raise ConfigError(
                f"{where}: unknown field(s) {unknown}: this looks like a whole DeepSpeed config "
                f"without a \"{SECTION}\" section; put the moe_flashcomm settings under a "
                f"\"{SECTION}\" section of it (or pass that section itself)"
                + _misspelt_section(unknown))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(allowed)}"
                              + _misspelt_section(unknown))
        obj = cls.__new__(cls)
        for f in fields(cls):
            object.__setattr__(obj, f.name, d.get(f.name))  # (absent or null: the default)
        obj._validate(where)
        return obj

    @classmethod
    def from_deepspeed_config(cls, ds_config: Any) -> Optional["FlashCommConfig"]:
        """The ``"moe_flashcomm"`` section of a DeepSpeed config (a dict, a JSON file path, a
        ``DeepSpeedConfig``), or None when it has no such section (``missing_section_message``
        says so, naming a key that looks like a misspelt section)."""
        ds_config = read_deepspeed_config(ds_config)
        if SECTION not in ds_config:
            return None
        section = ds_config[SECTION]
        return cls.from_dict(section if section is not None else {}, where=SECTION)

    @classmethod
    def coerce(cls, obj: "FlashCommConfig | Mapping[str, Any] | str | os.PathLike | None"
               ) -> "FlashCommConfig":
        """A FlashCommConfig from itself, a dict of its fields, a whole DeepSpeed config dict
        (one holding a ``"moe_flashcomm"`` key), a DeepSpeed JSON file's path (its section;
        the defaults without one) or None (the defaults)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            return cls.from_deepspeed_config(obj) or cls()
        if isinstance(obj, Mapping):
            if SECTION in obj:
                return cls.from_deepspeed_config(obj)  # type: ignore[return-value]
            return cls.from_dict(obj)
        raise TypeError(f"config must be a FlashCommConfig, a dict, a DeepSpeed JSON config "
                        f"path or None, got {type(obj).__name__}")

    def describe(self) -> str:
        """One line for logs: the four codecs and the transport options."""
        s = (f"dispatch={self.dispatch} combine={self.combine} "
             f"dispatch_grad={self.dispatch_grad} combine_grad={self.combine_grad}")
        extra = [f"algorithm={self.algorithm}"]
        if self.chunks is not None:
            extra.append(f"chunks={self.chunks}")
        if self.gate is not True:
            extra.append(f"gate={'off' if self.gate is False else 'custom'}")
        if self.all_reduce is not None:
            extra.append(f"all_reduce={self.all_reduce}")
        if not self.skip_padding:
            extra.append("skip_padding=off")
        return s + " " + " ".join(extra)


def _default(f) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default


_BOOL_WORDS = ("true", "false", "on", "off", "yes", "no", "1", "0", "enabled", "disabled",
               "none", "null")


def _check_gate(gate: Any, where: str) -> Any:
    if isinstance(gate, bool):
        return gate
    if isinstance(gate, (str, os.PathLike, Mapping)):
        # loaded as enable_deepspeed will load it: a missing or bad file fails here, named
        from .comm.gate import DEFAULT_ALL_REDUCE_THRESHOLDS, SizeGate
        try:
            loaded = SizeGate.coerce(gate)
        except (TypeError, ValueError, KeyError) as e:
            # "true" / "off" in quotes: a string is read as a file path
            word = isinstance(gate, str) and gate.strip().lower() in _BOOL_WORDS
            raise ConfigError(f"{where}: {e}" + (" (a string is a gate file's path; JSON true / "
                                                 "false, unquoted, turn the gate on / off)"
                                                 if word else "")) from None
        # a copy: the caller's dict, changed later, would change a checked config
        if isinstance(gate, Mapping):
            return copy.deepcopy(dict(gate))
        # a file: the tables read now, not its path, which a later read (a copy or a pickle
        # of a patched model loaded elsewhere) could find changed, moved or gone
        tables = {"thresholds": loaded.thresholds}
        if loaded.all_reduce != DEFAULT_ALL_REDUCE_THRESHOLDS:  # (left out: the defaults)
            tables["all_reduce"] = loaded.all_reduce
        return tables
    raise ConfigError(f"{where} must be true, false, a thresholds dict or a JSON file path, "
                      f"got {gate!r}")


_RULE_FIELDS = ("enabled", *CODEC_FIELDS, "algorithm", "gate", "chunks", "skip_padding")


def _rule(r: Any, where: str) -> LayerRule:
    if isinstance(r, LayerRule):  # made by hand too: checked as the dict it stands for
        pairs = r.overrides
        if not (isinstance(pairs, (tuple, list)) and all(
                isinstance(p, (tuple, list)) and len(p) == 2 and p[0] in _RULE_FIELDS
                for p in pairs)):
            raise ConfigError(f"{where}.overrides must be (field, value) pairs of the fields "
                              f"{', '.join(_RULE_FIELDS)}, got {pairs!r}")
        r = {**{k: v for k, v in (("match", r.match), ("index", r.index)) if v != ()},
             **{k: "auto" if k == "chunks" and v is None else v for k, v in pairs}}
    if not isinstance(r, Mapping):
        raise ConfigError(f"{where} must be a dict with 'match' or 'index' and the fields to "
                          f"override, got {r!r}")
    unknown = sorted(set(r) - {"match", "index", *_RULE_FIELDS}, key=repr)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: match, index, "
                          + ", ".join(_RULE_FIELDS))
    if ("match" in r) == ("index" in r):
        raise ConfigError(f"{where} needs exactly one of 'match' (glob(s) over the layer's "
                          "module name) or 'index' (int(s): position among the MoE layers)")
    match: tuple = ()
    index: tuple = ()
    if "match" in r:
        m = r["match"]
        match = (m,) if isinstance(m, str) else tuple(m) if isinstance(m, Sequence) else ()
        if not match or not all(isinstance(p, str) and p for p in match):
            raise ConfigError(f"{where}.match must be a glob string or a list of them, got {m!r}")
    else:
        i = r["index"]
        index = (i,) if isinstance(i, int) else tuple(i) if isinstance(i, Sequence) else ()
        if not index or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                for v in index):
            raise ConfigError(f"{where}.index must be an int >= 0 or a list of them, got {i!r}")
    # null overrides nothing: the layer keeps the base config's value
    overrides = {k: v for k, v in r.items() if k not in ("match", "index") and v is not None}
    # validate the overridden values exactly as top-level fields are
    probe = FlashCommConfig.from_dict(overrides, where=where)
    return LayerRule(match, index, tuple((k, getattr(probe, k)) for k in overrides))


__all__ = ["ALGORITHMS", "ConfigError", "FlashCommConfig", "LayerRule", "SECTION"]
