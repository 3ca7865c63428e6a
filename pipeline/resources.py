"""What a stage will need in memory and on disk, printed before it starts, and a clear refusal
when the disk cannot hold its output (instead of dying hours later with a half-written file)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pipeline.modeling import Structure
from pipeline.obs import removal_counts

GiB = 2**30


class ResourceError(RuntimeError):
    """Not enough disk (or memory) for what the params ask."""


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def available_memory() -> int | None:
    """Bytes of RAM free now (Linux), None where unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_disk(path: Path, need: int, what: str) -> None:
    free = free_disk(path)
    if need > free:
        raise ResourceError(f"{what} needs about {gib(need)} on the file system of '{path}', which has {gib(free)} "
                            "free: free some space (e.g. `dvc gc`, old .darwinlm/ work) or lower the sizes")


def database_output_bytes(structure: Structure, levels: int, weight_bytes: int, per_unit: dict[str, int]) -> int:
    """Size of the compact database: every level's corrected output projection on its kept columns."""
    total = 0
    for module in ("attn", "mlp"):
        units = structure.units(module) // per_unit[module]
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


def training_bytes(parameters: int, weight_bytes: int) -> int:
    """Weights, gradients and AdamW's two fp32 moments of a model being trained."""
    return parameters * (2 * weight_bytes + 8)
