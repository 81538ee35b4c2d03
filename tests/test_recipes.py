"""The recipes run as a user runs them (CPU: they start their own gloo processes)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_finetune_trains_counts_exchanges_and_resumes(tmp_path):
    common = ["--eval-every", "2", "--eval-batches", "2", "--corpus-bytes", "300000", "--no-progress",
              "--out", str(tmp_path / "ft")]
    out = run("finetune_moe.py", "--steps", "4", *common, cwd=tmp_path)
    assert "in all-to-all" in out and "dispatch_grad" in out
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    layers, steps = s["model"]["layers"], 4
    ex = s["exchanges"]
    # every training step: one dispatch and one combine per layer, forward and backward;
    # every evaluation (steps 2 and 4, 2 batches each) adds forward exchanges only
    assert ex["calls"]["dispatch_grad"] == ex["calls"]["combine_grad"] == layers * steps
    assert ex["calls"]["dispatch"] == layers * (steps + 2 * 2)
    assert ex["quantized"] == ex["calls"]  # the embedded config quantizes every exchange
    assert sum(ex["bf16_bytes"]["dispatch"].values()) > 3 * sum(ex["bytes_sent"]["dispatch"].values())
    assert math.isfinite(s["val_loss"]) and s["val_loss"] < math.log(256)  # learned something
    assert s["all_to_all_seconds"] > 0 and s["tokens_per_s"] > 0

    out = run("finetune_moe.py", "--steps", "6", "--resume", *common, cwd=tmp_path)
    assert "resumed from" in out and "at step 4" in out
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert s["steps_run"] == 2 and s["exchanges"]["calls"]["dispatch_grad"] == layers * 2


def test_inference_benchmark_smoke(tmp_path):
    run("bench_moe_inference.py", "--tokens", "32", "--reps", "2", "--codecs", "int4",
        "--out", str(tmp_path / "inf"), cwd=tmp_path)
    rows = json.loads((tmp_path / "inf" / "moe_inference_cpu.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["stock_s"] > 0 and rows[0]["int4_s"] > 0
