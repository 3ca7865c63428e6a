"""Measurements of a model on held-out tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.modeling import device_of


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every predicted position of `sequences`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = device_of(model)
    for batch in torch.split(sequences, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
