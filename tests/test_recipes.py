"""The recipes and the accuracy study run as a user runs them (on CPU they start their own
gloo processes): the full runs are slow (``-m "not slow"`` skips them); mistakes in the
arguments or the config fail in the parent, in seconds, with one line and exit status 2."""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["recipes/finetune_moe.py", "recipes/bench_moe_inference.py", "tools/accuracy_study.py"]


def run(script: str, *args: str, cwd: Path, env=None, check=True, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fails_fast(script: str, *args: str, cwd: Path, env=None) -> str:
    """Exit status 2 in under 25 s, at most 6 lines printed; returns what was printed."""
    t0 = time.monotonic()
    proc = run(script, *args, cwd=cwd, env=env, check=False, timeout=120)
    seconds = time.monotonic() - t0
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 2, printed[-3000:]
    assert seconds < 25, (seconds, printed[-3000:])
    assert len(printed.splitlines()) <= 6, printed
    return printed


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_file_fails_fast(script, tmp_path):
    out = fails_fast(script, "--deepspeed_config", "missing.json", cwd=tmp_path)
    assert "--deepspeed_config missing.json: no such file" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_moe_flashcomm_field_fails_fast(script, tmp_path):
    cfg = json.loads((ROOT / "recipes" / "finetune_moe.json").read_text())
    cfg["moe_flashcomm"]["dispatch"] = {"bits": 9}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = fails_fast(script, "--deepspeed_config", "ds.json", cwd=tmp_path)
    assert "moe_flashcomm.dispatch: CodecConfig.bits must be an int 2..8, 'fp8', 'bf16' or 'native', got 9" in out


def test_malformed_config_and_bad_arguments_fail_fast(tmp_path):
    (tmp_path / "ds.json").write_text('{"moe_flashcomm": {"dispatch": 4,}}')
    assert "not valid JSON" in fails_fast(SCRIPTS[0], "--deepspeed_config", "ds.json", cwd=tmp_path)
    assert "--experts 3 must be divisible by the 2 ranks" in fails_fast(SCRIPTS[0], "--experts", "3",
                                                                        cwd=tmp_path)
    assert "argument --steps: expected an int >= 1, got '0'" in fails_fast(SCRIPTS[2], "--steps", "0",
                                                                           cwd=tmp_path)
    assert "--resume: no checkpoint under" in fails_fast(SCRIPTS[0], "--resume", cwd=tmp_path)


BAD_GATE = {"thresholds": {"nvlink": {"int4": "big"}}}


@pytest.mark.parametrize("script, args, section, gate_variable, message", [
    (SCRIPTS[0], [], {"layers": [{"index": [0, 2], "dispatch": 8}]}, None,
     "moe_flashcomm.layers[0].index: 2 is out of range, --layers 2 gives MoE layers 0..1"),
    (SCRIPTS[0], [], {"layers": [{"match": "*", "gate": "missing.json"}]}, None,
     "moe_flashcomm.layers[0].gate: cannot read size-gate file 'missing.json'"),
    (SCRIPTS[0], [], {"gate": "bad.json"}, None,
     "moe_flashcomm.gate: size gate bad.json: thresholds['nvlink']['int4'] must be an int >= 0"),
    (SCRIPTS[0], [], None, "missing.json",
     "environment variable MOE_FLASHCOMM_GATE_FILE='missing.json': cannot read size-gate file"),
    (SCRIPTS[1], [], None, "bad.json",
     "environment variable MOE_FLASHCOMM_GATE_FILE='bad.json': size gate bad.json: "),
    (SCRIPTS[0], ["--hidden", "130"], None, None,
     "--hidden 130 must be divisible by the model's 4 attention heads"),
    (SCRIPTS[0], ["--resume", "--out", "."], None, None,  # ./ckpt exists, holds no checkpoint
     "--resume: no checkpoint under ckpt (no DeepSpeed 'latest' file)"),
    (SCRIPTS[1], ["--cpu-ranks", "3"], None, None,
     "preset tiny: its 4 experts must be divisible by the 3 ranks"),
    (SCRIPTS[1], ["--cpu-ranks", "16", "--presets", "deepseek-routing", "mixtral-routing"], None,
     None, "preset mixtral-routing: its 8 experts must be divisible by the 16 ranks"),
    # one rank makes no all-to-all: it ended in ZeroDivisionError after timing the stock layer
    (SCRIPTS[1], ["--cpu-ranks", "1"], None, None,
     "one rank: its experts are all local, so there is no all-to-all to time"),
])
def test_mistakes_that_ranks_would_hit_fail_fast(script, args, section, gate_variable, message,
                                                 tmp_path):
    """What each rank would otherwise meet later, as a multi-rank traceback: rule indices past
    the model's MoE layers, gate files (rules', the top level's, $MOE_FLASHCOMM_GATE_FILE's),
    the model's shape, a checkpoint directory without a checkpoint, experts that the ranks do
    not divide."""
    (tmp_path / "bad.json").write_text(json.dumps(BAD_GATE))
    (tmp_path / "ckpt").mkdir()
    if section is not None:
        cfg = json.loads((ROOT / "recipes" / "finetune_moe.json").read_text())
        cfg["moe_flashcomm"] = section
        (tmp_path / "ds.json").write_text(json.dumps(cfg))
        args = [*args, "--deepspeed_config", "ds.json"]
    env = dict(os.environ)
    env.pop("MOE_FLASHCOMM_GATE_FILE", None)
    if gate_variable:
        env["MOE_FLASHCOMM_GATE_FILE"] = gate_variable
    assert message in fails_fast(script, *args, cwd=tmp_path, env=env)


def test_the_gate_variable_is_checked_where_a_gate_reads_it(tmp_path, monkeypatch):
    """$MOE_FLASHCOMM_GATE_FILE is read by gates left at true: with every gate set otherwise a
    bad value is no mistake of this run."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import preflight
    monkeypatch.setenv("MOE_FLASHCOMM_GATE_FILE", str(tmp_path / "missing.json"))
    off = {"moe_flashcomm": {"gate": False, "layers": [{"index": 0, "dispatch": 8}]}}
    assert preflight.load_ds_config(None, off) is off
    for on in ({}, {"moe_flashcomm": {"gate": False, "layers": [{"index": 0, "gate": True}]}}):
        with pytest.raises(SystemExit) as e:
            preflight.load_ds_config(None, on)
        assert e.value.code == preflight.EXIT_USAGE


def env_variables() -> list:
    """The MOE_FLASHCOMM_* variables moe_flashcomm/env.py reads, from its source."""
    return sorted(set(re.findall(r'"(MOE_FLASHCOMM_\w+)"', (ROOT / "moe_flashcomm" / "env.py").read_text())))


# what a malformed value of a variable is not: any path is a cache folder; the gate file is
# checked by check_gate_variable, where a gate reads it
NOT_MALFORMED = {"MOE_FLASHCOMM_CACHE", "MOE_FLASHCOMM_GATE_FILE"}


@pytest.mark.parametrize("name", [n for n in env_variables() if n not in NOT_MALFORMED])
def test_every_variable_env_parses_is_checked_before_any_rank(name, monkeypatch, capsys):
    """A malformed variable failed on every rank after DeepSpeed started: a 50-line mp.spawn
    traceback, exit status 1. (Each variable env.py reads: a new one must be checked too.)"""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import preflight
    for other in env_variables():
        monkeypatch.delenv(other, raising=False)
    preflight.check_env_variables()  # none set: nothing to say
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(name, "not valid")  # (no flag, int or define takes a space)
    with pytest.raises(SystemExit) as e:
        preflight.check_env_variables()
    assert e.value.code == preflight.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: environment variable {name}='not valid': ")
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("script, name, value, says", [
    (SCRIPTS[0], "MOE_FLASHCOMM_TIMEOUT_S", "abc", "expected an int from 1 to 1000000000"),
    (SCRIPTS[1], "MOE_FLASHCOMM_P2P", "maybe", "expected one of 1, true"),
    (SCRIPTS[2], "MOE_FLASHCOMM_STAMPS", "2", "expected one of 1, true"),
])
def test_a_malformed_variable_fails_fast(script, name, value, says, tmp_path):
    env = dict(os.environ, **{name: value})
    out = fails_fast(script, cwd=tmp_path, env=env)
    assert f"error: environment variable {name}={value!r}: {says}" in out
    assert "Traceback" not in out


def test_steps_help_says_they_count_the_checkpoints_steps(monkeypatch, capsys):
    """--steps 20 --resume on a checkpoint at step 300 is refused; the help said only
    "training steps"."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import finetune_moe
    with pytest.raises(SystemExit):
        finetune_moe.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS training steps in all, counting those already in the checkpoint " \
        "with --resume (default: 300)" in text


def stale_lock(ext: Path) -> None:
    """A build lock under $TORCH_EXTENSIONS_DIR ``ext`` that an interrupted build left: a
    recipe stops at it, in the parent, after saying which codecs it runs."""
    build = ext / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    for name in ("lock", "build.ninja"):
        (build / name).touch()
        os.utime(build / name, (time.time() - 600, time.time() - 600))


def test_inference_benchmark_names_each_codec_by_its_own_text(tmp_path):
    """"dispatch and combine with int4, bf16 (group 128, spikes)": bf16 has no groups."""
    stale_lock(tmp_path / "ext")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = fails_fast(SCRIPTS[1], "--codecs", "int4", "bf16", "fp8", cwd=tmp_path, env=env)
    assert "moe_flashcomm: dispatch and combine with int4/g128+spikes, bf16, fp8/g128, each " \
        "against stock DeepSpeed\n" in out


def test_out_and_capacity_factor_are_checked_before_any_rank(tmp_path, monkeypatch, capsys):
    """--out a file: the recipes trained or timed for minutes and then failed writing there
    (a traceback per rank); --capacity-factor nan passed the ``<= 0`` check. Both end in
    the parent now (checked in-process: the old code would start a run)."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import bench_moe_inference
    import finetune_moe
    afile = tmp_path / "afile"
    afile.write_text("")
    for module, argv, says in [
        (finetune_moe, ["--out", str(afile)], f"error: --out: {afile} is not a directory"),
        (bench_moe_inference, ["--out", str(afile)], f"error: --out: {afile} is not a directory"),
        (bench_moe_inference, ["--capacity-factor", "nan"],
         "error: argument --capacity-factor: expected a number > 0, got 'nan'"),
        # NaN gate weights: every row's error and bytes NaN, silently
        (bench_moe_inference, ["--zipf", "nan"], "error: argument --zipf: expected a number >= 0, got 'nan'"),
        (bench_moe_inference, ["--zipf", "-1"], "error: argument --zipf: expected a number >= 0, got '-1'"),
    ]:
        with pytest.raises(SystemExit) as e:
            module.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(says), err


def test_the_inference_benchmarks_path_label_is_the_link_class_nccl_uses(monkeypatch):
    """--path nvlink under a shell exporting NCCL_P2P_DISABLE=1 wrote host or network
    timings as nvlink's (the label was not checked against the environment)."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import bench_moe_inference
    check = bench_moe_inference.path_label_problem
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.delenv("NCCL_SHM_DISABLE", raising=False)
    assert check("host-memory", "cuda") is None and check("host", "cuda") is None
    assert check("nvlink", "cpu") is None and check("my-cluster", "cuda") is None  # free labels
    assert check("nvlink", "cuda") == (
        "--path nvlink: NCCL's environment (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=(unset)) makes "
        "the link class 'host', not 'nvlink'; run with NCCL_P2P_DISABLE=0 NCCL_SHM_DISABLE=0, "
        "or label the run --path host")
    monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
    assert "makes the link class 'network', not 'host'" in check("host-memory", "cuda")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_each_option_and_names_each_default_once(script, monkeypatch, capsys):
    """Options whose help says their default got " (default: None)" after it; options
    without help text showed neither what they do nor their default; flags said
    " (default: False)"."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    module = __import__(Path(script).stem)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    for option in re.split(r"\n  (?=-)", options):
        assert option.count("default") <= 1 and "(default: None)" not in option, option
        assert "(default: False)" not in option, option
        lines = option.strip().splitlines()  # help follows the option, or starts a new line
        assert len(lines) > 1 or len(re.split(r"\s{2,}", lines[0])) > 1, option


def test_the_smallest_corpus_the_recipe_accepts_has_validation_batches(tmp_path, monkeypatch):
    """At the least --corpus-bytes check_args allowed (20 x (seq + 1)) the 5% validation split
    was exactly seq + 1 bytes, and ByteBatches raised on every rank after DeepSpeed started."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.delenv("MOE_FLASHCOMM_GATE_FILE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    import finetune_moe
    from moe_lm import ByteBatches, split_corpus, stdlib_corpus

    def accepted(seq: int, corpus: int) -> bool:
        args = finetune_moe.parse_args(["--seq", str(seq), "--corpus-bytes", str(corpus),
                                        "--out", str(tmp_path / "out")])
        try:
            finetune_moe.check_args(args)
        except SystemExit:
            return False
        return True

    for seq in (4, 16, 100, 128):
        least = next(n for n in range(20 * seq, 20 * (seq + 3)) if accepted(seq, n))
        for data in split_corpus(stdlib_corpus(least)):
            assert ByteBatches(data, 2, seq, seed=0).next().shape == (2, seq + 1)


def test_stale_build_lock_is_reported_with_its_fix(tmp_path):
    """An interrupted build of a DeepSpeed op leaves ``lock``: every later start would wait
    forever. The recipe says so, and how to clear it, instead of hanging. (With
    $TORCH_EXTENSIONS_DIR torch builds each op in a folder right under it.)"""
    build = tmp_path / "ext" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    for name in ("lock", "build.ninja"):
        (build / name).touch()
        os.utime(build / name, (time.time() - 600, time.time() - 600))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = fails_fast(SCRIPTS[0], "--steps", "1", cwd=tmp_path, env=env)
    assert f"stale build lock {build / 'lock'}" in out and f"rm -rf {build}" in out


def test_only_locks_of_this_runs_build_folder_stop_it(tmp_path, monkeypatch, capsys):
    """A stale lock of another Python or torch build (py311_cu130/fused_adam beside a CPU
    torch) stopped a run that never builds there. The folder is torch's own rule."""
    from torch.utils.cpp_extension import _get_build_directory
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import preflight
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's default root: under it
    own = Path(_get_build_directory("fused_adam", False))
    assert own.parent == preflight.build_root()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # set but empty: torch builds in the working directory
    monkeypatch.chdir(tmp_path)  # (which torch's call below makes the op's folder in)
    assert Path(_get_build_directory("fused_adam", False)).parent.resolve() == preflight.build_root().resolve()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    other = own.parents[1] / "py27_cu999" / "fused_adam"
    for build in (own, other):
        build.mkdir(parents=True, exist_ok=True)
        (build / "lock").touch()
        os.utime(build / "lock", (time.time() - 600, time.time() - 600))
    with pytest.raises(SystemExit) as e:
        preflight.check_extension_build(cpu_run=True)
    assert e.value.code == 2 and f"stale build lock {own / 'lock'}" in capsys.readouterr().err
    (own / "lock").unlink()
    preflight.check_extension_build(cpu_run=True)  # the other folder's lock: not this run's
    assert "stale" not in capsys.readouterr().err


def test_resume_with_another_rank_count_fails_fast(tmp_path, monkeypatch, capsys):
    """A checkpoint of 2 ranks resumed with 1 ended in DeepSpeed's ZeRORuntimeException in a
    rank traceback (exit 1). Checked in-process: the old code would start the run."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    for name in ("WORLD_SIZE", "RANK", "MOE_FLASHCOMM_GATE_FILE"):
        monkeypatch.delenv(name, raising=False)
    import finetune_moe
    ckpt = tmp_path / "out" / "ckpt"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    for rank in (0, 1):  # what DeepSpeed's ZeRO writes, one file per rank
        (ckpt / "global_step2" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    assert finetune_moe.checkpoint_ranks(ckpt) == 2
    args = finetune_moe.parse_args(["--resume", "--cpu-ranks", "1", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        finetune_moe.check_args(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --resume: the checkpoint under {ckpt} was saved by 2 "
                                       f"ranks, this run has 1; resume with 2\n")
    finetune_moe.check_args(finetune_moe.parse_args(["--resume", "--out", str(tmp_path / "out")]))


def test_resume_with_no_steps_left_fails_before_any_rank_starts(tmp_path):
    """--steps no more than the checkpoint's step was refused inside each rank, after the
    gloo processes and DeepSpeed had started and loaded the checkpoint: their lines, then the
    error. The parent reads the step from the tag that DeepSpeed's ``latest`` names (the slow
    run below checks that the recipe saves under that tag)."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "step6").mkdir(parents=True)
    (ckpt / "latest").write_text("step6")
    for rank in (0, 1):  # what DeepSpeed's ZeRO writes, one file per rank
        (ckpt / "step6" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    for steps in ("4", "6"):
        out = fails_fast(SCRIPTS[0], "--resume", "--steps", steps, "--out", ".", cwd=tmp_path)
        assert out == (f"error: --resume: the checkpoint under ckpt is at step 6; --steps {steps} "
                       f"must be more\n")


def test_one_rank_run_says_there_was_no_exchange(monkeypatch):
    """One rank makes no all-to-all: the breakdown showed 0 calls under a footer claiming
    2 layers x (steps + evaluations) calls, "0.00x less", and 100% filled slots (the share's
    value for nothing sent) as if measured."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import finetune_moe
    from moe_flashcomm.integrations import ExchangeStats
    summary = dict(val_loss=4.0, val_perplexity=math.exp(4.0), tokens_per_s=100.0, all_to_all_seconds=0.0,
                   seconds=1.0, exchanges=ExchangeStats().as_dict(), model={"layers": 2}, steps_run=2,
                   patched_layers=2, evaluation_forwards=2, world_size=1,
                   filled_slot_share={"blocks.0.moe.deepspeed_moe": None})
    text = "\n".join(finetune_moe.summary_lines(summary))
    assert "all-to-all (rank 0): none (one rank: every expert is local, nothing to exchange)" in text
    assert "calls per direction" not in text and "x less" not in text and "filled" not in text


def test_the_exchange_footer_counts_the_layers_moe_flashcomm_runs(monkeypatch):
    """A config that disables a layer: the footer said "2 MoE layers x (...)" over the 1
    layer's counted calls; one that disables every layer said "none" and "0.0 s in
    all-to-all", though stock DeepSpeed made its exchanges (uncounted)."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import finetune_moe
    from moe_flashcomm.integrations import ExchangeStats
    ex = ExchangeStats().as_dict()
    ex["calls"] = {d: 6 for d in ex["calls"]}
    footer = finetune_moe.describe_exchanges(ex, 1, 4, 2, 2).splitlines()[-1]
    assert footer.startswith("  calls per direction = 1 MoE layers with moe_flashcomm x "
                             "(forward: 4 training steps + 2 evaluation batches"), footer
    assert finetune_moe.describe_exchanges(ExchangeStats().as_dict(), 0, 4, 2, 2) == (
        "all-to-all (rank 0): not measured (the config enables moe_flashcomm on no MoE layer: "
        "stock DeepSpeed's exchanges are not counted)")


def test_resume_refuses_another_models_checkpoint_and_a_fresh_run_says_it_replaces_one(
        tmp_path, monkeypatch, capsys):
    """--resume with another --hidden ended in a size-mismatch traceback on every rank after
    DeepSpeed started; a run without --resume replaced the checkpoint in --out silently."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import finetune_moe
    out = tmp_path / "out"
    (out / "ckpt" / "step6").mkdir(parents=True)
    (out / "ckpt" / "latest").write_text("step6")
    model = dict(hidden=128, layers=2, experts=4, top_k=1, ep_size=2, seq=64)
    (out / "summary.json").write_text(json.dumps({"steps": 6, "model": model}))
    args = finetune_moe.parse_args(["--resume", "--steps", "8", "--hidden", "64", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        finetune_moe.check_args(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --resume: the checkpoint under {out / 'ckpt'} is "
                                       "of a model with --hidden 128, this run has --hidden 64; "
                                       "resume with 128\n")
    finetune_moe.check_args(finetune_moe.parse_args(["--out", str(out)]))
    assert capsys.readouterr().out == (f"warning: {out / 'ckpt'} holds a checkpoint (step 6); "
                                       "this run starts afresh and replaces it (--resume "
                                       "continues it)\n")


def test_the_inference_benchmarks_path_label_must_make_a_file_name(monkeypatch, capsys):
    """--path a/b timed every point, then failed writing moe_inference_a/b.json."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import bench_moe_inference
    with pytest.raises(SystemExit) as e:
        bench_moe_inference.check_args(bench_moe_inference.parse_args(["--path", "a/b"]))
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: --path 'a/b': the label goes into the file name moe_inference_<path>.json: "
        "letters, digits, '-', '_' and '.' only\n")


def test_without_a_terminal_progress_is_a_line_every_30_s(monkeypatch):
    """Without a terminal there is no progress bar, and a run printed nothing between its
    evaluations (minutes): a short line is due every PROGRESS_EVERY_S seconds of wall time."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import finetune_moe
    assert finetune_moe.PROGRESS_EVERY_S == 30
    times = iter([100.0, 110.0, 129.9, 130.0, 150.0, 190.0])  # the clock at start, then per step
    lines = finetune_moe.ProgressLines(start=10, total=300, clock=lambda: next(times))
    evaluated = iter([0.0, 0.0, 0.0, 0.0, 40.0])  # seconds spent evaluating, before each step
    got = [lines.line(step, 5.0 - step / 100, next(evaluated)) for step in range(11, 16)]
    # the rate leaves the evaluations out, as the run's summary does
    assert got == [None, None, "step 13/300: loss 4.8700, 30 s, 0.10 training steps/s", None,
                   "step 15/300: loss 4.8500, 90 s, 0.10 training steps/s"]


def test_a_launcher_less_single_process_is_one_rank(tmp_path):
    """On a GPU machine without a launcher the recipes run in this one process, but DeepSpeed,
    finding no RANK / MASTER_ADDR, looked for an MPI launch (ModuleNotFoundError: mpi4py).
    The same initialisation on CPU (gloo), in a fresh process with no launcher variables."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'recipes')!r}); import finetune_moe, torch\n"
            f"args = finetune_moe.parse_args(['--out', {str(tmp_path / 'out')!r}])\n"
            "finetune_moe.single_process(); finetune_moe.init_rank(args)\n"
            "print('world', torch.distributed.get_world_size(), torch.distributed.get_rank())\n")
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 1 0" in proc.stdout


def test_inference_plot_names_the_stock_dtype_and_needs_no_matplotlib(tmp_path, monkeypatch, capsys):
    """The plot called the CPU run's fp32 stock exchange "bf16"; without matplotlib (not a
    dependency) --plot raised after the run instead of saying there is no plot."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import bench_moe_inference
    rows = [dict(preset="tiny", tokens_per_rank=t, world=2, path="cpu", stock_s=0.01, int8_s=0.02)
            for t in (64, 256)]
    plt = pytest.importorskip("matplotlib.pyplot")
    bench_moe_inference.plot(rows, ["int8"], tmp_path / "a.png", "float32")
    labels = [line.get_label() for ax in plt.gcf().axes for line in ax.get_lines()]
    assert labels == ["stock (float32)", "int8"] and (tmp_path / "a.png").is_file()
    plt.close("all")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    bench_moe_inference.plot(rows, ["int8"], tmp_path / "b.png", "float32")
    assert "matplotlib not installed: no plot" in capsys.readouterr().out
    assert not (tmp_path / "b.png").exists()


def test_inference_line_names_what_the_bytes_are_fewer_than(monkeypatch):
    """"int4 ... 8.00x fewer bytes" on CPU was against the stock exchange in fp32 (twice
    bf16's bytes), which the line did not say."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import bench_moe_inference
    import torch
    row = dict(preset="tiny", tokens_per_rank=64, world=2, stock_s=0.01, stock_bytes=8000.0,
               int4_s=0.02, int4_bytes=1000.0, int4_rel_err=0.05)
    line = bench_moe_inference.row_line(row, ["int4"], torch.float32)
    assert line == ("    tiny tokens/rank     64: stock    10.00 ms (     12800 tok/s) | int4    "
                    "20.00 ms x0.50, 8.00x fewer bytes than stock fp32 (err 5.0e-02)"), line
    assert "fewer bytes than stock bf16 " in bench_moe_inference.row_line(row, ["int4"], torch.bfloat16)


def test_the_other_data_seed_run_keeps_the_initial_weights(tmp_path, monkeypatch):
    """"bf16 (other data seed)" shifted --seed, which also seeds the initial weights: its
    "run-to-run noise" mixed two sources. Now only the training batches' seed moves."""
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import accuracy_study
    args = accuracy_study.parse_args(["--out", str(tmp_path / "acc")])
    runs = {name: accuracy_study.args_of_run(args, name, shift) for name, _, shift in accuracy_study.RUNS}
    assert all(r.seed == args.seed for r in runs.values())
    assert runs["bf16"].data_seed == args.seed != runs["bf16 (other data seed)"].data_seed


@pytest.mark.slow
def test_finetune_trains_counts_exchanges_and_resumes(tmp_path):
    common = ["--eval-every", "2", "--eval-batches", "2", "--corpus-bytes", "300000",
              "--out", str(tmp_path / "ft")]
    out = run(SCRIPTS[0], "--steps", "4", *common, cwd=tmp_path).stdout
    assert "in all-to-all" in out and "dispatch_grad" in out
    assert out.count("moe_flashcomm: dispatch=int4/g128+spikes combine=int4/g128+spikes") == 1
    assert "step/s" not in out  # stdout is not a terminal: no progress bar
    assert out.count("step 2: train loss") == 1  # rank 0 only
    assert "2 MoE layers with moe_flashcomm x (forward: 4 training steps + 4 evaluation " \
        "batches" in out
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    layers, steps = s["model"]["layers"], 4
    ex = s["exchanges"]
    # every training step: one dispatch and one combine per layer, forward and backward;
    # every evaluation (steps 2 and 4, 2 batches each) adds forward exchanges only
    assert s["evaluation_forwards"] == 2 * 2
    assert ex["calls"]["dispatch_grad"] == ex["calls"]["combine_grad"] == layers * steps
    assert ex["calls"]["dispatch"] == layers * (steps + s["evaluation_forwards"])
    assert ex["quantized"] == ex["calls"]  # the embedded config quantizes every exchange
    assert sum(ex["bf16_bytes"]["dispatch"].values()) > 3 * sum(ex["bytes_sent"]["dispatch"].values())
    assert math.isfinite(s["val_loss"]) and s["val_loss"] < math.log(256)  # learned something
    assert s["all_to_all_seconds"] > 0 and s["tokens_per_s"] > 0
    # tokens/s of the training steps: it counted the evaluations' time too
    assert 0 < s["evaluation_seconds"] < s["seconds"]
    assert s["train_seconds"] == pytest.approx(s["seconds"] - s["evaluation_seconds"])
    micro = 8  # (finetune_moe.DEFAULT_CONFIG)
    assert s["tokens_per_s"] == pytest.approx(micro * s["model"]["seq"] * s["world_size"] * steps
                                              / s["train_seconds"])

    out = run(SCRIPTS[0], "--steps", "6", "--resume", *common, cwd=tmp_path).stdout
    assert "resumed from" in out and "at step 4" in out
    assert (tmp_path / "ft" / "ckpt" / "latest").read_text() == "step6"  # what check_args reads
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert s["steps_run"] == 2 and s["exchanges"]["calls"]["dispatch_grad"] == layers * 2
    # --steps no more than the checkpoint's: one line, exit 2 (it "trained" -2 steps at
    # negative tokens/s and re-saved the checkpoint as step 4); the checkpoint stays
    proc = run(SCRIPTS[0], "--steps", "4", "--resume", *common, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout + proc.stderr == f"error: --resume: the checkpoint under " \
        f"{tmp_path / 'ft' / 'ckpt'} is at step 6; --steps 4 must be more\n"  # before any rank
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["steps_run"] == 2


@pytest.mark.slow
def test_inference_benchmark_smoke(tmp_path):
    out = run(SCRIPTS[1], "--tokens", "32", "--reps", "2", "--codecs", "int8", "int2",
              "--out", str(tmp_path / "inf"), cwd=tmp_path).stdout
    assert "the torch reference codec" in out  # why the codecs are slower on CPU
    # DeepSpeed's import warns; rank 1 imported it before init_rank quieted it: twice
    assert out.count("Setting accelerator to CPU") <= 1, out
    data = json.loads((tmp_path / "inf" / "moe_inference_cpu.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["path"] == "cpu"
    (row,) = data["rows"]
    assert (row["preset"], row["tokens_per_rank"], row["world"]) == ("tiny", 32, 2)
    assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("stock_s", "int8_s", "int2_s"))
    # the stock exchange's bytes in the layer's dtype (fp32 on CPU: it counted bf16's, half)
    assert data["meta"]["dtype"] == "torch.float32"
    assert row["stock_bytes"] / row["int8_bytes"] > 3  # (int8 with scales: about 4x below fp32)
    # the patched layer computes the stock layer's output up to the codec's error
    assert 0 < row["int8_rel_err"] < row["int2_rel_err"] < 0.5
    assert row["int8_rel_err"] < 0.02


def _readme_example(rank, world, section):
    import deepspeed
    import torch
    from deepspeed.moe.layer import MoE

    import moe_flashcomm
    sys.path.insert(0, str(ROOT / "recipes"))
    from moe_lm import MoELM, ModelConfig

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = MoELM(ModelConfig(hidden=64, seq=16, ep_size=world))
    for m in model.modules():
        if isinstance(m, MoE):
            m.set_deepspeed_parallelism()
    stats = moe_flashcomm.enable_deepspeed(model, {"moe_flashcomm": section})
    assert sorted(stats) == ["blocks.0.moe.deepspeed_moe"]  # rule 2 disables blocks.1
    model(torch.randint(0, 256, (2, 17)))
    assert stats["blocks.0.moe.deepspeed_moe"].calls["dispatch"] == 1
    assert moe_flashcomm.FlashCommConfig.from_dict(section).for_layer(
        "blocks.0.moe.deepspeed_moe", 0).dispatch.intra_node.bits == 8  # rule 1
    _config_given_to_an_engine(rank, MoELM(ModelConfig(hidden=64, seq=16, ep_size=world)))


def _config_given_to_an_engine(rank, model):
    """enable_deepspeed(engine) whose DeepSpeed config misspells the section (DeepSpeed accepts
    it): the defaults, with a warning on rank 0 only naming the key; a DeepSpeed JSON path
    as ``config``: its section (without one: the defaults and the same warning); a whole
    DeepSpeed config dict without the section: an error that says so."""
    import io
    import logging
    import tempfile

    import deepspeed

    import moe_flashcomm
    from moe_flashcomm.config import ConfigError
    from moe_flashcomm.integrations.patching import ds_logger
    ds = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=model, config={**ds, "moe_flashcom": {"dispatch": 8}})
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    ds_logger().addHandler(handler)

    def codecs(config=None):
        """(dispatch bits of each enabled layer, what was logged meanwhile)"""
        seen.seek(0)
        seen.truncate()
        stats = moe_flashcomm.enable_deepspeed(engine, config)
        layers = [m for m in engine.module.modules() if "_moe_flashcomm" in vars(m)]
        assert len(stats) == len(layers) == 2
        return [vars(m)["_moe_flashcomm"].config.dispatch.intra_node.bits for m in layers], \
            seen.getvalue()

    warning = 'moe_flashcomm: the DeepSpeed config has no "moe_flashcomm" section: the defaults are used'
    try:
        bits, logged = codecs()
        assert bits == [4, 4]
        assert (warning in logged) == (rank == 0), logged
        if rank == 0:
            assert "key 'moe_flashcom' is not read: did you mean \"moe_flashcomm\"?" in logged, logged
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ds_config.json")
            with open(path, "w") as f:
                json.dump({**ds, "moe_flashcomm": {"dispatch": 8}}, f)
            bits, logged = codecs(path)
            assert bits == [8, 8] and warning not in logged, logged
            with open(path, "w") as f:
                json.dump(ds, f)
            bits, logged = codecs(Path(path))
            assert bits == [4, 4] and (warning in logged) == (rank == 0), logged
        with pytest.raises(ConfigError, match=r"unknown field\(s\) \['steps_per_print', "
                                              r"'train_micro_batch_size_per_gpu'\]: this looks "
                                              r"like a whole DeepSpeed config"):
            moe_flashcomm.enable_deepspeed(engine, ds)
    finally:
        ds_logger().removeHandler(handler)
    moe_flashcomm.disable_deepspeed(engine)


def test_readme_config_example_runs_on_the_recipe_model():
    """The README's "moe_flashcomm" JSON, as written, on the recipes' model (2 gloo ranks);
    then the config an engine's enable_deepspeed reads (``_config_given_to_an_engine``)."""
    from tests.distributed import spawn
    readme = (ROOT / "README.md").read_text()
    start = readme.index('```json\n"moe_flashcomm": ') + len('```json\n"moe_flashcomm": ')
    section = json.loads(readme[start:readme.index("```", start)])
    assert section["layers"]  # the example shows per-layer rules
    spawn(_readme_example, 2, section)


def test_first_run_build_is_announced(tmp_path):
    """With no built op (an empty extensions directory) the recipe says, before DeepSpeed
    starts, that the first run builds it. The run is stopped once the line is out."""
    import signal
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPTS[0]), "--steps", "1"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if "first run: DeepSpeed builds its C++ op deepspeed_shm_comm" in line or \
                    time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert any("first run: DeepSpeed builds its C++ op" in line for line in lines), lines
    assert any(line.startswith("moe_flashcomm: dispatch=") for line in lines), lines


@pytest.mark.parametrize("record", ["bench_host_1205_launchers.json", "bench_host_1205_launchers_w4.json"])
def test_bench_host_plots_a_recorded_run(record, tmp_path):
    """``tools/bench_host.py --plot`` draws a recorded run (no GPU needed): a PNG beside the JSON."""
    pytest.importorskip("matplotlib")
    data = tmp_path / record
    data.write_bytes((ROOT / "docs" / "data" / record).read_bytes())
    proc = run("tools/bench_host.py", "--plot", str(data), cwd=tmp_path, timeout=120)
    png = data.with_suffix(".png")
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
