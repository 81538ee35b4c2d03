"""Expert-parallel fine-tuning of a small byte-level MoE LM with moe-flashcomm communication.

On GPUs, with the DeepSpeed launcher:
    deepspeed --num_gpus 2 recipes/finetune_moe.py --deepspeed_config recipes/finetune_moe.json
On a CPU-only machine the same script starts its own gloo processes with a small default:
    python recipes/finetune_moe.py                    # 2 ranks, a few minutes
The "moe_flashcomm" section of the DeepSpeed config picks the codecs (see README).
Logs loss, tokens/s (of the training steps: evaluation not counted), time in all-to-all and
bytes per link class; writes <out>/summary.json; saves a DeepSpeed checkpoint at the end
(--resume continues from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preflight  # noqa: E402
from moe_lm import ByteBatches, MoELM, ModelConfig, split_corpus, stdlib_corpus  # noqa: E402

from moe_flashcomm import FlashCommConfig, env  # noqa: E402
from moe_flashcomm.tune_gate import check_out, free_port, positive_int  # noqa: E402

# Used when no --deepspeed_config is given (CPU runs): small batches, fp32, ZeRO-2.
DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.0}},
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 1.0,
    "moe_flashcomm": {"dispatch": {"bits": 4}, "combine": {"bits": 4},
                      "dispatch_grad": {"bits": 8}, "combine_grad": {"bits": 8}},
}


# Without a terminal (no progress bar) a progress line this often, in seconds of wall time:
# the evaluations' lines alone leave a log silent for minutes.
PROGRESS_EVERY_S = 30


class ProgressLines:
    """The progress bar's stand-in in a log: a short line at most every ``every_s`` seconds."""

    def __init__(self, start: int, total: int, every_s: float = PROGRESS_EVERY_S,
                 clock=time.perf_counter) -> None:
        self.start, self.total, self.every_s, self.clock = start, total, every_s, clock
        self.t0 = self.last = clock()

    def line(self, step: int, loss: float, eval_s: float = 0.0) -> Optional[str]:
        """The line for ``step`` (its loss) where one is due, else None; ``eval_s``: the
        seconds spent evaluating so far, left out of the rate as the summary leaves them."""
        now = self.clock()
        if now - self.last < self.every_s:
            return None
        self.last, elapsed = now, now - self.t0
        return (f"step {step}/{self.total}: loss {loss:.4f}, {elapsed:.0f} s, "
                f"{(step - self.start) / max(elapsed - eval_s, 1e-9):.2f} training steps/s")


def add_model_args(p: argparse.ArgumentParser, steps: int, eval_every: int, eval_batches: int,
                   out: str, resumable: bool = False) -> None:
    """Options shared with tools/accuracy_study.py (which has its own defaults and no --resume)."""
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON (default: the embedded CPU config)")
    p.add_argument("--local_rank", type=int, default=env.local_rank() or 0, help=argparse.SUPPRESS)
    p.add_argument("--cpu-ranks", type=positive_int, default=2, help="gloo processes to start when not launched")
    p.add_argument("--steps", type=positive_int, default=steps,
                   help="training steps in all" + (", counting those already in the checkpoint "
                                                   "with --resume" if resumable else ""))
    p.add_argument("--eval-every", type=positive_int, default=eval_every,
                   help="steps between validation losses")
    p.add_argument("--eval-batches", type=positive_int, default=eval_batches,
                   help="validation batches per evaluation")
    p.add_argument("--hidden", type=positive_int, default=128, help="the model's hidden size")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks (each with an MoE layer)")
    p.add_argument("--experts", type=positive_int, default=8,
                   help="experts per MoE layer (a multiple of the number of ranks)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--corpus-bytes", type=positive_int, default=4_000_000,
                   help="bytes of the corpus (the Python standard library's sources)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the weights and the batches")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the training batches alone (default: --seed)")
    p.add_argument("--out", type=Path, default=Path(out), help="folder of the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (when stdout is "
                   f"not a terminal: no progress line every {PROGRESS_EVERY_S} s)")


def parse_args(argv=None):
    p = preflight.Parser(description=__doc__)
    add_model_args(p, steps=300, eval_every=100, eval_batches=16, out="out/finetune_moe",
                   resumable=True)
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in <out>/ckpt up to --steps in all")
    p.set_defaults(save_checkpoints=True)  # the recipe always leaves a checkpoint to resume from
    args = p.parse_args(argv)
    check_out(p, args.out, folder=True)  # before the run, not after it
    return args


def world_size(args) -> int:
    """Ranks the run will have: the launcher's, else the gloo processes started here (CPU) or
    this one process (a GPU machine without a launcher)."""
    launched = env.integer("WORLD_SIZE", 0, minimum=0)
    return launched or (1 if torch.cuda.is_available() else args.cpu_ranks)


def check_args(args) -> dict:
    """In the parent, before any rank starts: the arguments, the DeepSpeed config and its
    "moe_flashcomm" section, the MOE_FLASHCOMM_* variables (a problem exits with status 2 and
    one line). Returns the config."""
    preflight.check_env_variables()
    world = world_size(args)
    if args.experts % world:
        preflight.fail(f"--experts {args.experts} must be divisible by the {world} ranks (expert parallel)")
    if args.top_k > args.experts:
        preflight.fail(f"--top-k {args.top_k} is more than --experts {args.experts}")
    # the validation split (5%) needs more than seq + 1 bytes: ByteBatches draws windows of seq + 1
    if args.corpus_bytes < 20 * (args.seq + 2):
        preflight.fail(f"--corpus-bytes {args.corpus_bytes} is too small for --seq {args.seq} "
                       f"(at least {20 * (args.seq + 2)})")
    if args.hidden % ModelConfig.heads:
        preflight.fail(f"--hidden {args.hidden} must be divisible by the model's "
                       f"{ModelConfig.heads} attention heads")
    ckpt = args.out / "ckpt"
    if getattr(args, "resume", False):
        if not (ckpt / "latest").is_file():  # what train() loads
            preflight.fail(f"--resume: no checkpoint under {ckpt} (no DeepSpeed 'latest' file)")
        saved = checkpoint_ranks(ckpt)
        if saved and saved != world:  # (DeepSpeed refuses it on every rank, a traceback each)
            preflight.fail(f"--resume: the checkpoint under {ckpt} was saved by {saved} ranks, "
                           f"this run has {world}; resume with {saved}")
        step = checkpoint_step(ckpt)
        if step is not None and step >= args.steps:  # (nothing to train)
            preflight.fail(f"--resume: the checkpoint under {ckpt} is at step {step}; "
                           f"--steps {args.steps} must be more")
        # (another model's weights fail to load on every rank, a traceback each)
        for field, was in saved_model(args.out, step).items():
            now = getattr(args, field)
            if was != now:
                flag = "--" + field.replace("_", "-")
                preflight.fail(f"--resume: the checkpoint under {ckpt} is of a model with "
                               f"{flag} {was}, this run has {flag} {now}; resume with {was}")
    elif (ckpt / "latest").is_file():
        step = checkpoint_step(ckpt)
        preflight.say(f"warning: {ckpt} holds a checkpoint" + (f" (step {step})" if step else "")
                      + "; this run starts afresh and replaces it (--resume continues it)")
    cfg = preflight.load_ds_config(args.deepspeed_config, DEFAULT_CONFIG)
    section = FlashCommConfig.from_deepspeed_config(cfg)  # (valid: checked above)
    for i, rule in enumerate(section.layers if section else ()):
        past = [idx for idx in rule.index if idx >= args.layers]  # one MoE layer per block
        if past:
            preflight.fail(f"--deepspeed_config {args.deepspeed_config}: moe_flashcomm.layers[{i}]"
                           f".index: {past[0]} is out of range, --layers {args.layers} gives "
                           f"MoE layers 0..{args.layers - 1}")
    return cfg


def checkpoint_ranks(ckpt: Path) -> Optional[int]:
    """Ranks that saved the DeepSpeed checkpoint under ``ckpt``: its ZeRO optimizer files,
    one per rank; None where it has none (no ZeRO) or ``latest`` cannot be read."""
    try:
        tag = (ckpt / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return len(list((ckpt / tag).glob("*zero_pp_rank_*_optim_states.pt"))) or None


def checkpoint_tag(step: int) -> str:
    """The tag train() saves a checkpoint under: its step. DeepSpeed's ``latest`` file names
    it, so check_args reads the step without loading the checkpoint (checkpoint_step)."""
    return f"step{step}"


def saved_model(out: Path, step: Optional[int]) -> dict:
    """The model arguments (``--hidden`` ...) of the run that saved the checkpoint at ``step``
    under ``out``, from its summary.json; empty where that is not known."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        model = summary["model"] if summary["steps"] == step and step is not None else {}
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return {k: model[k] for k in MODEL_ARGS if isinstance(model, dict) and k in model}


# the model's arguments, as ModelConfig names them (the flag: --top-k for top_k)
MODEL_ARGS = ("hidden", "layers", "experts", "top_k", "seq")


def checkpoint_step(ckpt: Path) -> Optional[int]:
    """The step of the DeepSpeed checkpoint under ``ckpt``, from its tag (checkpoint_tag);
    None where ``latest`` cannot be read or names another tag."""
    try:
        tag = (ckpt / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    match = re.fullmatch(r"step(\d+)", tag)
    return int(match[1]) if match else None


def log(msg: str, progress=None) -> None:
    """Rank 0 prints; with a progress bar, through the bar's writer (the line lands above
    the bar instead of inside it)."""
    if progress is not None:
        progress.write(msg, file=sys.stdout)
    else:
        preflight.say(msg)


def evaluate(engine, batches: list[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats) over fixed validation batches."""
    engine.eval()
    with torch.no_grad():
        losses = [engine(b.to(engine.device))[0].item() for b in batches]
    engine.train()
    return sum(losses) / len(losses)


def train(args, ds_config: dict) -> tuple[dict, object, list]:
    """Train on this rank (torch.distributed already initialised).

    Returns (summary, engine, validation batches)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import moe_flashcomm
    from moe_flashcomm.integrations import ExchangeStats

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)  # same initial weights on every rank
    mcfg = ModelConfig(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
                       ep_size=world, seq=args.seq)
    model = MoELM(mcfg)
    params = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters()], "name": "params"})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    layer_stats = moe_flashcomm.enable_deepspeed(engine)  # the one line: reads "moe_flashcomm"

    train_data, val_data = split_corpus(stdlib_corpus(args.corpus_bytes))
    micro = engine.train_micro_batch_size_per_gpu()
    data_seed = args.seed if args.data_seed is None else args.data_seed
    batches = ByteBatches(train_data, micro, args.seq, seed=data_seed + rank)
    val = ByteBatches(val_data, micro, args.seq, seed=args.seed + 10_000 + rank)
    val_batches = [val.next() for _ in range(args.eval_batches)]

    ckpt = args.out / "ckpt"
    start = 0
    if args.resume:
        _, client = engine.load_checkpoint(str(ckpt))
        if client is None:
            raise SystemExit(f"--resume: no checkpoint under {ckpt}")
        start = client["step"]
        if start >= args.steps:  # nothing to train: negative step counts in the summary, and
            # a re-saved checkpoint that claims step --steps with the weights of step `start`.
            # check_args refuses it before any rank starts; this is for a checkpoint whose
            # tag does not name its step (one saved before checkpoint_tag)
            preflight.fail(f"--resume: the checkpoint under {ckpt} is at step {start}; "
                           f"--steps {args.steps} must be more")
        batches.load_state_dict(client["data"][rank])
        log(f"resumed from {ckpt} at step {start}")

    tokens_per_step = micro * args.seq * world
    history, t_start, evaluations, eval_seconds = [], time.perf_counter(), 0, 0.0
    progress = lines = None
    if rank == 0 and not args.no_progress and sys.stdout.isatty():
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc="finetune", unit="step", file=sys.stdout)
    elif rank == 0 and not args.no_progress:
        lines = ProgressLines(start, args.steps)
    for step in range(start + 1, args.steps + 1):
        loss, aux = engine(batches.next().to(engine.device))
        engine.backward(loss + mcfg.aux_loss_weight * aux)
        engine.step()
        history.append({"step": step, "loss": loss.item()})
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
        elif lines and (line := lines.line(step, history[-1]["loss"], eval_seconds)):
            log(line)
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.perf_counter()  # (loss.item() above waited for the step)
            history[-1]["val_loss"] = evaluate(engine, val_batches)
            eval_seconds += time.perf_counter() - t_eval
            evaluations += 1
            log(f"step {step}: train loss {loss.item():.4f}, val loss {history[-1]['val_loss']:.4f}",
                progress)
    if progress:
        progress.close()
    elapsed = time.perf_counter() - t_start
    train_seconds = elapsed - eval_seconds
    steps_run = args.steps - start

    stats = ExchangeStats.total(layer_stats.values())
    if args.save_checkpoints:
        data_states = [None] * world
        torch.distributed.all_gather_object(data_states, batches.state_dict())
        engine.save_checkpoint(str(ckpt), tag=checkpoint_tag(args.steps),
                               client_state={"step": args.steps, "data": data_states})

    val_loss = history[-1].get("val_loss") if history else evaluate(engine, val_batches)
    exchanges = stats.as_dict()
    # the trained gate: share of each layer's capacity slots that hold tokens on the
    # validation batches (skip_padding sends only those; 1.0 where it is off); None where
    # nothing was exchanged (one rank): not measured
    for s in layer_stats.values():
        s.reset()
    evaluate(engine, val_batches)
    filled = {name: s.slot_share("dispatch") if s.slots_stock["dispatch"] else None
              for name, s in layer_stats.items()}
    return {
        "model": vars(mcfg), "patched_layers": len(layer_stats), "world_size": world,
        "steps": args.steps, "steps_run": steps_run,
        "moe_flashcomm": ds_config.get("moe_flashcomm"),
        "final_train_loss": history[-1]["loss"] if history else None,
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
        # tokens/s of the training steps; "seconds" also counts the evaluations, as does
        # "all_to_all_seconds" (their forward exchanges)
        "tokens_per_s": tokens_per_step * steps_run / train_seconds if steps_run else None,
        "seconds": elapsed, "train_seconds": train_seconds, "evaluation_seconds": eval_seconds,
        "all_to_all_seconds": stats.elapsed(), "exchanges": exchanges,
        "evaluation_forwards": evaluations * args.eval_batches, "filled_slot_share": filled,
        "history": history,
    }, engine, val_batches


def init_rank(args) -> None:
    """torch.distributed for this rank: NCCL on GPUs, gloo on CPU."""
    import logging
    import warnings

    if not preflight.is_rank0():  # one copy of each message and warning: rank 0's (errors stay)
        sys.stdout = open(os.devnull, "w")  # before DeepSpeed's logger takes the stream
        warnings.filterwarnings("ignore")
    import deepspeed

    if not preflight.is_rank0():
        deepspeed.utils.logger.setLevel(logging.ERROR)
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def run_rank(args) -> None:
    init_rank(args)
    summary = train(args, args.ds_config)[0]
    if torch.distributed.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        for line in summary_lines(summary):
            log(line)
        log(f"wrote {args.out / 'summary.json'}")


def summary_lines(summary: dict) -> list:
    """What a run prints of its summary: the loss and speed, the exchanges, the filled slots
    (where measured)."""
    lines = [f"val loss {summary['val_loss']:.4f} (ppl {summary['val_perplexity']:.2f}), "
             f"{summary['tokens_per_s'] or 0:.0f} tokens/s, {summary['all_to_all_seconds']:.1f} s of "
             f"{summary['seconds']:.1f} s in all-to-all",
             describe_exchanges(summary["exchanges"], summary["patched_layers"], summary["steps_run"],
                                summary["evaluation_forwards"], summary["world_size"])]
    filled = {name: share for name, share in summary["filled_slot_share"].items() if share is not None}
    if filled:
        lines.append("filled capacity slots, trained gate (validation batches, rank 0): " + ", ".join(
            f"{name} {share:.1%}" for name, share in filled.items()))
    return lines


def describe_exchanges(ex: dict, layers: int, steps: int, eval_forwards: int, world: int) -> str:
    """One line per direction: calls, MB sent per link class against bf16 and the share of
    capacity slots sent; then where the calls come from (``layers``: the MoE layers
    moe_flashcomm runs; evaluation forwards have no backward). One line where none was made."""
    if world == 1:
        return "all-to-all (rank 0): none (one rank: every expert is local, nothing to exchange)"
    if not layers:
        return ("all-to-all (rank 0): not measured (the config enables moe_flashcomm on no MoE "
                "layer: stock DeepSpeed's exchanges are not counted)")
    if not any(ex["calls"].values()):
        return "all-to-all (rank 0): none"
    lines = ["all-to-all (rank 0)   calls  quantized   seconds   MB sent (intra / inter node)   vs bf16"
             "   slots sent"]
    for d, calls in ex["calls"].items():
        sent, bf16 = ex["bytes_sent"][d], ex["bf16_bytes"][d]
        ratio = sum(bf16.values()) / max(1, sum(sent.values()))
        slots = ex["slots_sent"][d] / max(1, ex["slots_stock"][d])
        lines.append(f"  {d:<18} {calls:>6} {ex['quantized'][d]:>10} {ex['seconds'][d]:>9.2f}   "
                     f"{sent['intra_node'] / 1e6:>10.2f} / {sent['inter_node'] / 1e6:<10.2f}      {ratio:.2f}x less"
                     f"   {slots:.1%}")
    lines.append(f"  calls per direction = {layers} MoE layers with moe_flashcomm x (forward: {steps} training steps + "
                 f"{eval_forwards} evaluation batches; backward: the {steps} steps only)")
    return "\n".join(lines)


def _cpu_worker(rank: int, world: int, port: int, fn, args) -> None:  # env: set for the rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    fn(args)


def single_process() -> None:
    """The launcher's variables for this process as the one rank (a GPU machine without a
    launcher), where no launcher set them: without them DeepSpeed looks for an MPI launch
    (mpi4py, not a dependency)."""
    if env.rank() is None:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
            os.environ.setdefault(name, value)


def launch(fn, args) -> None:
    """Run ``fn(args)`` on every rank: directly under the deepspeed launcher / torchrun or, as
    the one rank, on a GPU machine; else in ``args.cpu_ranks`` gloo processes started here."""
    if env.rank() is not None or torch.cuda.is_available():
        single_process()
        fn(args)
        return
    import torch.multiprocessing as mp

    port = free_port()
    log(f"no GPU and no launcher: starting {args.cpu_ranks} gloo processes")
    try:
        mp.spawn(_cpu_worker, args=(args.cpu_ranks, port, fn, args), nprocs=args.cpu_ranks, join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code != preflight.EXIT_USAGE:
            raise
        raise SystemExit(preflight.EXIT_USAGE) from None  # rank 0 said why (preflight.fail)


def start(fn, args) -> None:
    """Check everything that can be checked before a rank starts, then run ``fn`` on every rank."""
    args.ds_config = check_args(args)
    preflight.say(preflight.codecs_line(args.ds_config))
    preflight.check_extension_build(cpu_run=env.rank() is None and not torch.cuda.is_available())
    launch(fn, args)


def main(argv=None) -> None:
    start(run_rank, parse_args(argv))


if __name__ == "__main__":
    main()
