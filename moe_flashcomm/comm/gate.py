"""Size gate: below a per-path, per-codec size the bf16 path is taken, because encoding
and decoding would cost more than the smaller transfer saves.

A threshold is in *bf16 bytes of the rows one rank sends to one peer* (rows x hidden x 2):
the sender and the receiver of a pair both know that number, so they take the same
decision without talking. Tables come from ``python -m moe_flashcomm.tune_gate`` (JSON, loaded from
``$MOE_FLASHCOMM_GATE_FILE``), else the measured defaults below.

``moe_flashcomm.all_reduce`` has its own table, ``all_reduce`` (a JSON file's
``"all_reduce"`` section, same ``{path: {codec_key: bytes}}`` shape): there a threshold is
in *bf16 bytes of the whole tensor* (numel x 2), the same number on every rank, and below
it the tensor is summed unquantized by the backend (``torch.distributed.all_reduce`` over
NCCL; over gloo a framed equivalent, whose headers check the numel).

The ``"bf16"`` and ``"native"`` codecs are never gated (``"native"`` all-reduces are always
``torch.distributed.all_reduce``). Tables are checked against their schema (CODEC_KEYS,
PATHS, int bytes); a gate file may hold TABLES and the notes FILE_INFO, nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional, Union

from .. import env
from ..codec import CodecConfig
from .topology import PATHS


NEVER_PAYS = 1 << 62  # a threshold above any message: the codec never pays on that path

# Measured defaults, fitted by fit_thresholds from the 2x H200 sweeps behind
# docs/benchmarks.md (`python -m moe_flashcomm.tune_gate --from-bench docs/data/bench_all2all*.json
# --python`). Paths absent here ("cpu") are never gated: on CPU the library is for development
# and CI, not speed. int5 and int7, not measured, take int6's and int8's (_lookup). Gates
# copy the tables they are given: copy these too before changing them.
DEFAULT_THRESHOLDS: dict = {
    # NVLink: the peer-to-peer transport (comm/p2p.py) pays from 128 MiB per peer
    "nvlink": {"fp8": 134217728, "int2": 134213632, "int3": 134213632, "int4": 134213632,
               "int6": 134213632, "int8": 134213632},
    "host": {"fp8": 33546240, "int2": 33546240, "int3": 33546240, "int4": 33546240,
             "int6": 33546240, "int8": 33546240},
    "network": {"fp8": 2093056, "int2": 2093056, "int3": 2093056, "int4": 2093056,
                "int6": 2093056, "int8": 2093056},
}

# All-reduce defaults (bf16 bytes of the whole tensor), fitted by tools/bench_allreduce.py on
# 2x H200 (docs/benchmarks.md): quantizing pays from 16 MiB over host memory, 4 MiB over the
# network, and on NVLink only at 1 GiB (int8 never: NCCL stays). Widths not measured take the
# next wider one's (_lookup): int3 int4's, int5 to int7 int8's.
DEFAULT_ALL_REDUCE_THRESHOLDS: dict = {
    "nvlink": {"int2": 1 << 30, "int4": 1 << 30, "fp8": 1 << 30, "int8": NEVER_PAYS},
    "host": {"*": 16 << 20},
    "network": {"*": 4 << 20},
}


def codec_key(cfg: CodecConfig) -> str:
    """Table key of a codec: ``int2``..``int8``, ``fp8`` (``bf16`` and ``native`` are never
    gated)."""
    return f"int{cfg.bits}" if cfg.is_int else str(cfg.bits)


# The schema of a table ``{path: {codec key: bytes}}`` and of a gate file.
CODEC_KEYS = tuple(f"int{b}" for b in range(2, 9)) + ("fp8", "*")  # "*": the path's fallback
TABLES = ("thresholds", "all_reduce")
FILE_INFO = ("units", "device", "date", "source")  # what the tuner notes beside them


def _check_table(given: Any, name: str, source: str) -> dict:
    """``given`` checked against the table schema: a copy, or ValueError naming the key."""
    where = f"size gate{' ' + source if source else ''}"
    if not isinstance(given, Mapping):
        raise ValueError(f"{where}: {name} must be a table {{path: {{codec: bytes}}}}, got "
                         f"{type(given).__name__} {given!r}")
    table = {}
    for path, row in given.items():
        if path not in PATHS:
            raise ValueError(f"{where}: unknown path {path!r} in {name}; allowed: {', '.join(PATHS)}")
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: {name}[{path!r}] must be a table {{codec: bytes}}, got "
                             f"{type(row).__name__} {row!r}")
        for key, value in row.items():
            if key not in CODEC_KEYS:
                raise ValueError(f"{where}: unknown codec key {key!r} in {name}[{path!r}]; allowed: "
                                 f"{', '.join(CODEC_KEYS)} (bf16 and native are never gated)")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {name}[{path!r}][{key!r}] must be an int >= 0 "
                                 f"(bytes), got {value!r}")
        table[path] = dict(row)
    return table


def _lookup(row: Mapping[str, int], cfg: CodecConfig) -> int:
    """The threshold of a quantized ``cfg`` in one path's row: its own key, else the row's
    ``"*"``, else that of the next wider integer width the row has (a wider code carries more
    bytes, so it pays at a larger size: borrowing its threshold errs toward bf16), else 0."""
    wider = [f"int{b}" for b in range(cfg.bits + 1, 9)] if cfg.is_int else []
    for key in (codec_key(cfg), "*", *wider):
        if key in row:
            return int(row[key])
    return 0


def kept_fields(path: Union[str, os.PathLike]) -> dict:
    """What ``write_gate`` keeps of the gate file at ``path``: its tables and notes ({} where
    there is no file, or an empty one). ValueError naming the file where it is no gate file
    (it would be written over: another file given by mistake) or a kept table is one
    ``SizeGate.load`` would refuse. The tools check it at their start, before measuring."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # (ValueError: not UTF-8 text)
        raise ValueError(f"{os.fspath(path)} cannot be read ({e}): not a gate file to write "
                         "over; remove it or choose another path") from None
    if not text.strip():
        return {}
    try:
        old = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):  # (a repeated key too: load would refuse the file)
        old = None
    foreign = sorted(set(old) - set(TABLES + FILE_INFO)) if isinstance(old, dict) else None
    if foreign is None or foreign:
        what = "is not a JSON object" if foreign is None else f"has the keys {foreign}"
        raise ValueError(f"{os.fspath(path)} exists and {what}: not a gate file to write over "
                         f"(a gate file holds {', '.join(TABLES + FILE_INFO)}); remove it or "
                         "choose another path")
    kept = dict(old)
    for name in TABLES:
        if name in kept:
            _check_table(kept[name], name, f"{os.fspath(path)} (kept when it is written again)")
    return kept


def with_defaults(measured: Mapping[str, Mapping[str, int]],
                  defaults: Mapping[str, Mapping[str, int]]) -> dict:
    """``defaults`` with the thresholds of ``measured`` in place of theirs, one path and codec
    at a time: a fit of some paths or codecs keeps the defaults of the rest (a table without
    them would quantize those at every size, _lookup's 0)."""
    table = {path: dict(row) for path, row in defaults.items()}
    for path, row in measured.items():
        table.setdefault(path, {}).update(row)
    return table


def write_gate(path: Union[str, os.PathLike], **fields) -> None:
    """Write a gate file (what ``SizeGate.load`` reads) with ``fields``: a table
    ("thresholds", "all_reduce") and notes (FILE_INFO). What an existing gate file there holds
    besides them is kept (``kept_fields``): ``python -m moe_flashcomm.tune_gate`` writes the
    all-to-all table, tools/bench_allreduce.py --gate-out the all-reduce one, into the same file."""
    data = kept_fields(path)
    data.update(fields)
    data.setdefault("thresholds", DEFAULT_THRESHOLDS)  # (load needs one)
    SizeGate.from_tables(data, source=os.fspath(path))  # a file load would refuse is not written
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def unique_keys(pairs: list) -> dict:
    """A JSON object's keys, each once (json.load keeps the last of a repeated key silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


class SizeGate:
    """Thresholds ``{path: {codec_key: min bf16 bytes per peer}}``; a ``"*"`` codec key is
    the fallback of its path, else a width the path lacks takes the next wider one's
    (_lookup). ``SizeGate({})`` never gates the all-to-all.

    ``all_reduce``: the all-reduce table (bf16 bytes of the whole tensor); None: the
    defaults (DEFAULT_ALL_REDUCE_THRESHOLDS), ``{}``: never gate the all-reduce."""

    def __init__(self, thresholds: Mapping[str, Mapping[str, int]], source: str = "",
                 all_reduce: Optional[Mapping[str, Mapping[str, int]]] = None) -> None:
        self.thresholds = _check_table(thresholds, "thresholds", source)
        # (a copy of the defaults too: a change to one gate's table stays its own)
        self.all_reduce = _check_table(DEFAULT_ALL_REDUCE_THRESHOLDS if all_reduce is None
                                       else all_reduce, "all_reduce", source)
        self.source = source
        blob = json.dumps(self.thresholds, sort_keys=True)
        if self.all_reduce:
            blob += json.dumps(self.all_reduce, sort_keys=True)
        self.digest = hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()

    # equal tables, equal gates: the default communicators are keyed by the gate, and layers
    # that each coerce the same config must share one per group
    def __eq__(self, other) -> bool:
        return isinstance(other, SizeGate) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def threshold(self, path: str, cfg: CodecConfig) -> int:
        """Bytes (bf16, per peer) below which ``cfg`` on ``path`` falls back to bf16 (0 for
        "bf16" and "native": never)."""
        if not cfg.is_quantized:
            return 0
        return _lookup(self.thresholds.get(path, {}), cfg)

    def all_reduce_threshold(self, path: str, cfg: CodecConfig) -> int:
        """Bytes (bf16, the whole tensor) below which ``moe_flashcomm.all_reduce`` with
        ``cfg`` on ``path`` sums unquantized by the backend instead (NCCL's all_reduce; over
        gloo, framed). "native" always
        does (the values in their own dtype: torch's result, exactly), "bf16" never."""
        if cfg.is_native:
            return NEVER_PAYS
        if cfg.is_passthrough:
            return 0
        return _lookup(self.all_reduce.get(path, {}), cfg)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SizeGate":
        """Read a JSON file written by ``python -m moe_flashcomm.tune_gate``: ``{"thresholds": {...}, ...}``,
        with an optional ``"all_reduce"`` table (tools/bench_allreduce.py --gate-out)."""
        try:
            with open(path) as f:
                data = json.load(f, object_pairs_hook=unique_keys)
        except (OSError, ValueError, RecursionError) as e:
            # (ValueError: not JSON, or not UTF-8 text; RecursionError: nested too deeply)
            tried = os.path.abspath(path)  # a relative path is the working directory's
            where = "" if tried == os.fspath(path) else f" (tried {tried})"
            raise ValueError(f"cannot read size-gate file {os.fspath(path)!r}{where}: {e}") from None
        if not isinstance(data, Mapping) or "thresholds" not in data:
            raise ValueError(f"size-gate file {os.fspath(path)!r} needs a 'thresholds' object")
        return cls.from_tables(data, source=os.fspath(path))

    @classmethod
    def from_tables(cls, data: Mapping[str, Any], source: str = "") -> "SizeGate":
        """A gate from ``{"thresholds": ..., "all_reduce": ...}`` (a gate file's content;
        the descriptive keys FILE_INFO are allowed and ignored, any other key is an error).
        A table left out keeps its defaults; a table given replaces them whole (a path or
        codec it leaves out is quantized at every size, ``_lookup``)."""
        where = f"size gate{' ' + source if source else ''}"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: the tables must be a dict {{\"thresholds\": ..., "
                             f"\"all_reduce\": ...}}, got {type(data).__name__} {data!r}")
        unknown = set(data) - set(TABLES) - set(FILE_INFO)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}; "
                             f"allowed: {', '.join(TABLES + FILE_INFO)}")
        for name in TABLES:  # (null would read as "left out": the defaults)
            if name in data and data[name] is None:
                # (a gate file needs its all-to-all table: load)
                fix = ("leave the key out for the default table" if name == "all_reduce" else
                       "a gate file needs the table (python -m moe_flashcomm.tune_gate writes "
                       "one); in a dict, leave the key out for the default table")
                raise ValueError(f"{where}: '{name}' must be a table (a JSON object), got null; "
                                 f"{fix}")
        notes = {k: data[k] for k in FILE_INFO if data.get(k) is not None}
        bad = {k: v for k, v in notes.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"{where}: the notes {', '.join(map(repr, bad))} must be strings or "
                             f"null (they describe the file; the thresholds are bytes whatever "
                             f"they say), got {bad}")
        thresholds = data.get("thresholds")
        return cls(DEFAULT_THRESHOLDS if thresholds is None else thresholds, source=source,
                   all_reduce=data.get("all_reduce"))

    @classmethod
    def default(cls) -> "SizeGate":
        """The table of ``$MOE_FLASHCOMM_GATE_FILE`` if set, else DEFAULT_THRESHOLDS."""
        path = env.gate_file()
        if not path:  # (a new gate each time: one caller's change to its tables stays its own)
            return cls(DEFAULT_THRESHOLDS, source="defaults")
        try:
            return cls.load(path)  # (read when a communicator or call plan is made)
        except ValueError as e:  # named like every other variable (env.py)
            raise ValueError(f"environment variable MOE_FLASHCOMM_GATE_FILE={path!r}: {e}") from None

    @classmethod
    def coerce(cls, obj: "SizeGate | bool | Mapping[str, Any] | str | None") -> "SizeGate":
        """True/None: the default table; False: never gate; a mapping (thresholds, or
        ``{"thresholds": ..., "all_reduce": ...}``), a file path or a SizeGate."""
        if obj is None or obj is True:
            return cls.default()
        if obj is False:
            return cls({}, source="off", all_reduce={})
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            if "thresholds" in obj or "all_reduce" in obj:
                return cls.from_tables(obj)
            return cls(obj)
        if isinstance(obj, (str, os.PathLike)):
            return cls.load(obj)
        raise TypeError(f"gate must be True, False, a thresholds dict, a file path or a "
                        f"SizeGate, got {type(obj).__name__}")

    def __repr__(self) -> str:
        table = ("" if self.all_reduce == DEFAULT_ALL_REDUCE_THRESHOLDS
                 else f", all_reduce={self.all_reduce!r}")
        return (f"SizeGate({self.thresholds!r}{table}"
                f"{', source=' + repr(self.source) if self.source else ''})")


def wire_gate(cfg: CodecConfig, bf16_bytes: int, threshold: int) -> Optional[CodecConfig]:
    """The codec a pair uses: ``cfg``, or the bf16 passthrough when its bf16 size is under
    ``threshold``."""
    if threshold and bf16_bytes < threshold and cfg.is_quantized:
        return PASSTHROUGH
    return cfg


PASSTHROUGH = CodecConfig(bits="bf16")
STEP_SLACK = 1e-3  # sizes this close count as one measured size step


# A quantized call over NCCL costs the host a few hundred microseconds (encodes, decodes and
# the collective). Where NCCL's bf16 call takes less, back-to-back calls with no GPU work
# between them are bound by that host time and lose however much GPU time they save
# (docs/benchmarks.md, "Small messages").
MIN_NCCL_MS = 0.45


def fit_thresholds(rows, min_nccl_ms: float = MIN_NCCL_MS) -> dict:
    """Thresholds from measurements, ``{path: {codec_key: bytes}}``.

    ``rows``: dicts with ``path``, ``codec`` (a codec_key), ``hidden``, ``pair_bytes``
    (bf16 bytes per peer), ``ms`` (the codec, gate off) and ``nccl_ms`` (NCCL bf16, same
    size). A size pays when the codec is not slower than NCCL bf16 there and NCCL takes at
    least ``min_nccl_ms`` (the quantized call's host time stays hidden), at every
    measurement of it (runs joined by ``--from-bench`` that disagree count as losing). Per path, codec
    and hidden size: the smallest measured size from which the codec pays at every larger
    measured size (``pays``), and the largest size where it does not (``loses``). The
    threshold is the smallest ``pays`` when that is above every ``loses`` (hidden sizes
    differ slightly in bytes per size step), else the largest ``pays``: sizes below it go
    bf16, so between measured sizes the gate errs bf16.
    """
    series: dict = {}  # {(path, codec, hidden): {pair_bytes: pays at every measurement}}
    for r in rows:
        sizes = series.setdefault((r["path"], r["codec"], r["hidden"]), {})
        ok = r["ms"] <= r["nccl_ms"] and r["nccl_ms"] >= min_nccl_ms
        sizes[r["pair_bytes"]] = sizes.get(r["pair_bytes"], True) and ok  # (runs that disagree: loses)
    fits: dict = {}
    for (path, codec, _), sizes in sorted(series.items()):
        pays, loses = NEVER_PAYS, 0
        for pair_bytes, ok in sorted(sizes.items(), reverse=True):
            if not ok:
                loses = pair_bytes
                break
            pays = pair_bytes
        fits.setdefault((path, codec), []).append((pays, loses))
    table: dict = {}
    for (path, codec), fs in fits.items():
        low = min(p for p, _ in fs)
        high = max(p for p, _ in fs)
        if low > max(l for _, l in fs):
            value = low
        elif high >= NEVER_PAYS:  # some hidden size never pays: NEVER_PAYS itself, no slack
            value = NEVER_PAYS
        else:
            # the same size step is a few bytes smaller at one hidden size than at another
            # (256M at hidden 7168: 127.996 MiB per peer, at 4096: 128 MiB): a step counts whole
            value = min(high, int(high * (1 - STEP_SLACK)))
        table.setdefault(path, {})[codec] = value
    return table
