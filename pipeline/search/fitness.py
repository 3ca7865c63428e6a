"""Search fitness: how far a candidate's next-token distribution is from the dense model's.

- `kl`: full-vocabulary KL(P_dense || P_candidate) per token. The dense side is computed once: its
  probabilities p and each token's sum p log p, so that a candidate with logits z costs one dot product and
  one logsumexp, KL = sum p log p - p.z + logsumexp(z) (p sums to 1), 40% less than through log_softmax.
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
from pipeline.train import next_token_loss


@dataclass
class Teacher:
    kind: str
    values: torch.Tensor | None = None  # kl: probabilities (n, seq, vocab); topk_kl: top-k log-probs (n, seq, k)
    index: torch.Tensor | None = None  # topk_kl: (n, seq, k) token ids
    plogp: torch.Tensor | None = None  # kl: sum of p log p over the vocabulary (n, seq)

    def _map(self, fn) -> Teacher:
        return Teacher(self.kind, *(fn(t) if t is not None else None for t in (self.values, self.index, self.plogp)))

    def subset(self, rows: torch.Tensor | slice) -> Teacher:
        """The targets of some rows: a view for a slice, a copy for a tensor of row indices."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device) -> Teacher:
        return self._map(lambda t: t.to(device))


def teacher_bytes(kind: str, tokens: int, vocab: int, topk: int) -> int:
    """Memory the dense targets take, to print before computing them."""
    return {"kl": tokens * vocab * 4, "topk_kl": tokens * topk * (4 + 4), "ppl": 0}[kind]


@torch.no_grad()
def teacher_targets(model, sequences: torch.Tensor, batch_size: int, kind: str, topk: int = 0) -> Teacher:
    if kind == "ppl":
        return Teacher(kind)
    parts, index, plogp = [], [], []
    device = device_of(model)
    for batch in torch.split(sequences, batch_size):  # targets are kept in CPU memory
        logprobs = F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1).cpu()
        if kind == "topk_kl":
            values, idx = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
            parts.append(values)
            index.append(idx.to(torch.int32))
        else:
            probs = logprobs.exp()
            parts.append(probs)
            plogp.append(torch.linalg.vecdot(probs, logprobs))
    joined = [torch.cat(t) if t else None for t in (parts, index, plogp)]
    return Teacher(kind, *joined)


def kl_from_probs(probs: torch.Tensor, plogp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position from the teacher's probabilities and sum p log p, and the student's logits."""
    logits = student_logits.float()
    return plogp - torch.linalg.vecdot(probs, logits) + torch.logsumexp(logits, dim=-1)


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
            values = topk_kl_per_token(target.values, target.index, logits)
        else:
            values = kl_from_probs(target.values, target.plogp, logits)
        total += float(values.sum())
        count += values.numel()
    model.train(was_training)
    mean = total / count
    return math.exp(mean) if teacher.kind == "ppl" else mean
