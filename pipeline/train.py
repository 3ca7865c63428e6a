"""Causal-LM training with optional distillation from a teacher (KL on logits)."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.run.distributed import SINGLE, Group, device_of
from pipeline.run.outputs import atomic_file


def kl_per_token(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher || P_student) for each position: (..., V) -> (...)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token (the causal-LM loss), in fp32;
    `reduction` as in `F.cross_entropy` ("none": one value per predicted position)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                           reduction=reduction)


def train_causal_lm(model, sequences: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                    weight_decay: float = 0.0, warmup_steps: int = 0, seed: int = 0,
                    teacher=None, distill: float = 0.0, temperature: float = 1.0, constant_lr: bool = False,
                    on_step: Callable[[int, dict], None] | None = None,
                    checkpoint: Path | None = None, checkpoint_every: int = 0,
                    group: Group = SINGLE, fsdp: bool = False) -> list[float]:
    """AdamW with linear warm-up and cosine decay (or a constant rate) over `steps` batches that walk
    `sequences` in shuffled epochs (seeded; no sequence repeats before every one has been seen).

    A bf16/fp16 model trains on fp32 master weights with fp32 optimiser state, its forward pass in
    autocast at the model's dtype; the trained weights are cast back at the end. (Stepping bf16
    weights directly loses most updates: at lr 1e-5 a step is below half a bf16 ulp of a typical weight.)

    loss = (1 - distill) * causal-LM + distill * T^2 * KL(teacher || student) at temperature T.
    With `checkpoint`, the whole training state (weights, optimiser, schedule, data order, losses)
    is saved there every `checkpoint_every` steps, and a call that finds it continues from it: an
    interrupted run resumed this way ends with the same weights as an uninterrupted one.

    With several processes every rank draws the same batch and trains on its share of the rows;
    gradients are averaged (DDP, or FSDP with `fsdp`: weights, gradients and optimiser state
    sharded), which equals one process training on the whole batch. With FSDP `model` is sharded
    in place: read its weights with `full_state_dict`. Returns the (global) loss of every step.
    """
    if steps == 0:
        return []
    if distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs a teacher model")
    device = device_of(model)
    low_precision = _low_precision_dtype(model)
    if low_precision is not None:
        _cast_parameters(model, torch.float32)
    trained = _parallel(model, group, fsdp)
    # fused: one kernel per step for all tensors (on CPUs too), 10% of a demo search generation; FSDP's
    # sharded parameters take the multi-tensor path instead.
    kernel = {"foreach": True} if fsdp and group.world > 1 else {"fused": True}
    # listed once: walking the module tree every step costs ~2% of a search candidate's training
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, **kernel,
                                  weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if constant_lr else _lr_factor(s, steps, warmup_steps))
    was_training = model.training
    model.train()
    losses, start = [], 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        _load_training_state(model, optimizer, state, fsdp)
        schedule.load_state_dict(state["schedule"])
        losses, start = state["losses"], state["step"]
    autocast = torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None)
    for step in range(start, steps):
        rows = epoch_rows(step, batch_size, len(sequences), seed)
        batch = sequences[group.shard(rows)].to(device)
        with autocast:
            logits = trained(input_ids=batch, use_cache=False).logits
        loss = next_token_loss(logits, batch)
        parts = {"ce": loss.item()}
        if distill > 0:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits.float()
                teacher_lp = F.log_softmax(teacher_logits / temperature, dim=-1)
            kd = kl_per_token(teacher_lp, logits / temperature).mean() * temperature**2
            loss = (1 - distill) * loss + distill * kd
            parts["kd"] = kd.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        optimizer.step()
        schedule.step()
        parts = _mean_over_ranks({"loss": loss.item(), **parts}, group)
        losses.append(parts.pop("loss"))
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            weights, optimizer_state = _training_state(model, optimizer, fsdp)
            if group.is_main:
                with atomic_file(checkpoint) as tmp:
                    torch.save({"model": weights, "optimizer": optimizer_state, "schedule": schedule.state_dict(),
                                "losses": losses, "step": step + 1}, tmp)
        if on_step is not None:
            on_step(step, {"loss": losses[-1], "lr": schedule.get_last_lr()[0], **parts})
    model.train(was_training)
    if low_precision is not None:
        _cast_parameters(model, low_precision)
    return losses


def epoch_rows(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The rows of batch `step`: consecutive slices of one seeded permutation of range(n) per epoch,
    a batch that crosses an epoch's end continuing in the next one. A pure function of its arguments,
    so a resumed run draws exactly the batches an uninterrupted one would."""
    first, last = step * batch_size, (step + 1) * batch_size
    epochs = range(first // n, (last - 1) // n + 1)
    order = torch.cat([_epoch_order(n, seed, e) for e in epochs])
    offset = epochs[0] * n
    return order[first - offset:last - offset]


@functools.lru_cache(maxsize=4)  # a permutation is O(n): draw each epoch's once, not once per step
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _low_precision_dtype(model) -> torch.dtype | None:
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _cast_parameters(model, dtype: torch.dtype) -> None:
    """Parameters only: buffers such as RoPE frequencies stay in the dtype the model keeps them in."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def _parallel(model, group: Group, fsdp: bool):
    """The module to call for training: the model itself, wrapped in DDP, or sharded in place (FSDP)."""
    if group.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    # Removed attention/MLP modules hold no parameters: every parameter gets a gradient.
    return DistributedDataParallel(model, device_ids=[group.device] if group.device.type == "cuda" else None)


def _mean_over_ranks(values: dict[str, float], group: Group) -> dict[str, float]:
    if group.world == 1:
        return values
    totals = group.all_reduce_sum_(torch.tensor(list(values.values()), dtype=torch.float64, device=group.device))
    return {k: float(v) / group.world for k, v in zip(values, totals)}


def _training_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Full (unsharded) weights and optimiser state; with FSDP a collective call on every rank."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    return full_state_dict(model, fsdp), _unsharded(optimizer.state_dict())


def _load_training_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    model.load_state_dict({name: _shard_like(state["model"][name], ref) for name, ref in model.state_dict().items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = state["optimizer"]["state"]
    for index, values in moments.items():
        param = params[int(index)]
        moments[index] = {k: _shard_like(v, param) if v.shape == param.shape else v for k, v in values.items()}
    optimizer.load_state_dict(state["optimizer"])


def full_state_dict(model, fsdp: bool) -> dict:
    """The trained weights as ordinary tensors (gathered from the shards with FSDP; every rank must call)."""
    return _unsharded(model.state_dict()) if fsdp else model.state_dict()


def _unsharded(obj):
    """A (nested) state dict with every sharded tensor gathered whole onto the CPU."""
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: _unsharded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unsharded(v) for v in obj]
    return obj


def _shard_like(full: torch.Tensor, reference):
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(reference, DTensor):
        return full
    return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
