"""Search fitness: how far a candidate's next-token distribution is from the dense model's.

- `kl`: full-vocabulary KL(P_dense || P_candidate) per token, dense log-probs computed once.
- `topk_kl`: the KL between the two distributions coarse-grained to the dense model's top-k tokens plus
  one "rest of the vocabulary" bucket. Memory is k log-probs + k indices per token instead of the whole
  vocabulary (128K for Llama 3); it never exceeds the full KL and equals it at k = vocabulary size.
- `ppl`: the candidate's own perplexity on the fitness tokens (no teacher needed).
Lower is better for all three.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.run.distributed import device_of
from pipeline.train import kl_per_token, next_token_loss


@dataclass
class Teacher:
    kind: str
    logprobs: torch.Tensor | None = None  # kl: (n, seq, vocab); topk_kl: (n, seq, k)
    index: torch.Tensor | None = None  # topk_kl: (n, seq, k) token ids

    def subset(self, rows: torch.Tensor | slice) -> Teacher:
        """The targets of some rows: a view for a slice, a copy for a tensor of row indices."""
        return Teacher(self.kind, *(t[rows] if t is not None else None for t in (self.logprobs, self.index)))

    def to(self, device: torch.device) -> Teacher:
        return Teacher(self.kind, *(t.to(device) if t is not None else None for t in (self.logprobs, self.index)))


def teacher_bytes(kind: str, tokens: int, vocab: int, topk: int) -> int:
    """Memory the dense targets take, to print before computing them."""
    return {"kl": tokens * vocab * 4, "topk_kl": tokens * topk * (4 + 4), "ppl": 0}[kind]


@torch.no_grad()
def teacher_targets(model, sequences: torch.Tensor, batch_size: int, kind: str, topk: int = 0) -> Teacher:
    if kind == "ppl":
        return Teacher(kind)
    parts, index = [], []
    device = device_of(model)
    for batch in torch.split(sequences, batch_size):  # targets are kept in CPU memory
        logprobs = F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1).cpu()
        if kind == "topk_kl":
            values, idx = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
            parts.append(values)
            index.append(idx.to(torch.int32))
        else:
            parts.append(logprobs)
    return Teacher(kind, torch.cat(parts), torch.cat(index) if index else None)


def topk_kl_per_token(teacher_topk: torch.Tensor, index: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL over the top-k tokens plus one tail bucket: sum_i p_i log(p_i/q_i) + p_rest log(p_rest/q_rest)."""
    student = F.log_softmax(student_logits.float(), dim=-1).gather(-1, index.long())
    p = teacher_topk.exp()
    kl = (p * (teacher_topk - student)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - student.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest))
    return kl + rest


@torch.no_grad()
def fitness(model, sequences: torch.Tensor, teacher: Teacher, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = device_of(model)
    for start in range(0, len(sequences), batch_size):
        rows = slice(start, start + batch_size)  # a view: copying full-vocabulary targets costs more than scoring
        batch, target = sequences[rows].to(device), teacher.subset(rows).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        if teacher.kind == "ppl":
            values = next_token_loss(logits, batch, reduction="none")
        elif teacher.kind == "topk_kl":
            values = topk_kl_per_token(target.logprobs, target.index, logits)
        else:
            values = kl_per_token(target.logprobs, logits)
        total += float(values.sum())
        count += values.numel()
    model.train(was_training)
    mean = total / count
    return math.exp(mean) if teacher.kind == "ppl" else mean
