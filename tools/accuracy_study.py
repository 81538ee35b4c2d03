"""Accuracy of low-bit MoE communication: the fine-tuning recipe trained with bf16, int8,
int4, int3 and int2 dispatch/combine (spikes on and off; gradients int8), and the bf16-trained
model evaluated with quantized dispatch and combine (inference).

    python tools/accuracy_study.py [--steps 200] [--out out/accuracy]

Same seed, data and initial weights for every run; a second bf16 run with another seed of
the training batches (the same initial weights and validation batches) shows the run-to-run
noise. "vs bf16" is the change of the validation loss against the bf16 run's, in % (the
same measure in both columns). Prints a table, writes JSON and a PNG of the
loss curves; checkpoints only with --save-checkpoints. Runs on CPU (gloo processes it
starts) or under the deepspeed launcher on GPUs, with the model options of
recipes/finetune_moe.py; the config's own "moe_flashcomm" section is replaced in every run.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import finetune_moe as ft  # noqa: E402
import preflight  # noqa: E402

from moe_flashcomm import env  # noqa: E402

import moe_flashcomm  # noqa: E402
from benchlib import check_out, pyplot  # noqa: E402

BF16 = {k: "bf16" for k in ("dispatch", "combine", "dispatch_grad", "combine_grad")}
RUNS = [("bf16", BF16, 0), ("bf16 (other data seed)", BF16, 1)] + [
    (f"int{b}{'+spikes' if s else ''}", {"dispatch": {"bits": b, "spikes": s},
                                         "combine": {"bits": b, "spikes": s}}, 0)
    for b in (8, 4, 3, 2) for s in (True, False)]


def study(args) -> None:
    ft.init_rank(args)
    base = args.ds_config
    results, inference = [], []
    for name, section, seed_shift in RUNS:
        cfg = copy.deepcopy(base)
        cfg["moe_flashcomm"] = section
        run_args = args_of_run(args, name, seed_shift)
        ft.log(f"== {name}")
        t0 = time.perf_counter()
        summary, engine, val = ft.train(run_args, cfg)
        results.append({"name": name, "val_loss": summary["val_loss"], "seconds": time.perf_counter() - t0,
                        "moe_flashcomm": section, "history": summary["history"]})
        if name == "bf16":  # inference: the bf16-trained model with quantized dispatch/combine
            for iname, isection, _ in RUNS:
                if iname.startswith("bf16 ("):
                    continue
                moe_flashcomm.enable_deepspeed(engine, isection)
                inference.append({"name": iname, "val_loss": ft.evaluate(engine, val)})
        del engine
    if torch.distributed.get_rank() == 0:
        report(results, inference, args)


def args_of_run(args, name: str, seed_shift: int):
    """One run's arguments: its folder, and the seed of its training batches shifted (the
    weights' seed, --seed, stays: every run starts from the same weights)."""
    run_args = copy.copy(args)
    run_args.out = args.out / name.replace(" ", "_").replace("(", "").replace(")", "")
    run_args.data_seed = (args.seed if args.data_seed is None else args.data_seed) + 7919 * seed_shift
    return run_args


def vs_bf16(loss: float, base: float) -> str:
    return f"{100 * (loss / base - 1):>+7.2f}%"


def table(results: list, inference: list) -> str:
    """Validation loss, perplexity and loss vs bf16 (%), fine-tuned and at inference."""
    base = results[0]["val_loss"]
    ibase = inference[0]["val_loss"]
    lines = [f"{'communication':<24} {'fine-tune val loss':>18} {'ppl':>7} {'vs bf16':>8} | "
             f"{'inference val loss':>18} {'ppl':>7} {'vs bf16':>8}"]
    inf = {r["name"]: r["val_loss"] for r in inference}
    for r in results:
        line = (f"{r['name']:<24} {r['val_loss']:>18.4f} {math.exp(r['val_loss']):>7.3f} "
                f"{vs_bf16(r['val_loss'], base)} |")
        if r["name"] in inf:
            v = inf[r["name"]]
            line += f" {v:>18.4f} {math.exp(v):>7.3f} {vs_bf16(v, ibase)}"
        lines.append(line)
    return "\n".join(lines)


def report(results: list, inference: list, args) -> None:
    text = table(results, inference)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)",
            "world_size": torch.distributed.get_world_size(), "steps": args.steps,
            "note": "vs bf16: validation loss against the bf16 run's, in %, in both columns"}
    (args.out / "accuracy.json").write_text(json.dumps(
        {"meta": meta, "finetune": results, "inference": inference, "table": text}, indent=1))
    plot(results, args.out / "accuracy.png")
    print(f"wrote {args.out / 'accuracy.json'}")


def plot(results: list, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        pts = [(h["step"], h["val_loss"]) for h in r["history"] if "val_loss" in h]
        ax.plot(*zip(*pts), "--" if "spikes" not in r["name"] and "bf16" not in r["name"] else "-",
                marker="o", ms=3, label=r["name"])
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="MoE fine-tuning: communication codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = preflight.Parser(description=__doc__)
    ft.add_model_args(p, steps=200, eval_every=25, eval_batches=32, out="out/accuracy")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="write each run's DeepSpeed checkpoint under <out>/<run>/ckpt")
    p.set_defaults(resume=False)  # every run starts fresh
    args = p.parse_args(argv)
    check_out(p, args.out, folder=True)  # before the runs, not after them
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.ds_config = ft.check_args(args)
    preflight.say(f"{len(RUNS)} fine-tuning runs ({', '.join(name for name, _, _ in RUNS)}) of "
                  f"{args.steps} steps; each sets its own \"moe_flashcomm\" section")
    preflight.check_extension_build(cpu_run=env.rank() is None and not torch.cuda.is_available())
    ft.launch(study, args)


if __name__ == "__main__":
    main()
