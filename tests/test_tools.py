"""The benchmark tools in tools/ and the tuner's command (python -m moe_flashcomm.tune_gate) on
CPU: a bad argument ends with exit status 2 and a line naming the option before any long
work, GPU-only tools say they need a GPU, stored runs replot, and the shipped size-gate
defaults are what the documented command fits from the stored sweeps."""
import argparse
import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moe_flashcomm import SizeGate
from moe_flashcomm.comm import gate as gate_mod
from moe_flashcomm.comm.gate import DEFAULT_ALL_REDUCE_THRESHOLDS, DEFAULT_THRESHOLDS
from moe_flashcomm import tune_gate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
sys.path.insert(0, str(ROOT / "tools"))

import a2a_model  # noqa: E402
import bench_all2all  # noqa: E402
import bench_allreduce  # noqa: E402
import bench_codec  # noqa: E402
import bench_frame  # noqa: E402
import bench_host  # noqa: E402
import bench_small  # noqa: E402
import bench_stamps  # noqa: E402
import codec_error  # noqa: E402
import ncu_codec  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
MiB = 1 << 20


def run_tool(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def usage_error(capsys, monkeypatch, module, *argv) -> str:
    """Run ``module.main()`` with ``argv``; it must exit with status 2. Its last stderr line."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---- 1: the shipped defaults are the documented command's fit -------------------------------

def test_default_thresholds_are_what_the_documented_command_fits(tmp_path):
    """gate.py's comment names the command behind DEFAULT_THRESHOLDS; run it (on the stored
    sweeps, no GPU) and compare its literal with the table."""
    source = Path(gate_mod.__file__).read_text()
    assert "--from-bench docs/data/bench_all2all*.json" in source
    benches = sorted(DATA.glob("bench_all2all*.json"))
    assert len(benches) >= 2
    proc = run_tool("-m", "moe_flashcomm.tune_gate", "--from-bench", *benches, "--python",
                    cwd=tmp_path)  # (its default --out, gate.json, lands in tmp_path)
    assert proc.returncode == 0, proc.stderr
    literal = ast.literal_eval(proc.stdout.split("DEFAULT_THRESHOLDS = ", 1)[1])
    assert literal == DEFAULT_THRESHOLDS
    assert SizeGate.load(tmp_path / "gate.json").thresholds == DEFAULT_THRESHOLDS


# ---- 5, 9: tune_gate's inputs, --out, and "never" ---------------------------------------------

@pytest.mark.parametrize("content, lacks", [
    (None, "lack hidden, pair_bytes"),  # an all-reduce benchmark (docs/data/bench_allreduce.json)
    ({"thresholds": {"host": {"int4": 1}}}, 'no "rows" list'),  # a gate file
    ([1, 2], 'no "rows" list'),
    ({"rows": []}, "no always-quantized all-to-all rows"),
])
def test_from_bench_names_the_file_and_what_it_lacks(tmp_path, capsys, monkeypatch, content, lacks):
    bench = tmp_path / "in.json"
    if content is None:
        shutil.copy(DATA / "bench_allreduce.json", bench)
    else:
        bench.write_text(json.dumps(content))
    line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench,
                       "--out", tmp_path / "gate.json")
    assert f"--from-bench {bench}" in line and lacks in line
    assert "not a tools/bench_all2all.py JSON" in line
    assert not (tmp_path / "gate.json").exists()


def test_a_dry_runs_bench_is_fitted_into_no_gate_and_no_link_model(tmp_path, capsys, monkeypatch):
    """bench_all2all.py --cpu-dry-run's JSON made a gate of its meaningless timings (every
    threshold "never": all bf16 on GPUs), with only a note; a2a_model.py fitted a negative
    bandwidth from it."""
    data = json.loads((DATA / "bench_all2all_network_2x1.json").read_text())
    data["meta"]["device"] = "cpu (dry run)"  # as bench_all2all.py --cpu-dry-run writes it
    bench = tmp_path / "bench_all2all.json"
    bench.write_text(json.dumps(data))
    line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench, "--out", tmp_path / "g.json")
    assert line.endswith(f"--from-bench {bench} is a dry run (device 'cpu (dry run)'): its timings "
                         "are meaningless, nothing to fit; run the benchmark on 2 GPUs")
    assert not (tmp_path / "g.json").exists()
    line = usage_error(capsys, monkeypatch, a2a_model, "--bench-json", bench, "--out", tmp_path / "a.json")
    assert line.endswith(f"--bench-json {bench} is a dry run (device 'cpu (dry run)'): its timings "
                         "are meaningless, nothing to fit; run the benchmark on 2 GPUs")
    assert not (tmp_path / "a.json").exists()


def test_tune_gate_checks_out_and_arguments_first(tmp_path, capsys, monkeypatch):
    bench = DATA / "bench_all2all_network_2x1.json"
    line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench, "--out", tmp_path)
    assert line.endswith(f"--out: {tmp_path} is a directory")
    (tmp_path / "file").write_text("")
    line = usage_error(capsys, monkeypatch, tune_gate, "--out", tmp_path / "file" / "gate.json")
    assert line.endswith(f"--out: {tmp_path / 'file'} is not a directory")
    line = usage_error(capsys, monkeypatch, tune_gate, "--hidden", "a")
    assert "argument --hidden: expected an int >= 1, got 'a'" in line
    line = usage_error(capsys, monkeypatch, tune_gate, "--sizes", "1X")
    assert "argument --sizes: size '1X'" in line
    # a missing folder is made
    tune_gate.main(["--from-bench", str(bench), "--out", str(tmp_path / "new" / "gate.json")])
    assert SizeGate.load(tmp_path / "new" / "gate.json").thresholds
    # the default ./gate.json is checked as early (it was checked only when given by name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gate.json").mkdir()
    line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench)
    assert line.endswith("--out: gate.json is a directory")
    # a table the existing file keeps, which a load would refuse, is named before measuring
    # (it failed in write_gate, after the measurements, with a traceback)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": {}, "all_reduce": {"hosts": {"*": 1}}}))
    line = usage_error(capsys, monkeypatch, tune_gate, "--sizes", "1X", "--out", bad)
    assert "argument --sizes" in line  # (arguments first)
    line = usage_error(capsys, monkeypatch, tune_gate, "--out", bad)
    assert f"--out: size gate {bad} (kept when it is written again): unknown path 'hosts'" in line
    line = usage_error(capsys, monkeypatch, bench_allreduce, "--gate-out", bad, "--out", tmp_path / "o")
    assert f"--gate-out: size gate {bad} (kept when it is written again)" in line
    assert json.loads(bad.read_text())["all_reduce"] == {"hosts": {"*": 1}}  # left as it was


def _bench_rows(codec_ms: float, nccl_ms: float) -> list:
    """One run's rows of one point (network, hidden 4096, 2 MiB per peer)."""
    base = dict(path="network", hidden=4096, tokens=512, pair_bytes=2 << 20)
    return [dict(base, variant="nccl", ms=nccl_ms), dict(base, variant="int4", codec="int4", ms=codec_ms)]


def test_joined_runs_are_each_compared_with_their_own_nccl(tmp_path):
    """--from-bench a b: rows without nccl_ms took the NCCL time of the point from whichever
    file came last, so two runs that each pay gave "never" in one order (helper 62)."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": _bench_rows(1.0, 1.2)}))
    b.write_text(json.dumps({"rows": _bench_rows(0.5, 0.6)}))
    for order in ((a, b), (b, a)):
        out = tmp_path / "gate.json"
        out.unlink(missing_ok=True)
        tune_gate.main(["--from-bench", *map(str, order), "--out", str(out)])
        assert SizeGate.load(out).thresholds["network"]["int4"] == 2 << 20, order


def test_a_dry_runs_thresholds_are_not_kept(tmp_path):
    """Thresholds kept from the --out file of a dry run went on under the new run's device."""
    out = tmp_path / "gate.json"
    out.write_text(json.dumps({"thresholds": {"host": {"int4": 1}}, "device": "cpu (dry run)"}))
    tune_gate.main(["--from-bench", str(DATA / "bench_all2all_network_2x1.json"), "--out", str(out)])
    assert SizeGate.load(out).thresholds["host"] == DEFAULT_THRESHOLDS["host"]


def test_a_file_that_is_no_gate_file_is_not_written_over(tmp_path, capsys, monkeypatch):
    """--out onto a DeepSpeed config (or any other file) replaced it with a gate file."""
    bench = DATA / "bench_all2all_network_2x1.json"
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "moe_flashcomm": {}}))
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    for path, what in ((ds, "has the keys ['moe_flashcomm', 'train_batch_size']"),
                       (text, "is not a JSON object")):
        line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench, "--out", path)
        assert f"--out: {path} exists and {what}: not a gate file to write over" in line
    assert json.loads(ds.read_text())["train_batch_size"] == 8 and text.read_text() == "my notes"
    empty = tmp_path / "empty.json"
    empty.write_text("")  # (an empty file is written: mkstemp's, for one)
    tune_gate.main(["--from-bench", str(bench), "--out", str(empty)])
    assert SizeGate.load(empty).thresholds


def test_link_emulation_sets_both_variables(monkeypatch):
    """A shell exporting NCCL_P2P_DISABLE=1 turned the "nvlink" workers into host or network
    ones under the nvlink name (the emulation only added variables)."""
    from moe_flashcomm.comm.topology import intra_node_path
    for path, variables in tune_gate.LINK_EMULATION.items():
        monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
        monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
        for k, v in variables.items():
            monkeypatch.setenv(k, v)
        assert intra_node_path("cuda") == path


def test_repeated_list_items_count_once():
    assert tune_gate.PATHS_ARG("nvlink,host-memory,host,nvlink") == ["nvlink", "host"]
    assert tune_gate.SIZES_ARG("1M,1024K,64K") == [1 << 20, 64 << 10]


def test_tune_gate_prints_never_for_a_codec_that_never_pays(tmp_path, capsys):
    """One hidden size pays, the other never: the file holds NEVER_PAYS, the line "never"."""
    rows = []
    for hidden, int4_ms in ((4096, 0.5), (7168, 2.0)):
        for tokens in (256, 1024):
            base = dict(path="network", hidden=hidden, tokens=tokens,
                        pair_bytes=tokens // 2 * hidden * 2)
            rows += [dict(base, variant="nccl", ms=1.0),
                     dict(base, variant="int4", codec="int4", ms=int4_ms, nccl_ms=1.0)]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": rows}))
    tune_gate.main(["--from-bench", str(bench), "--out", str(tmp_path / "gate.json")])
    assert "network: int4 never" in capsys.readouterr().out
    assert SizeGate.load(tmp_path / "gate.json").thresholds["network"]["int4"] == gate_mod.NEVER_PAYS


def test_gate_files_keep_the_other_table(tmp_path, capsys):
    """tune_gate --out onto a gate file keeps its all_reduce table; bench_allreduce.py
    --gate-out onto one keeps its all-to-all thresholds and notes (one merge: write_gate)."""
    out = tmp_path / "gate.json"
    out.write_text(json.dumps({"thresholds": {"host": {"int4": 5}}, "all_reduce": {"host": {"*": 7}},
                               "units": "old"}))
    tune_gate.main(["--from-bench", str(DATA / "bench_all2all_network_2x1.json"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["all_reduce"] == {"host": {"*": 7}}
    # not measured: the file's own threshold, else the defaults (a class tuned at a time)
    assert data["thresholds"]["host"] == dict(DEFAULT_THRESHOLDS["host"], int4=5)
    assert data["units"] == "bf16 bytes per peer"
    bench_allreduce.write_all_reduce_gate(out, {"network": {"int4": 9}})
    kept = json.loads(out.read_text())
    assert kept["thresholds"] == data["thresholds"] and kept["units"] == data["units"]
    assert kept["all_reduce"] == dict(DEFAULT_ALL_REDUCE_THRESHOLDS,
                                      network=dict(DEFAULT_ALL_REDUCE_THRESHOLDS["network"], int4=9))
    SizeGate.load(out)
    fresh = tmp_path / "fresh.json"  # no file yet: the all-to-all defaults beside it
    bench_allreduce.write_all_reduce_gate(fresh, {})
    assert SizeGate.load(fresh).thresholds == DEFAULT_THRESHOLDS


def test_all_reduce_gate_of_a_run_of_some_codecs_keeps_the_others_defaults(tmp_path, capsys):
    """bench_allreduce.py --codecs int4 --gate-out (the stored pairs runs): the measured path's
    row kept only int4, so int8 and fp8 all-reduces there were quantized at every size (no
    "*" left: threshold 0) instead of below the default 16 MiB / 4 MiB."""
    rows = json.loads((DATA / "bench_allreduce_pairs_gather.json").read_text())["rows"]
    table = bench_allreduce.fitted_gate(rows)
    assert set(table) == {"host", "network"} and all(set(r) == {"int4"} for r in table.values())
    bench_allreduce.write_all_reduce_gate(tmp_path / "gate.json", table)
    gate = SizeGate.load(tmp_path / "gate.json")
    default = SizeGate({})
    for path in ("host", "network"):
        assert gate.all_reduce_threshold(path, tune_gate.bench_codec("int4")) == table[path]["int4"]
        for codec in ("int8", "fp8", "int2"):
            cfg = tune_gate.bench_codec(codec)
            assert gate.all_reduce_threshold(path, cfg) == default.all_reduce_threshold(path, cfg) > 0


def test_a_gate_fitted_on_some_codecs_and_paths_keeps_the_defaults_of_the_rest(tmp_path, capsys,
                                                                             monkeypatch):
    """tune_gate --codecs int4 --paths network (here: a stored run of int4 on network) wrote
    only that cell: every other codec and path was then quantized at every size (threshold
    0) by a job loading the file."""
    rows = json.loads((DATA / "bench_all2all_network_2x1.json").read_text())["rows"]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [r for r in rows if r.get("codec") in (None, "int4")]}))
    tune_gate.main(["--from-bench", str(bench), "--out", str(tmp_path / "gate.json")])
    assert "not measured, the defaults kept: nvlink, host, network fp8" in capsys.readouterr().out
    fitted = tune_gate.fit_from_rows(json.loads(bench.read_text())["rows"])
    assert set(fitted) == {"network"} and set(fitted["network"]) == {"int4"}
    gate, default = SizeGate.load(tmp_path / "gate.json"), SizeGate(DEFAULT_THRESHOLDS)
    for path in ("nvlink", "host", "network"):
        for codec in ("int8", "fp8", "int4", "int2"):
            cfg = tune_gate.bench_codec(codec)
            want = fitted[path][codec] if (path, codec) == ("network", "int4") else default.threshold(path, cfg)
            assert gate.threshold(path, cfg) == want > 0, (path, codec)
    # the measuring options are refused with --from-bench, which fits the runs as measured;
    # --cpu-dry-run with it wrote ./gate.json
    monkeypatch.chdir(tmp_path)
    for option, value in (("--cpu-dry-run", None), ("--codecs", "int4"), ("--paths", "host")):
        (tmp_path / "gate.json").unlink(missing_ok=True)
        line = usage_error(capsys, monkeypatch, tune_gate, "--from-bench", bench, option,
                           *([value] if value else []))
        assert f"{option}: not with --from-bench" in line
        assert not (tmp_path / "gate.json").exists()


def test_bench_allreduce_reports_and_replots_a_run_of_chunk_counts_without_auto(tmp_path, capsys,
                                                                              monkeypatch):
    """--chunks 1,2 (no auto): no always-quantized time at the default chunking, and the
    report and --plot ended in KeyError: 'raw' after the run."""
    rows = []
    for size in (1 * MiB, 4 * MiB):
        rows.append(dict(path="network", size_bytes=size, variant="nccl", ms=1.0))
        rows += [dict(path="network", size_bytes=size, variant=f"int4/chunks={k}", ms=0.5,
                      codec="int4", chunks=k, nccl_ms=1.0) for k in (1, 2)]
        rows.append(dict(path="network", size_bytes=size, variant="int4+gate", ms=0.6, codec="int4",
                         gated=True, nccl_ms=1.0))
    result = tmp_path / "bench_allreduce.json"
    result.write_text(json.dumps({"rows": rows, "fitted_gate": {}, "meta": {"device": "cpu (gloo)"}}))
    bench_allreduce.main(["--plot", str(result)])
    out = capsys.readouterr().out
    assert "1.67 (    -)" in out and "int4/chunks=2: 0.500 ms" in out
    assert bench_allreduce.fitted_gate(rows) == {}
    line = usage_error(capsys, monkeypatch, bench_allreduce, "--chunks", "1,2", "--gate-out",
                       tmp_path / "gate.json", "--out", tmp_path / "out")
    assert "--gate-out: the fit needs the library's chunking: add auto to --chunks" in line


def test_bench_stamps_default_command_has_layouts_for_every_codec(capsys, monkeypatch):
    """The documented default (16-bit tokens) timed the bf16 codec's all-to-all, whose tokens
    travel as they are: an AssertionError at its first size, nothing written. The layouts are
    built before any CUDA call, so they are checked here on CPU."""
    for argv in ([], ["--dtype", "fp32"], ["--op", "all_reduce"]):
        a = bench_stamps.parse_args(argv)
        assert ("bf16" in a.codecs) == (argv != []), argv
        if a.op == "all_to_all":
            x = torch.zeros(8, bench_stamps.H, dtype=bench_stamps.DTYPES[a.dtype])
            for codec in a.codecs:
                bench_stamps._sides(x, 8, bench_stamps.CODECS[codec], 1, False, {})
    line = usage_error(capsys, monkeypatch, bench_stamps, "--codecs", "int4", "bf16")
    assert "--codecs bf16: with --dtype bf16 the all-to-all sends the tokens as they are" in line


def test_bench_all2all_quick_keeps_the_given_hidden_size(capsys, monkeypatch):
    """--quick --hidden 4096 timed hidden 7168 (--sizes won over --quick, --hidden did not);
    --refit without --plot did nothing."""
    def config(*argv):
        return bench_all2all.run_config(bench_all2all.parser().parse_args(argv))
    assert config("--quick", "--hidden", "4096")["hiddens"] == [4096]
    quick = config("--quick")
    assert quick["hiddens"] == [7168] and quick["sizes"] == list(map(tune_gate.parse_size,
                                                                     bench_all2all.QUICK_SIZES))
    assert config()["hiddens"] == [4096, 7168]
    assert "--refit: only with --plot" in usage_error(capsys, monkeypatch, bench_all2all, "--refit")


def test_bench_allreduce_dry_run_checks_no_targets_and_fits_no_gate(tmp_path, capsys, monkeypatch):
    """--device cpu printed the 2x H200 targets as ok / MISSED and --gate-out wrote the
    default tables as if fitted."""
    result = json.loads((DATA / "bench_allreduce.json").read_text())
    assert "over NCCL bf16" in bench_allreduce.report(result)  # a GPU run: checked
    result["meta"]["device"] = "cpu (gloo)"
    text = bench_allreduce.report(result)
    assert "targets (2x H200): not checked on a dry run" in text
    assert "over NCCL bf16" not in text and "MISSED" not in text and ": ok" not in text
    line = usage_error(capsys, monkeypatch, bench_allreduce, "--device", "cpu", "--gate-out",
                       tmp_path / "gate.json", "--out", tmp_path / "out")
    assert "--gate-out: a dry run (--device cpu) fits no gate" in line
    assert not (tmp_path / "gate.json").exists() and not (tmp_path / "out").exists()


def test_bench_small_dry_run_prints_no_verdicts(tmp_path, capsys):
    """--cpu-dry-run ended with "> 5% slower" for every path, a verdict on gloo's timings."""
    result = json.loads((DATA / "bench_small.json").read_text())
    slow = dict(next(r for r in result["rows"] if r["variant"] != "nccl"), ms=1e3)  # 5% and more
    result["rows"].append(slow)
    bench = tmp_path / "bench_small.json"
    bench.write_text(json.dumps(result))
    bench_small.main(["--plot", str(bench)])  # a GPU run: checked
    text = capsys.readouterr().out
    assert "(>= 0.952 is within 5%):" in text and "> 5% slower" in text
    result["meta"]["device"] = "cpu (dry run)"  # as --cpu-dry-run writes it
    bench.write_text(json.dumps(result))
    bench_small.main(["--plot", str(bench)])
    text = capsys.readouterr().out
    assert "worst NCCL/ours per path and regime: not checked on a dry run" in text
    assert "within 5%" not in text and "> 5% slower" not in text


# ---- 2, 3: replots of stored runs --------------------------------------------------------------

def test_bench_all2all_replots_with_a_refitted_gate(tmp_path, capsys):
    """--refit may send as bf16 sizes the run never timed gated: the bf16 codec's time at that
    point stands in, marked "~" (it raised KeyError)."""
    bench = tmp_path / "bench_all2all.json"
    shutil.copy(DATA / "bench_all2all.json", bench)
    bench_all2all.main(["--plot", str(bench), "--refit"])
    out = capsys.readouterr().out
    assert "the bf16 codec's time stands in" in out and re.search(r"\d~\(", out)
    assert (tmp_path / "bench_all2all.png").is_file()
    result = json.loads(bench.read_text())
    rows = bench_all2all.library_rows(result["rows"], tune_gate.fit_from_rows(result["rows"]))
    bf16 = {(r["path"], r["hidden"], r["size_bytes"]): r["raw_ms"] for r in rows if r["codec"] == "bf16"}
    untimed = [r for r in rows if r["untimed"]]
    assert untimed and all(r["ms"] == bf16[(r["path"], r["hidden"], r["size_bytes"])]
                           for r in untimed)


def test_bench_all2all_fits_its_gate_on_the_flat_calls_only():
    """--algorithms flat hierarchical: the hierarchical timings joined the flat ones in the
    run's fitted gate (gate.json, the sizes its table marks *), so a size where only the hierarchical
    call lost went bf16 (here: 4 MiB x 0.999 instead of 1 MiB); the fit is tune_gate's on the
    run's JSON."""
    rows = []
    for mib, nccl_ms, flat_ms, hier_ms in ((1, 1.0, 0.5, 2.0), (4, 4.0, 2.0, 5.0),
                                           (16, 16.0, 8.0, 4.0)):
        base = dict(path="network", hidden=4096, tokens=mib * MiB // 4096, size_bytes=mib * MiB * 2,
                    pair_bytes=mib * MiB)
        rows += [dict(base, variant="nccl", ms=nccl_ms),
                 dict(base, variant="bf16", codec="bf16", ms=nccl_ms, nccl_ms=nccl_ms),
                 dict(base, variant="int4", codec="int4", ms=flat_ms, nccl_ms=nccl_ms),
                 dict(base, variant="int4/hierarchical", codec="int4", algorithm="hierarchical",
                      ms=hier_ms, nccl_ms=nccl_ms)]
    assert bench_all2all.fitted_gate(rows) == tune_gate.fit_from_rows(rows) == \
        {"network": {"int4": MiB}}
    assert bench_all2all.fitted_gate([r for r in rows if r.get("codec") != "int4"]) == {}


def test_every_stored_bench_host_run_replots(tmp_path):
    """Runs recorded before meta had "launcher" (most of them) plot too."""
    files = sorted(DATA.glob("bench_host*.json"))
    assert len(files) >= 10
    for f in files:
        png = tmp_path / f.with_suffix(".png").name
        bench_host.plot(json.loads(f.read_text()), png)
        assert png.is_file(), f


def test_codec_error_plots_and_labels_the_groups_it_ran(tmp_path, monkeypatch, capsys):
    """--groups 32: the int2..8 lines were drawn at group 128 (empty) and labelled "g128",
    the fp8 marker "g32..256"."""
    plt = pytest.importorskip("matplotlib.pyplot")
    monkeypatch.setattr(sys, "argv", ["codec_error.py", "--groups", "32", "--tokens", "4",
                                      "--hidden", "256", "--out", str(tmp_path / "e.json")])
    codec_error.main()
    assert (tmp_path / "e.png").is_file()
    for ax in plt.gcf().axes:  # (the figure just saved)
        lines = {line.get_label(): len(line.get_xdata()) for line in ax.get_lines()}
        assert lines == {"int2..8 g32 spikes on": 7, "int2..8 g32 spikes off": 7, "fp8 (g32)": 1}
    plt.close("all")


# ---- 4: GPU-only tools on a machine without one ----------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("tool", ["bench_codec.py", "bench_stamps.py", "ncu_codec.py", "bench_host.py"])
def test_gpu_only_tools_say_they_need_a_gpu(tmp_path, tool):
    args = ["--out", tmp_path / "x.json"] if tool != "ncu_codec.py" else []
    proc = run_tool(ROOT / "tools" / tool, *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{tool}: needs a CUDA GPU, found 0"


# ---- 6, 7, 8: arguments checked up front -------------------------------------------------------

@pytest.mark.parametrize("module, argv, says", [
    (a2a_model, ["--codecs", "int8"], "argument --codecs: 'int8' is not one of bf16, int4"),
    (a2a_model, ["--topologies", "2"], "argument --topologies: topology '2': expected NODESxGPUS"),
    (a2a_model, ["--topologies", "0x8"], "argument --topologies: topology '0x8'"),
    (a2a_model, ["--inter-gbps", "0"], "argument --inter-gbps: expected a number > 0, got '0'"),
    (a2a_model, ["--bench-json", "nope.json"], "--bench-json nope.json: cannot read it"),
    (a2a_model, ["--bench-json", DATA / "accuracy.json"], "not a tools/bench_all2all.py JSON"),
    (bench_allreduce, ["--gate", "nope.json", "--device", "cpu"],
     "--gate: cannot read size-gate file 'nope.json'"),
    (bench_allreduce, ["--gate", DATA / "accuracy.json", "--device", "cpu"], "needs a 'thresholds'"),
    (codec_error, ["--groups", "100"], "argument --groups: invalid choice: 100"),
    (codec_error, ["--tokens", "0"], "argument --tokens: expected an int >= 1, got '0'"),
    (codec_error, ["--hidden", "3"], "--hidden: expected an int >= 4"),
    (bench_all2all, ["--paths", "foo"], "argument --paths: 'foo' is not one of nvlink, host, network"),
    (bench_all2all, ["--codecs", "int9"], "argument --codecs: 'int9' is not one of"),
    (bench_all2all, ["--sizes", "1X"], "argument --sizes: size '1X'"),
    (bench_all2all, ["--hidden", "x"], "argument --hidden: expected an int >= 1, got 'x'"),
    (bench_all2all, ["--chunk-sweep", "1M"], "--chunk-sweep: '1M': not 4 fields; expected SIZE:HIDDEN"),
    (bench_all2all, ["--chunk-sweep", "1M:64:int4:x"], "expected an int >= 1, got 'x'"),
    (bench_small, ["--a2a-codecs", "int9"], "argument --a2a-codecs: 'int9' is not one of"),
    (bench_small, ["--sizes", "1X"], "argument --sizes: size '1X'"),
    (bench_small, ["--hidden", "x"], "argument --hidden: expected an int >= 1"),
    (bench_allreduce, ["--codecs", "int9"], "argument --codecs: 'int9' is not one of"),
    (bench_allreduce, ["--sizes", "1X"], "argument --sizes: size '1X'"),
    (bench_allreduce, ["--chunks", "x"], "argument --chunks: expected an int >= 1, got 'x'"),
    (bench_host, ["--sizes", "1X"], "argument --sizes: size '1X'"),
    (bench_frame, ["--reps", "0"], "argument --reps: expected an int >= 1, got '0'"),
    (bench_frame, ["--port", "99999"], "argument --port: expected a port 1..65535, got '99999'"),
    (bench_frame, ["--port", "0"], "argument --port: expected a port 1..65535, got '0'"),
    # GPU-only tools: checked before "needs a CUDA GPU" (they raised in the run, or divided by 0)
    (bench_codec, ["--out", "x.json", "--bits", "9"], "argument --bits: invalid choice: '9'"),
    (bench_codec, ["--out", "x.json", "--group", "100"], "argument --group: invalid choice: 100"),
    (bench_codec, ["--out", "x.json", "--sizes", "0"], "argument --sizes: expected a number > 0"),
    (bench_codec, ["--out", "x.json", "--sizes", "1e-7"], "--sizes: 1e-07 MiB is less than one bf16 value"),
    (bench_codec, ["--out", "x.json", "--replays", "0"], "argument --replays: expected an int >= 1"),
    (bench_stamps, ["--world", "0"], "argument --world: expected an int >= 1, got '0'"),
    (bench_stamps, ["--world", "1"], "--world: expected an int >= 2 (rank 0 and its peers), got 1"),
    (bench_stamps, ["--sizes", "0"], "argument --sizes: expected an int >= 1, got '0'"),
    (ncu_codec, ["--size", "0"], "argument --size: expected an int >= 1, got '0'"),
    (ncu_codec, ["--size", "1", "--hidden", "1048576"], "--hidden 1048576: more values than --size 1 MiB"),
])
def test_a_bad_argument_names_the_option(capsys, monkeypatch, module, argv, says):
    assert says in usage_error(capsys, monkeypatch, module, *argv)


@pytest.mark.parametrize("module", [tune_gate, bench_all2all, bench_small, bench_allreduce])
def test_paths_take_host_memory_for_host(capsys, monkeypatch, module):
    """The docs, tools/gpu_suite.sh and bench_moe_inference.py --path say host-memory; --paths
    refused it ("'host-memory' is not one of nvlink, host, network"). Here --paths passes and
    the next option's mistake is the one named."""
    line = usage_error(capsys, monkeypatch, module, "--paths", "nvlink,host-memory", "--sizes", "1X")
    assert "argument --sizes: size '1X'" in line
    line = usage_error(capsys, monkeypatch, module, "--paths", "hostmemory")
    assert line.endswith("argument --paths: 'hostmemory' is not one of nvlink, host, network "
                         "(or host-memory for host)")
    assert bench_all2all.parser().parse_args(["--paths", "host-memory,network"]).paths == \
        ["host", "network"]


def test_a2a_model_says_where_its_link_model_comes_from(tmp_path, capsys):
    """With no link option the defaults were labelled "command-line values" (the us -> s
    round trip of the alphas is not exact); a missing --bench-json was only a warning."""
    a2a_model.main(["--topologies", "2x1", "--out", str(tmp_path / "a.json")])
    assert "(defaults measured on 2x H200; alphas assumed)" in capsys.readouterr().out
    a2a_model.main(["--topologies", "2x1", "--inter-gbps", "25", "--out", str(tmp_path / "a.json")])
    assert "(command-line values)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["model"]["inter_beta"] == 25e9


@pytest.mark.parametrize("module", [bench_all2all, bench_small, bench_allreduce, bench_host])
def test_plot_of_a_missing_or_foreign_file_names_it(tmp_path, capsys, monkeypatch, module):
    """--plot FILE: a typo or another tool's JSON ended in a FileNotFoundError / KeyError
    traceback."""
    missing = tmp_path / "nope.json"
    assert f"--plot {missing}: cannot read it" in usage_error(capsys, monkeypatch, module,
                                                               "--plot", missing)
    foreign = tmp_path / "gate.json"
    foreign.write_text(json.dumps({"thresholds": {}}))
    assert f"--plot {foreign}: no \"rows\" list" in usage_error(capsys, monkeypatch, module,
                                                                "--plot", foreign)


@pytest.mark.parametrize("module, folder", [(bench_all2all, True), (bench_small, True),
                                            (bench_allreduce, True), (a2a_model, False),
                                            (codec_error, False), (bench_frame, False),
                                            (bench_host, False), (bench_codec, False),
                                            (bench_stamps, False)])
def test_out_is_checked_before_the_run(tmp_path, capsys, monkeypatch, module, folder):
    wrong = tmp_path / "f.json"
    if folder:
        wrong.write_text("")
    else:
        wrong.mkdir()
    line = usage_error(capsys, monkeypatch, module, "--out", wrong)
    assert line.endswith(f"--out: {wrong} is {'not ' if folder else ''}a directory")


def test_accuracy_study_checks_out_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = run_tool(ROOT / "tools" / "accuracy_study.py", "--out", tmp_path / "afile", "--steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: --out: {tmp_path / 'afile'} is not a directory")
    assert "Traceback" not in proc.stderr and "==" not in proc.stdout  # no run started


def test_bench_frame_makes_the_folder_of_out(tmp_path):
    out = tmp_path / "missing" / "frame.json"
    proc = run_tool(ROOT / "tools" / "bench_frame.py", "--reps", "1", "--port",
                    tune_gate.free_port(), "--out", out, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["rows"]


def test_bench_frame_picks_a_free_port_and_shows_its_example(capsys, monkeypatch):
    """The default port was a fixed 29631 (a second run, or anything else there, failed in
    torch's rendezvous); --help showed the docstring's first paragraph only, not the command."""
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 29631))
        except OSError:
            pass  # taken already
        port = bench_frame.parse_args([]).port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
    monkeypatch.setattr(sys, "argv", ["bench_frame.py", "--help"])
    with pytest.raises(SystemExit) as e:
        bench_frame.main()
    assert e.value.code == 0
    assert "    python tools/bench_frame.py --out docs/data/bench_frame.json\n" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for d in ("tools", "recipes")
                                           for p in (ROOT / d).glob("*.py")))
def test_docstrings_read_as_written(script):
    """--help prints the docstring: a backslash ending a line of an example command joined
    it to the next, with the indentation as a run of spaces inside the command."""
    source = (ROOT / script).read_text()
    doc = ast.get_docstring(ast.parse(source), clean=False)
    assert doc and doc in source


def test_wire_format_table_has_help(capsys):
    """--help printed the table (no parser)."""
    import wire_format_table
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        wire_format_table.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "record-size table" in out and "| hidden |" not in out


def test_check_csrc_help_compiles_nothing():
    """--help went to nvcc, whose help exits 0: every job said "ok" (the check "passed")."""
    for flag in ("--help", "-h"):
        proc = subprocess.run(["bash", str(ROOT / "tools" / "check_csrc.sh"), flag],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.startswith("usage: tools/check_csrc.sh [extra nvcc flags")
        assert len(proc.stdout.splitlines()) == 1, proc.stdout  # (no "ok   csrc/..." line)


@pytest.mark.parametrize("module, sizes", [(bench_all2all, "sizes"), (bench_small, "a2a_sizes")])
def test_tables_say_the_sizes_are_rounded_to_whole_rows(module, sizes, capsys):
    """At hidden 7168 the 64K and 256K asked are 56K and 252K of whole rows (2 ranks' even
    split): the tables showed those sizes without saying why; a note says so once."""
    assert bench_all2all.a2a_tokens(64 << 10, 7168, 2) == 4 and \
        bench_all2all.a2a_tokens(256 << 10, 7168, 2) == 18
    result = json.loads((DATA / f"{module.__name__}.json").read_text())  # (a GPU run)
    result["meta"]["config"][sizes] = [64 << 10, 256 << 10]
    text = module.print_tables(result)
    note = ("note: at hidden 7168 the sizes are whole token rows split evenly over 2 ranks, "
            "rounded down from those asked: 64K -> 56K, 256K -> 252K")
    assert text.count("note: ") == 1 and note + "\n" in text, text[:600]
    assert re.search(r"^ +56K ", text, re.M) and re.search(r"^ +64K ", text, re.M)  # (hidden 4096)
    result["meta"]["config"][sizes] = [64 << 10]  # whole rows at 4096, and one asked: no note
    result["rows"] = [r for r in result["rows"] if r["hidden"] == 4096]
    assert "note: " not in module.print_tables(result)
    capsys.readouterr()


PARSERS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if "Parser(" in p.read_text())


@pytest.mark.parametrize("module", ["moe_flashcomm.tune_gate"] + PARSERS)
def test_help_explains_each_option_and_names_each_default_once(module, monkeypatch, capsys):
    """Many options had no help text, and the parsers' formatter showed no defaults: --help
    said neither what an option does nor what it is without it. Each option shown with a
    default to name (not None, False, empty) names it once."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **kw: parsers.append(self) or parse_args(self, *a, **kw))
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as e:
        __import__(module, fromlist=["main"]).main()
    assert e.value.code == 0
    options = {o.split()[0].rstrip(","): o for o in
               re.split(r"\n  (?=-)", capsys.readouterr().out.split("\noptions:\n")[1])}
    for option in options.values():
        assert option.count("default") <= 1 and "(default: None)" not in option, option
        assert "(default: False)" not in option, option
        lines = option.strip().splitlines()  # help follows the option, or starts a new line
        assert len(lines) > 1 or len(re.split(r"\s{2,}", lines[0])) > 1, option
    for a in parsers[0]._actions:  # (`is`: a default of 0 == False is named)
        named = a.default is not None and a.default is not False and a.default not in ("", [])
        if named and argparse.SUPPRESS not in (a.help, a.default):
            assert "default" in options[a.option_strings[0]], options[a.option_strings[0]]


# ---- dry runs on CPU: the GPU sweeps' sizes (up to 512 MiB) took hours there --------------------

@pytest.mark.parametrize("tool, args, config", [
    ("tools/bench_small.py", ["--a2a-codecs", "int4", "--ar-codecs", "int4", "--rounds", "1",
                              "--no-progress"], {"a2a_sizes": [64 << 10, 256 << 10],
                                                 "ar_sizes": [64 << 10, 256 << 10]}),
    ("tools/bench_all2all.py", ["--codecs", "int4", "--budget", "0.01", "--no-progress"],
     {"sizes": [64 << 10, 256 << 10],
      "chunk_sweep": {"size": 256 << 10, "hidden": 7168, "codecs": ["int4"], "chunks": [1, 2]}}),
    ("-m moe_flashcomm.tune_gate", ["--codecs", "int4", "--budget", "0.01"], None),
])
def test_cpu_dry_runs_default_to_small_sizes(tmp_path, tool, args, config):
    """tune_gate without --out: its meaningless thresholds overwrote ./gate.json; they go to
    a temporary file now, which it names."""
    out = tmp_path / "out"
    real = tmp_path / "gate.json"  # (tune_gate runs in tmp_path, beside a real gate)
    real.write_text(json.dumps({"thresholds": DEFAULT_THRESHOLDS}))
    proc = run_tool(*tool.split(), "--cpu-dry-run", "--paths", "nvlink", "--hidden", "4096",
                    *args, *(["--out", out] if config else []),
                    cwd=ROOT if config else tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if config is None:
        assert json.loads(real.read_text()) == {"thresholds": DEFAULT_THRESHOLDS}
        written = Path(re.search(r"^wrote (\S+) \(a dry run", proc.stdout, re.M)[1])
        try:
            assert written.parent == Path(tempfile.gettempdir())
            assert json.loads(written.read_text())["device"] == "cpu (dry run)"
        finally:
            written.unlink()
        return
    data = json.loads(next(out.glob("bench_*.json")).read_text())
    assert {k: data["meta"]["config"][k] for k in config} == config
    if tool == "tools/bench_all2all.py":  # its gate: what the run did not measure keeps the defaults
        # not as gate.json, where a real run's gate is read: a dry run's is meaningless
        assert not (out / "gate.json").exists()
        assert "(a dry run: timings meaningless, gate_dry_run.json not a gate to use)" in proc.stdout
        thresholds = json.loads((out / "gate_dry_run.json").read_text())["thresholds"]
        assert thresholds == dict(DEFAULT_THRESHOLDS, nvlink=dict(DEFAULT_THRESHOLDS["nvlink"],
                                                                  int4=data["gate"]["nvlink"]["int4"]))
