"""Causal-LM training with optional distillation from a teacher (KL on logits)."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.outputs import atomic_file


def kl_per_token(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher || P_student) for each position: (..., V) -> (...)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def train_causal_lm(model, sequences: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                    weight_decay: float = 0.0, warmup_steps: int = 0, seed: int = 0,
                    teacher=None, distill: float = 0.0, temperature: float = 1.0, constant_lr: bool = False,
                    on_step: Callable[[int, dict], None] | None = None,
                    checkpoint: Path | None = None, checkpoint_every: int = 0) -> list[float]:
    """AdamW with linear warm-up and cosine decay (or a constant rate) over `steps` batches drawn
    (seeded) from `sequences`.

    loss = (1 - distill) * causal-LM + distill * T^2 * KL(teacher || student) at temperature T.
    With `checkpoint`, the whole training state (weights, optimiser, schedule, data order, losses)
    is saved there every `checkpoint_every` steps, and a call that finds it continues from it: an
    interrupted run resumed this way ends with the same weights as an uninterrupted one.
    Returns the loss of every step.
    """
    if steps == 0:
        return []
    if distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs a teacher model")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if constant_lr else _lr_factor(s, steps, warmup_steps))
    was_training = model.training
    model.train()
    losses, start = [], 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        losses, start = state["losses"], state["step"]
    for step in range(start, steps):
        batch = sequences[torch.randint(len(sequences), (batch_size,), generator=gen)].to(device)
        logits = model(input_ids=batch).logits
        loss = causal_lm_loss(logits, batch)
        parts = {"ce": loss.item()}
        if distill > 0:
            with torch.no_grad():
                teacher_lp = F.log_softmax(teacher(input_ids=batch).logits.float() / temperature, dim=-1)
            kd = kl_per_token(teacher_lp, logits / temperature).mean() * temperature**2
            loss = (1 - distill) * loss + distill * kd
            parts["kd"] = kd.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            with atomic_file(checkpoint) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "generator": gen.get_state(),
                            "losses": losses, "step": step + 1}, tmp)
        if on_step is not None:
            on_step(step, {"loss": losses[-1], "lr": schedule.get_last_lr()[0], **parts})
    model.train(was_training)
    return losses


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
