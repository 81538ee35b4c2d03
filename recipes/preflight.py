"""What the recipes check in the parent process, before DeepSpeed or any rank starts.

A mistake (a missing or malformed config file, a bad ``"moe_flashcomm"`` field, an argument
out of range, a malformed ``MOE_FLASHCOMM_*`` variable) ends the run within seconds: one line
on stderr naming the problem, exit status 2. The first run's JIT build of DeepSpeed's C++ op
is announced, and a build lock left behind by an interrupted build (which would make every
later start wait forever) is reported with the command that clears it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

from moe_flashcomm import FlashCommConfig, SizeGate, env
from moe_flashcomm.tune_gate import HelpFormatter  # (the tools' and the tuner's as well)

EXIT_USAGE = 2
# A lock whose build directory has not changed for this long, with no process building
# there, was left behind by an interrupted build.
STALE_LOCK_S = 60
# DeepSpeed's op for CPU (gloo) runs, built on first use.
CPU_OP = "deepspeed_shm_comm"


def is_rank0() -> bool:
    return (env.rank() or 0) == 0


def say(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code under a launcher)."""
    if is_rank0():
        print(msg, flush=True)


def fail(msg: str) -> NoReturn:
    """One line on stderr (rank 0), exit status 2 on every rank."""
    if is_rank0():
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (not the usage block), exit status 2; --help shows
    the defaults."""

    def __init__(self, **kw):
        kw["formatter_class"] = HelpFormatter
        super().__init__(**kw)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} ({self.prog} --help lists the options)")


def load_ds_config(path: Optional[Path], default: dict) -> dict:
    """The DeepSpeed config (``default`` when no file is given), with its ``"moe_flashcomm"``
    section validated; any problem ends the run through ``fail``."""
    if path is None:
        cfg, where = default, "the built-in config"
    else:
        where = f"--deepspeed_config {path}"
        if not path.is_file():
            fail(f"{where}: no such file")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{where}: cannot read it ({e})")
        except json.JSONDecodeError as e:
            fail(f"{where}: not valid JSON ({e})")
        if not isinstance(cfg, dict):
            fail(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    try:  # (gate files, the top level's and the rules', are loaded here too)
        section = FlashCommConfig.from_deepspeed_config(cfg) or FlashCommConfig()
    except (TypeError, ValueError) as e:
        fail(f"{where}: {e}")
    rule_gates = [v for rule in section.layers for k, v in rule.overrides if k == "gate"]
    if any(gate is True for gate in [section.gate, *rule_gates]):
        check_gate_variable()
    return cfg


def check_env_variables() -> None:
    """Every MOE_FLASHCOMM_* variable the ranks parse, by the parser the library itself calls:
    a malformed value ends the run here, not as a traceback on every rank once DeepSpeed has
    started. (MOE_FLASHCOMM_GATE_FILE: check_gate_variable, where a gate reads it;
    MOE_FLASHCOMM_CACHE takes any path; the launchers set RANK, LOCAL_RANK and the like.)"""
    parsers = (env.timeout_s, env.p2p_enabled, env.stamps_enabled, env.p2p_max_bytes,
               env.p2p_copy_bytes, env.native_launch, env.kernel_defines,
               env.all_reduce_pair_gather)
    for parse in parsers:
        try:
            parse()
        except ValueError as e:
            fail(str(e))


def check_gate_variable() -> None:
    """$MOE_FLASHCOMM_GATE_FILE, which every gate left at true (the default) reads."""
    try:
        SizeGate.default()
    except ValueError as e:
        fail(str(e))


def codecs_line(cfg: dict) -> str:
    """The active codecs of a DeepSpeed config, for the start of a run."""
    section = FlashCommConfig.from_deepspeed_config(cfg)
    if section is None:  # (enable_deepspeed's warning says more: a misspelt section's key)
        return f"moe_flashcomm: {FlashCommConfig().describe()} (the defaults: no section)"
    return "moe_flashcomm: " + (section.describe() if section.enabled else "disabled (stock DeepSpeed)")


def _building(directory: Path) -> bool:
    """Whether a running process works in ``directory`` (torch runs ninja, and ninja the
    compiler, with the build directory as working directory); /proc only, so False where it
    does not exist."""
    target = directory.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) == target:
                return True
        except OSError:
            continue
    return False


def build_root() -> Path:
    """The folder torch builds this interpreter's JIT ops in (DeepSpeed's too), one folder
    per op: $TORCH_EXTENSIONS_DIR itself, else py<version>_<cpu|cuXY|rocmXY> under torch's
    default root (torch.utils.cpp_extension's rule). Ops of other Pythons or torch builds
    lie elsewhere: this run never waits on their locks."""
    import torch
    root = env.torch_extensions_dir()
    if os.environ.get("TORCH_EXTENSIONS_DIR") is not None:  # (set, even empty: torch's test)
        return root
    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return root / f"{python}_{accelerator}"


def check_extension_build(cpu_run: bool) -> None:
    """Before DeepSpeed starts: fail on a stale build lock of an op this run could build
    (with the command that clears it), say when another process is building one, and on a
    CPU run say when DeepSpeed's op is about to be built for the first time (a few minutes,
    once)."""
    root = build_root()
    now = time.time()
    for lock in sorted(root.glob("*/lock")):
        build = lock.parent
        try:
            newest = max(p.stat().st_mtime for p in build.iterdir())
        except (OSError, ValueError):
            continue
        if now - newest > STALE_LOCK_S and not _building(build):
            fail(f"stale build lock {lock}: no process is building {build.name} (an earlier "
                 f"build was interrupted), so DeepSpeed would wait for it forever; clear it "
                 f"with: rm -rf {build}")
        say(f"another process is building the C++ op {build.name} in {build}; waiting for it")
    if cpu_run and not any(root.glob(f"{CPU_OP}/{CPU_OP}*.so")):
        say(f"first run: DeepSpeed builds its C++ op {CPU_OP} for CPU communication (a few "
            f"minutes, once; cached under {root})")
