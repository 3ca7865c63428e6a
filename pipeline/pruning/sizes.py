"""How large the layer database and its build are, computed from the model's shape before any work,
so a stage can print its needs and refuse a disk that cannot hold its output."""
from __future__ import annotations

import torch

from pipeline.model.structure import Structure
from pipeline.pruning.obs import removal_counts


def database_output_bytes(structure: Structure, levels: int, weight_bytes: int, per_unit: dict[str, int]) -> int:
    """Size of the compact database: every level's corrected output projection on its kept columns."""
    total = 0
    for module in ("attn", "mlp"):
        units = structure.unit_count(module) // per_unit[module]
        cols_per_unit = structure.unit_size(module) * per_unit[module]
        kept_cols = sum((units - removed) * cols_per_unit for removed in removal_counts(units, levels))
        total += structure.num_layers * kept_cols * (structure.hidden_size * weight_bytes + 8)
    return total


def database_working_bytes(structure: Structure, hessian_dtype: torch.dtype) -> dict[str, int]:
    """Per process: the two Hessians a rank holds for one block at a time, and OBS's peak (the
    Hessian, its inverse and the weight being corrected, for the widest module)."""
    attn_cols = structure.num_heads * structure.head_dim
    width = max(attn_cols, structure.intermediate_size)
    h = hessian_dtype.itemsize
    return {"hessians": 2 * (attn_cols**2 + structure.intermediate_size**2) * h,
            "obs": (2 * width**2 + structure.hidden_size * width) * h}
