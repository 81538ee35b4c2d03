"""The size gate: its fit rule (DEFAULT_THRESHOLDS, ``python -m moe_flashcomm.tune_gate``) on
made-up timings, the schema of its tables and files, the codecs it never gates, gate files
(SizeGate.load, MOE_FLASHCOMM_GATE_FILE) and the tuner's command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_flashcomm as mf
from moe_flashcomm import CodecConfig
from moe_flashcomm.comm.gate import (DEFAULT_ALL_REDUCE_THRESHOLDS, DEFAULT_THRESHOLDS,
                                     MIN_NCCL_MS, NEVER_PAYS, PASSTHROUGH,
                                     SizeGate, fit_thresholds, wire_gate)
from tests.distributed import spawn

MiB = 1 << 20


def rows(path, codec, points, hidden=4096):
    """points: (MiB per peer, codec ms, NCCL ms)."""
    return [dict(path=path, codec=codec, hidden=hidden, pair_bytes=int(m * MiB), ms=ms, nccl_ms=n)
            for m, ms, n in points]


def test_threshold_is_the_smallest_size_that_pays_from_there_on():
    fit = fit_thresholds(rows("host", "int4", [(1, 0.2, 0.1), (8, 0.5, 0.6), (32, 0.9, 1.5),
                                               (128, 2.0, 6.0)]))
    assert fit == {"host": {"int4": 8 * MiB}}
    # a loss above a win: the win below it does not count
    fit = fit_thresholds(rows("host", "int4", [(8, 0.5, 0.6), (32, 1.6, 1.5), (128, 2.0, 6.0)]))
    assert fit == {"host": {"int4": 128 * MiB}}
    assert fit_thresholds(rows("host", "int8", [(8, 0.7, 0.6)])) == {"host": {"int8": NEVER_PAYS}}


def test_a_size_two_joined_runs_disagree_on_loses():
    """Runs joined by --from-bench, one paying at 8 MiB, the other losing there: 8 MiB loses
    (the gate errs bf16), in either order. The paying row sorted last and was taken, so the
    threshold fell just below the size measured losing."""
    a = rows("host", "int4", [(8, 0.5, 0.6), (32, 0.9, 1.5)])
    b = rows("host", "int4", [(8, 0.7, 0.6), (32, 0.9, 1.5)])
    assert fit_thresholds(a) == {"host": {"int4": 8 * MiB}}
    assert fit_thresholds(a + b) == fit_thresholds(b + a) == {"host": {"int4": 32 * MiB}}


def test_a_codec_that_never_pays_at_one_hidden_size_keeps_never_pays():
    """One hidden size pays from 1 MiB, the other at no size: the threshold is NEVER_PAYS
    itself (the step slack once made it a huge size just below, printed as a size)."""
    fit = fit_thresholds(rows("network", "int4", [(1, 0.5, 1.0), (4, 0.5, 1.0)], hidden=4096)
                         + rows("network", "int4", [(1, 2.0, 1.0), (4, 2.0, 1.0)], hidden=7168))
    assert fit == {"network": {"int4": NEVER_PAYS}}


def test_sizes_where_nccl_is_faster_than_the_quantized_host_time_do_not_pay():
    """GPU time 4x faster, but NCCL's call is shorter than a quantized call's host time:
    back-to-back calls would lose, so the gate keeps bf16 there."""
    points = [(0.5, 0.25, 0.375), (2, 0.45, 1.1), (8, 1.0, 4.3)]
    assert MIN_NCCL_MS > 0.375
    assert fit_thresholds(rows("network", "int8", points)) == {"network": {"int8": 2 * MiB}}
    assert fit_thresholds(rows("network", "int8", points), min_nccl_ms=0) == \
        {"network": {"int8": MiB // 2}}


# ---- the gate's schema ---------------------------------------------------------------------

def _gate_file(tmp_path, data) -> str:
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_gate_file_as_tune_gate_writes_it_loads(tmp_path):
    data = dict(thresholds={"host": {"int4": 1 << 20, "*": 5}}, units="bf16 bytes per peer",
                device="2x H200", date="2026-12-04", source="tools/tune_gate.py",
                all_reduce={"network": {"fp8": 7}})
    gate = SizeGate.load(_gate_file(tmp_path, data))
    assert gate.threshold("host", CodecConfig(bits=4)) == 1 << 20
    assert gate.threshold("host", CodecConfig(bits=8)) == 5
    assert gate.all_reduce_threshold("network", CodecConfig(bits="fp8")) == 7


@pytest.mark.parametrize("data, needle", [
    ({"thresholds": [["host", 5]]}, "thresholds must be a table {path: {codec: bytes}}, got list"),
    ({"thresholds": {"host": [["int4", 5]]}}, "thresholds['host'] must be a table {codec: bytes}, got list"),
    ({"thresholds": {}, "all_reduce": ["host"]}, "all_reduce must be a table"),
    ({"thresholds": {}, "all_reduce": {"host": 5}}, "all_reduce['host'] must be a table"),
    ({"thresholds": {"host": {"int44": 5}}},
     "unknown codec key 'int44' in thresholds['host']; allowed: int2, int3, int4, int5, int6, int7, "
     "int8, fp8, * (bf16 and native are never gated)"),
    ({"thresholds": {"host": {"fp9": 5}}}, "unknown codec key 'fp9'"),
    ({"thresholds": {"host": {"bf16": 5}}}, "unknown codec key 'bf16'"),
    ({"thresholds": {}, "all_reduce": {"network": {"int1": 5}}}, "unknown codec key 'int1' in all_reduce['network']"),
    ({"thresholds": {"hosts": {"int4": 5}}}, "unknown path 'hosts' in thresholds; allowed: "),
    ({"thresholds": {"host": {"int4": 5.0}}}, "thresholds['host']['int4'] must be an int >= 0 (bytes), got 5.0"),
    ({"thresholds": {"host": {"int4": True}}}, "must be an int >= 0"),
    ({"thresholds": {}, "allreduce": {}}, "unknown key(s) 'allreduce'; allowed: thresholds, all_reduce, "
                                          "units, device, date, source"),
    ({"threshold": {}}, "needs a 'thresholds' object"),
    ([1, 2], "needs a 'thresholds' object"),
    # null would have read as "left out": the default table, silently
    ({"thresholds": None}, "'thresholds' must be a table (a JSON object), got null; a gate "
                           "file needs the table (python -m moe_flashcomm.tune_gate writes one)"),
    ({"thresholds": {}, "all_reduce": None}, "'all_reduce' must be a table (a JSON object), got null"),
    # notes describe the file; a number or a list where a sentence goes is a mistake
    ({"thresholds": {}, "units": 5, "device": ["a"]}, "the notes 'units', 'device' must be strings"),
])
def test_a_gate_file_is_checked_against_the_schema(tmp_path, data, needle):
    """Each mistake is a ValueError that names the key (never AttributeError, never ignored)."""
    path = _gate_file(tmp_path, data)
    with pytest.raises(ValueError) as e:
        SizeGate.load(path)
    assert needle in str(e.value) and (path in str(e.value) or "needs" not in needle), str(e.value)
    if isinstance(data, dict) and "thresholds" in data:  # the same tables given as a dict
        with pytest.raises(ValueError) as e:
            SizeGate.coerce(data)
        assert needle in str(e.value), str(e.value)


EVERY_CODEC = [CodecConfig(bits=b) for b in (*range(2, 9), "fp8")]


@pytest.mark.parametrize("table", ["thresholds", "all_reduce"])
def test_every_codec_is_gated_wherever_int4_is(table):
    """The defaults tune some widths only (no int5, int7): every width and fp8 has a
    threshold on every path where int4 has one."""
    gate = SizeGate(DEFAULT_THRESHOLDS)  # (all_reduce: its defaults)
    lookup = gate.threshold if table == "thresholds" else gate.all_reduce_threshold
    paths = [p for p in getattr(gate, table) if lookup(p, INT4)]
    assert len(paths) == 3
    for path in paths:
        assert all(lookup(path, c) > 0 for c in EVERY_CODEC), path


def test_a_missing_width_takes_the_next_wider_ones_threshold():
    """A wider code carries more bytes, so it pays later: a width the row lacks borrows the
    next wider width's threshold (toward bf16). An explicit "*" comes first; a width above the
    widest in the row, and fp8, are not gated."""
    gate = SizeGate({"host": {"int3": 30, "int6": 60}, "network": {"int6": 60, "*": 1}})
    host = [gate.threshold("host", c) for c in EVERY_CODEC]
    assert host == [30, 30, 60, 60, 60, 0, 0, 0]  # int2..int8, fp8
    assert [gate.threshold("network", c) for c in EVERY_CODEC] == [1, 1, 1, 1, 60, 1, 1, 1]


def test_bf16_and_native_are_never_gated_and_native_all_reduces_with_torch():
    gate = SizeGate({"host": {"*": 1 << 40}}, all_reduce={"host": {"*": 0}})
    native, bf16, int4 = CodecConfig(bits="native"), CodecConfig(bits="bf16"), CodecConfig(bits=4)
    assert gate.threshold("host", native) == gate.threshold("host", bf16) == 0
    assert wire_gate(native, 100, 1 << 40) is native
    assert wire_gate(int4, 100, 1 << 40) == PASSTHROUGH
    # the all-reduce: "native" is torch.distributed.all_reduce at every size, gate or not
    for g in (gate, SizeGate.coerce(False)):
        assert g.all_reduce_threshold("host", native) >= 1 << 62
        assert g.all_reduce_threshold("host", bf16) == 0


# ---- gate files: SizeGate.load, MOE_FLASHCOMM_GATE_FILE, python -m moe_flashcomm.tune_gate ------
ROOT = Path(__file__).resolve().parents[1]
INT4 = mf.CodecConfig(bits=4)


def write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_load_reads_both_tables(tmp_path):
    f = write(tmp_path / "gate.json", {"thresholds": {"network": {"int4": 2 * MiB, "*": 5}},
                                       "all_reduce": {"host": {"*": 16 * MiB}}, "device": "x"})
    gate = SizeGate.load(f)
    assert gate.source == f
    assert gate.threshold("network", INT4) == 2 * MiB
    assert gate.threshold("network", mf.CodecConfig(bits=2)) == 5  # the path's "*" fallback
    assert gate.threshold("host", INT4) == 0  # a path the file does not name is never gated
    assert gate.threshold("network", mf.CodecConfig(bits="bf16")) == 0
    assert gate.all_reduce_threshold("host", INT4) == 16 * MiB
    assert gate.all_reduce_threshold("network", INT4) == 0
    # no "all_reduce" section: the all-reduce keeps its defaults
    gate = SizeGate.load(write(tmp_path / "a2a.json", {"thresholds": {}}))
    assert gate.all_reduce_threshold("host", INT4) == 16 * MiB and gate.threshold("nvlink", INT4) == 0


def test_a_gate_owns_its_all_reduce_table():
    """A gate made without an all-reduce table held the module's default table itself: a
    change to one gate's table changed the defaults of every gate made after it. Its repr
    shows a table that is not the default (two unequal gates printed alike)."""
    gate = SizeGate(DEFAULT_THRESHOLDS)
    gate.all_reduce["nvlink"]["int4"] = 1
    assert SizeGate(DEFAULT_THRESHOLDS).all_reduce == DEFAULT_ALL_REDUCE_THRESHOLDS != gate.all_reduce
    assert "all_reduce" not in repr(SizeGate({}))
    assert repr(SizeGate({}, all_reduce={})) == "SizeGate({}, all_reduce={})"


def test_default_gates_are_not_shared():
    """SizeGate.default(), coerce(True) and coerce(False) returned one object each: a change
    to one caller's tables changed every later default gate, which still compared equal (its
    digest was stale)."""
    mine = SizeGate.coerce(True)
    mine.thresholds["nvlink"]["int4"] = 1
    mine.all_reduce["host"]["*"] = 0
    off = SizeGate.coerce(False)
    off.thresholds["cpu"] = {"*": 1 << 40}
    assert SizeGate.default().thresholds == DEFAULT_THRESHOLDS
    assert SizeGate.coerce(None).all_reduce == DEFAULT_ALL_REDUCE_THRESHOLDS
    assert SizeGate.coerce(False).thresholds == {} and SizeGate.coerce(False).all_reduce == {}


def test_nvlink_all_reduce_widths_not_measured_take_the_next_wider_ones():
    """NVLink's all-reduce row ended in "*": never, taken before the next wider width: int3
    never quantized though int2 and int4 pay from 1 GiB."""
    gate = SizeGate(DEFAULT_THRESHOLDS)
    by_bits = {b: gate.all_reduce_threshold("nvlink", CodecConfig(bits=b)) for b in range(2, 9)}
    assert by_bits[3] == by_bits[2] == by_bits[4] == 1 << 30
    assert all(by_bits[b] >= NEVER_PAYS for b in (5, 6, 7, 8))  # int8 never: NCCL stays


def test_tables_given_as_a_dict_keep_the_defaults_of_the_table_left_out():
    only_reduce = SizeGate.coerce({"all_reduce": {"host": {"*": 7}}})
    assert only_reduce.thresholds == DEFAULT_THRESHOLDS  # the all-to-all is still gated
    assert only_reduce.all_reduce_threshold("host", INT4) == 7
    only_a2a = SizeGate.coerce({"thresholds": {"host": {"*": 7}}})
    assert only_a2a.threshold("host", INT4) == 7
    assert only_a2a.all_reduce == SizeGate.default().all_reduce


@pytest.mark.parametrize("content, message", [
    (None, "cannot read size-gate file"),
    ("{not json", "cannot read size-gate file"),
    # nested past the JSON reader's depth: once a bare RecursionError
    ('{"thresholds": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "cannot read size-gate file .*recursion"),
    ({"network": {"int4": 1}}, "needs a 'thresholds' object"),
    ({"thresholds": {"infiniband": {"int4": 1}}},
     "unknown path 'infiniband' in thresholds; allowed: nvlink, host, network, cpu"),
    ({"thresholds": {"host": {"int4": -1}}}, "must be an int >= 0 (bytes), got -1"),
    ({"thresholds": {"host": 4}}, r"thresholds\['host'\] must be a table \{codec: bytes\}, got int 4"),
    # a repeated key: json keeps the last one silently
    ('{"thresholds": {"cpu": {"int4": 1}, "cpu": {"int4": 2}}}',
     "cannot read size-gate file .*: the key 'cpu' appears twice in one object"),
])
def test_load_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "gate.json"
    if content is not None:
        write(path, content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SizeGate.load(path)


def test_gate_file_variable_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_FLASHCOMM_GATE_FILE", raising=False)
    assert SizeGate.default().thresholds == DEFAULT_THRESHOLDS
    f = write(tmp_path / "gate.json", {"thresholds": {"host": {"int4": 7}}})
    monkeypatch.setenv("MOE_FLASHCOMM_GATE_FILE", f)
    assert SizeGate.default().thresholds == {"host": {"int4": 7}}
    assert SizeGate.coerce(True).thresholds == {"host": {"int4": 7}}
    assert SizeGate.coerce(False).threshold("host", INT4) == 0
    write(tmp_path / "gate.json", {"thresholds": {"host": {"int4": 9}}})  # rewritten: re-read
    os.utime(f, ns=(1, 10 ** 18))
    assert SizeGate.default().thresholds == {"host": {"int4": 9}}


def test_gate_file_variable_errors_name_the_variable(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.json")
    bad = write(tmp_path / "bad.json", {"thresholds": {"host": {"int4": "big"}}})
    for path, problem in ((missing, "cannot read size-gate file"),
                          (bad, "thresholds['host']['int4'] must be an int >= 0")):
        monkeypatch.setenv("MOE_FLASHCOMM_GATE_FILE", path)
        with pytest.raises(ValueError) as e:
            SizeGate.coerce(True)
        assert str(e.value).startswith(f"environment variable MOE_FLASHCOMM_GATE_FILE={path!r}: ")
        assert problem in str(e.value)


def test_a_relative_gate_path_that_cannot_be_read_names_the_path_tried(tmp_path, monkeypatch):
    """"cannot read size-gate file 'g.json'" did not say that the working directory was
    searched (not the config file's folder): the absolute path tried is named."""
    monkeypatch.chdir(tmp_path)
    tried = tmp_path / "g.json"
    with pytest.raises(ValueError) as e:
        SizeGate.load("g.json")
    assert str(e.value).startswith(f"cannot read size-gate file 'g.json' (tried {tried}): ")
    monkeypatch.setenv("MOE_FLASHCOMM_GATE_FILE", "g.json")
    with pytest.raises(ValueError) as e:
        SizeGate.coerce(True)
    assert f"cannot read size-gate file 'g.json' (tried {tried}): " in str(e.value)
    with pytest.raises(ValueError) as e:  # an absolute path: named once
        SizeGate.load(tried)
    assert str(e.value).startswith(f"cannot read size-gate file '{tried}': ")


def _gate_file_run(rank, world):
    """On gloo the link is "cpu", which the default table never gates: with a gate file that
    gates "cpu" up to 1 MiB per peer, int4 rows arrive exactly (sent as bf16), and with
    gate=False they arrive quantized."""
    x = torch.randn(8 * world, 64, generator=torch.Generator().manual_seed(rank)).bfloat16()
    gated = mf.all_to_all(x, codec=INT4)
    quantized = mf.all_to_all(x, codec=INT4, gate=False)
    sent = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(sent, x)
    want = torch.cat([s[8 * rank:8 * (rank + 1)] for s in sent])
    assert torch.equal(gated, want)
    assert not torch.equal(quantized, want)


def test_gate_file_variable_gates_an_all_to_all(tmp_path):
    f = write(tmp_path / "gate.json", {"thresholds": {"cpu": {"int4": MiB}}})
    spawn(_gate_file_run, 2, env={"MOE_FLASHCOMM_GATE_FILE": f})


def test_tune_gate_fits_a_stored_benchmark_and_the_file_loads(tmp_path):
    """``python -m moe_flashcomm.tune_gate --from-bench``: a bench_all2all JSON in, a gate
    file out that SizeGate.load reads, with the fit rule's thresholds."""
    rows = []
    for mib, int4_ms, nccl_ms in ((1, 0.5, 0.3), (8, 0.5, 0.9), (32, 1.0, 3.0)):
        tokens = mib * MiB * 2 // (2 * 4096)  # two ranks: half the rows go to the peer
        base = dict(path="host", hidden=4096, tokens=tokens, pair_bytes=mib * MiB)
        rows += [dict(base, variant="nccl", ms=nccl_ms),
                 dict(base, variant="int4", codec="int4", ms=int4_ms, nccl_ms=nccl_ms)]
    bench = write(tmp_path / "bench.json", {"rows": rows, "meta": {"device": "test", "date": "d"}})
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "moe_flashcomm.tune_gate", "--from-bench", bench,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "host: int4 8M" in proc.stdout
    # the paths and codecs not measured keep the defaults
    assert SizeGate.load(out).thresholds == dict(DEFAULT_THRESHOLDS, host=dict(DEFAULT_THRESHOLDS["host"],
                                                                           int4=8 * MiB))


def test_tune_gate_measures_on_cpu(tmp_path):
    """The measuring path end to end on 2 gloo processes (timings meaningless on CPU)."""
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "moe_flashcomm.tune_gate", "--cpu-dry-run",
                           "--paths", "network", "--hidden", "64", "--codecs", "int4",
                           "--sizes", "4K,64K", "--budget", "0.02", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    thresholds = SizeGate.load(out).thresholds
    assert "network: int4" in proc.stdout and thresholds["host"] == DEFAULT_THRESHOLDS["host"]


def test_a_gate_file_that_is_not_text_names_the_file(tmp_path, monkeypatch):
    """Bytes that are not UTF-8 (a binary file given by mistake) once raised a bare
    UnicodeDecodeError naming neither the file nor what was being read."""
    path = tmp_path / "gate.json"
    path.write_bytes(b"\xff\xfe\x00 not a gate file")
    with pytest.raises(ValueError, match=f"cannot read size-gate file {str(path)!r}: 'utf-8' codec"):
        SizeGate.load(path)
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    with pytest.raises(ConfigError, match="FlashCommConfig.gate: cannot read size-gate file"):
        FlashCommConfig(gate=str(path))


def test_write_gate_refuses_what_load_would_refuse(tmp_path):
    """write_gate once wrote any table and any key; the mistake surfaced only when a job
    later loaded the file. The file (and what it held before) is left as it was."""
    from moe_flashcomm.comm.gate import write_gate
    path = tmp_path / "gate.json"
    write_gate(path, thresholds={"host": {"int4": 5}}, device="x")
    before = path.read_bytes()
    for fields, needle in (({"thresholds": {"hosts": {"int4": 1}}}, "unknown path 'hosts'"),
                           ({"all_reduce": {"host": {"int4": 1.5}}}, "must be an int >= 0"),
                           ({"notes": "x"}, "unknown key(s) 'notes'")):
        with pytest.raises(ValueError) as e:
            write_gate(path, **fields)
        assert needle in str(e.value) and str(path) in str(e.value)
        assert path.read_bytes() == before
    assert SizeGate.load(path).thresholds == {"host": {"int4": 5}}


@pytest.mark.parametrize("bad", [[1, 2], "thresholds"])
def test_from_tables_needs_a_dict(bad):
    """A list or a string once reported its items or characters as unknown keys."""
    with pytest.raises(ValueError, match=r"size gate: the tables must be a dict \{\"thresholds\": "
                                         r"\.\.\., \"all_reduce\": \.\.\.\}, got " + type(bad).__name__):
        SizeGate.from_tables(bad)
