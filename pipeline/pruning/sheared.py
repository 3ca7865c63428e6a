"""Sheared-LLaMA's learned structured pruning (Xia et al. 2023; princeton-nlp/LLM-Shearing, `l0_module.py`):
hard-concrete masks (Louizos et al. 2018) on query heads, MLP neurons and whole attention / MLP sublayers,
trained with the model's weights on the causal-LM loss plus a Lagrangian that drives the expected
attention+MLP parameter count to a target:

    loss = LM + l1 * (s - t) + l2 * (s - t)^2,   s = 1 - E[params] / dense, t the target removed share

(t ramps linearly from 0 over the first `warmup` steps; l1, l2 are maximised, the masks and weights minimised).
A mask z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (1.1 + 0.1) - 0.1, 0, 1), u ~ U(0, 1),
beta = 2/3; P(z != 0) = 1 - sigmoid(log(0.1/1.1) * beta - log_alpha). log_alpha starts at 5 (nearly all kept)
and is clipped to [log 0.01, log 100] before each use, as in the reference.

GQA: a key/value head is present when at least one of its query heads is, so its expected share is
P(sublayer) * (1 - prod over its query heads of (1 - P(head))). The masks act on the inputs of o_proj (each
head's columns, times the attention sublayer's mask) and down_proj (each neuron, times the MLP sublayer's
mask), which for these bias-free projections is the reference's masking of head outputs and intermediate
activations.

Pure math and the mask module here; the training loop is `shear`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.structure import ATTN, MLP, Structure, output_projection, unit_indices
from pipeline.train import epoch_rows, next_token_loss

LIMIT_LOW, LIMIT_HIGH, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
INITIAL_LOG_ALPHA = 5.0
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
SHARPNESS = 0.8  # the reference's deterministic soft mask: sigmoid(log_alpha / beta * 0.8)
MASKS = ("head", "neuron", "attn_layer", "mlp_layer")


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) of a hard-concrete mask: 1 - its CDF at 0."""
    at_zero = math.log(-LIMIT_LOW / (LIMIT_HIGH - LIMIT_LOW)) - math.log(1 + LIMIT_LOW / (LIMIT_HIGH - LIMIT_LOW))
    return 1 - torch.sigmoid(at_zero * BETA - log_alpha).clamp(EPS, 1 - EPS)


def sample_mask(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0, 1)


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """The reference's final mask of one row of units: soft values sigmoid(log_alpha / beta * 0.8), with the
    round(expected number of zeros) lowest set to 0."""
    soft = torch.sigmoid(log_alpha / BETA * SHARPNESS)
    zeros = round(float(log_alpha.numel() - keep_probability(log_alpha).sum()))
    if zeros > 0:
        soft = soft.clone()
        soft[torch.topk(soft, zeros, largest=False).indices] = 0
    return soft


class ShearedMasks(nn.Module):
    """log_alpha of every mask: head (layers x heads), neuron (layers x intermediate), attn_layer and
    mlp_layer (layers)."""

    def __init__(self, structure: Structure, seed: int = 0):
        super().__init__()
        s = self.structure = structure
        g = torch.Generator().manual_seed(seed)
        shapes = {"head": (s.num_layers, s.num_heads), "neuron": (s.num_layers, s.intermediate_size),
                  "attn_layer": (s.num_layers,), "mlp_layer": (s.num_layers,)}
        start = {name: INITIAL_LOG_ALPHA + 0.01 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
        self.log_alpha = nn.ParameterDict({name: nn.Parameter(value) for name, value in start.items()})

    def constrain(self) -> None:
        with torch.no_grad():
            for p in self.log_alpha.values():
                p.clamp_(*LOG_ALPHA_RANGE)

    def expected_params(self) -> torch.Tensor:
        """E[attention+MLP parameters] under the masks (key/value heads counted while any query head of theirs
        is present), differentiable in log_alpha."""
        s = self.structure
        p = {name: keep_probability(a) for name, a in self.log_alpha.items()}
        per_head = s.hidden_size * s.head_dim  # one head's rows of q (or k, or v) or columns of o
        query = p["head"].sum(1) * 2 * per_head
        kv_present = 1 - (1 - p["head"]).reshape(s.num_layers, s.num_kv_heads, s.group_size).prod(-1)
        attention = p["attn_layer"] * (query + kv_present.sum(1) * 2 * per_head)
        mlp = p["mlp_layer"] * p["neuron"].sum(1) * s.mlp_params(1)
        return (attention + mlp).sum()

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {name: sample_mask(a, generator) for name, a in self.log_alpha.items()}

    def deterministic(self) -> dict[str, torch.Tensor]:
        """The final masks: per layer for heads and neurons, over the layers for the sublayer masks."""
        with torch.no_grad():
            out = {name: torch.stack([deterministic_mask(row) for row in self.log_alpha[name]])
                   for name in ("head", "neuron")}
            out.update({name: deterministic_mask(self.log_alpha[name]) for name in ("attn_layer", "mlp_layer")})
        return out


def column_scales(structure: Structure, z: dict) -> dict:
    """{(layer, module): the factor of each input column of its output projection} under masks `z`."""
    s = structure
    out = {}
    for i in range(s.num_layers):
        out[(i, ATTN)] = (z["head"][i] * z["attn_layer"][i]).repeat_interleave(s.head_dim)
        out[(i, MLP)] = z["neuron"][i] * z["mlp_layer"][i]
    return out


class MaskedModel:
    """Scales the output projections' inputs of `model` by the current masks (forward pre-hooks)."""

    def __init__(self, model, structure: Structure):
        self.structure, self.scales = structure, {}
        self.hooks = [output_projection(model, i, m).register_forward_pre_hook(self._hook((i, m)))
                      for i in range(structure.num_layers) for m in (ATTN, MLP)]

    def _hook(self, key):
        def scale(_module, args):
            return (args[0] * self.scales[key].to(args[0].dtype),) + args[1:]
        return scale

    def set(self, z: dict) -> None:
        self.scales = column_scales(self.structure, z)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def kept_and_weights(model, structure: Structure, z: dict) -> tuple[dict, dict]:
    """The physically pruned model's choice under final masks `z`: kept query heads / neurons per layer (a
    unit with a zero mask, or in a sublayer whose mask is zero, is gone) and `materialize`'s weights, the
    output projections' kept columns scaled by their mask values (folded in, so the pruned model computes
    what the masked model computes)."""
    scales = column_scales(structure, z)
    kept, weights = {}, {}
    for i in range(structure.num_layers):
        for module, name in ((ATTN, "head"), (MLP, "neuron")):
            layer_on = float(z["attn_layer" if module == ATTN else "mlp_layer"][i]) > 0
            units = torch.nonzero(z[name][i] > 0).flatten() if layer_on else torch.zeros(0, dtype=torch.long)
            cols = unit_indices(units, structure.unit_size(module))
            weight = output_projection(model, i, module).weight.detach()[:, cols] * scales[(i, module)][cols].to(
                torch.float32)
            kept[(i, module)] = units
            weights[(i, module)] = (units, weight.to(output_projection(model, i, module).weight.dtype), None)
    return kept, weights


@dataclass
class ShearResult:
    masks: dict  # the final masks
    steps: int
    tokens: int  # training tokens the masks (and weights) saw: charged to the method
    expected_removed: list[float]  # 1 - E[params] / dense per step
    target_removed: list[float]
    losses: list[float]


def shear(model, masks: ShearedMasks, sequences: torch.Tensor, target_params: int, *, steps: int, batch_size: int,
          lr: float, mask_lr: float, warmup_steps: int, seed: int = 0, on_step=None) -> ShearResult:
    """Train `model`'s weights (AdamW, `lr`) and the masks (AdamW, `mask_lr`) on the LM loss plus the Lagrangian
    towards `target_params`; l1, l2 by gradient ascent at `mask_lr`. The model keeps its trained weights."""
    s = masks.structure
    dense = s.dense_prunable_params
    goal = 1 - target_params / dense
    lambdas = nn.Parameter(torch.zeros(2))
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": weights, "lr": lr, "weight_decay": 0.0},
                                   {"params": list(masks.parameters()), "lr": mask_lr, "weight_decay": 0.0}],
                                  betas=(0.9, 0.95))
    ascent = torch.optim.SGD([lambdas], lr=mask_lr)
    masked = MaskedModel(model, s)
    generator = torch.Generator().manual_seed(seed)
    expected, targets, losses = [], [], []
    model.train()
    try:
        for step in range(steps):
            masks.constrain()
            target = goal * min(1.0, step / warmup_steps) if warmup_steps else goal
            masked.set(masks.sample(generator))
            batch = sequences[epoch_rows(step, batch_size, len(sequences), seed)]
            lm = next_token_loss(model(batch).logits, batch)
            removed = 1 - masks.expected_params() / dense
            lagrangian = lambdas[0] * (removed - target) + lambdas[1] * (removed - target) ** 2
            optimizer.zero_grad(set_to_none=True)
            ascent.zero_grad(set_to_none=True)
            (lm + lagrangian).backward()
            lambdas.grad.neg_()  # maximise over the multipliers
            optimizer.step()
            ascent.step()
            expected.append(float(removed.detach()))
            targets.append(target)
            losses.append(float(lm.detach()))
            if on_step:
                on_step(step, {"loss": losses[-1], "expected_removed": expected[-1], "target_removed": target})
    finally:
        masked.remove()
    model.eval()
    masks.constrain()
    return ShearResult(masks.deterministic(), steps, steps * batch_size * sequences.shape[1], expected, targets,
                       losses)


def size_under(structure: Structure, z: dict) -> int:
    """Attention+MLP parameters of the pruned model the masks `z` give (orphaned key/value heads removed)."""
    s, total = structure, 0
    z = {k: v.detach() for k, v in z.items()}
    for i in range(s.num_layers):
        heads = torch.nonzero(z["head"][i] > 0).flatten().tolist() if float(z["attn_layer"][i]) > 0 else []
        neurons = int((z["neuron"][i] > 0).sum()) if float(z["mlp_layer"][i]) > 0 else 0
        total += s.kept_attention_params(heads) + s.mlp_params(neurons)
    return total


def fit_to_size(structure: Structure, z: dict, log_alpha: dict, target: int, slack: float) -> tuple[dict, int]:
    """Final masks within `slack` of `target`: the reference's rounding lands near the target, not within a
    tolerance, so neurons of the MLP sublayers still present are added back (highest log_alpha first, at
    their soft value) or removed (lowest soft value first) until it does. Returns (masks, neurons moved)."""
    z = {k: v.clone() for k, v in z.items()}
    soft = torch.sigmoid(log_alpha["neuron"].detach() / BETA * SHARPNESS)
    live = (z["mlp_layer"] > 0).unsqueeze(1).expand_as(z["neuron"])
    moved = 0
    while (size := size_under(structure, z)) > target + slack or size < target - slack:
        removing = size > target + slack
        candidates = live & ((z["neuron"] > 0) if removing else (z["neuron"] == 0))
        if not candidates.any():
            break
        values = torch.where(candidates, soft if removing else log_alpha["neuron"].detach(),
                             torch.full_like(soft, math.inf if removing else -math.inf))
        flat = int(values.argmin() if removing else values.argmax())
        layer, neuron = divmod(flat, z["neuron"].shape[1])
        z["neuron"][layer, neuron] = 0 if removing else soft[layer, neuron]
        moved += 1
    return z, moved
