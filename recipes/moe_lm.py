"""A small byte-level MoE language model built from DeepSpeed MoE layers, and its data: the
Python standard library's own source files, present on every machine (no downloads).

Shared by recipes/finetune_moe.py, tools/accuracy_study.py and the inference benchmark.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- data -------------------------------------------------------------------------------------
def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the stdlib's .py files (sorted paths: identical on every
    rank and every run) as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 1024:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


class ByteBatches:
    """Random [batch, seq+1] windows of a byte corpus; deterministic per (seed, rank)."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int):
        if len(data) <= seq + 1:
            raise ValueError(f"corpus of {len(data)} bytes is shorter than seq+1 = {seq + 1}")
        self.data, self.batch, self.seq = data.long(), batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        start = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=self.gen)
        return torch.stack([self.data[s:s + self.seq + 1] for s in start.tolist()])

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def split_corpus(data: torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


# ---- model --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    ep_size: int = 2
    seq: int = 128
    capacity_factor: float = 1.25
    drop_tokens: bool = True
    use_tutel: bool = False
    aux_loss_weight: float = 0.01
    # DeepSpeed samples top-2's second expert with Gumbel noise even in eval mode; off, the
    # gating is deterministic and codec comparisons measure the codec alone.
    second_expert_sampling: bool = False


class Expert(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, batch_first=True)
        self.moe = MoE(hidden_size=cfg.hidden, expert=Expert(cfg.hidden), num_experts=cfg.experts,
                       ep_size=cfg.ep_size, k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                       eval_capacity_factor=cfg.capacity_factor, drop_tokens=cfg.drop_tokens,
                       use_tutel=cfg.use_tutel, use_rts=False,
                       top2_2nd_expert_sampling=cfg.second_expert_sampling)

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        out, l_aux, _ = self.moe(self.ln2(x))
        return x + out, l_aux


class MoELM(nn.Module):
    """Byte-level decoder: embeddings, [attention + DeepSpeed MoE FFN] x layers, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(256, cfg.hidden)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 256)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, S+1] bytes -> (next-byte cross-entropy, total auxiliary gate loss)."""
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        S = inp.shape[1]
        x = self.embed(inp) + self.pos[:S]
        mask = torch.triu(torch.full((S, S), float("-inf"), device=x.device), 1)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, l_aux = block(x, mask)
            aux = aux + l_aux
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.reshape(-1, 256).float(), tgt.reshape(-1)), aux
