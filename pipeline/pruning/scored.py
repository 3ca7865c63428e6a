"""Layer databases of the neighbouring methods (`database.method`: magnitude, wanda_sp, flap), in the same
format as the OBS database (`database.py`), so the search, the uniform baseline, finetune, export and
evaluate run on any of them unchanged.

Each (layer, module) ranks its units once by the method's score (`scores.py`); level k removes the
round(k/K * units) lowest-scoring ones. The kept columns of the output projection are the dense ones,
uncorrected. FLAP also stores each level's output bias (`bias.{k}`: the dense bias, if any, plus the
removed channels' mean contribution), and every method stores its unit scores (`score`) for the
allocation baselines. The per-level loss in the manifest is the removed units' summed score.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.model.structure import ATTN, MODULE_TYPES, Structure, output_projection, unit_indices
from pipeline.pruning.activation_stats import CalibrationStats
from pipeline.pruning.database import check_units, module_file, obs_unit_heads, write_manifest
from pipeline.pruning.obs import removal_counts
from pipeline.pruning.scores import column_scores, compensation_bias, removal_order, unit_scores
from pipeline.run.outputs import atomic_file


def build_scored_database(model, structure: Structure, method: str, stats: CalibrationStats | None, levels: int,
                          out_dir: Path, identity: dict, *, attn_unit: str = "query", mlp_unit: int = 1,
                          on_module=None) -> dict:
    """Write the database of `method` into `out_dir` and return its manifest. `stats` (the calibration
    statistics of every projection's input) is needed by wanda_sp and flap, not by magnitude."""
    check_units(structure, attn_unit, mlp_unit)
    if method != "magnitude" and stats is None:
        raise ValueError(f"the {method} database needs calibration statistics")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for layer in range(structure.num_layers):
        for module in MODULE_TYPES:
            proj = output_projection(model, layer, module)
            channel = stats.channels[(layer, module)] if stats is not None else None
            cols_per_unit = structure.unit_size(module) * obs_unit_heads(structure, module, attn_unit, mlp_unit)
            columns = column_scores(method, proj.weight, channel, attention=module == ATTN)
            scores = unit_scores(columns, cols_per_unit).cpu()
            losses = _write_module(out_dir / module_file(layer, module), proj, scores, cols_per_unit,
                                   removal_counts(len(scores), levels),
                                   channel.mean if method == "flap" else None)
            if on_module:
                on_module(layer, module, losses)
    return write_manifest(out_dir, structure, levels, attn_unit, mlp_unit, identity, {"method": method})


@torch.no_grad()
def _write_module(path: Path, proj: torch.nn.Linear, scores: torch.Tensor, cols_per_unit: int, counts: list[int],
                  mean: torch.Tensor | None) -> list[float]:
    weight = proj.weight.detach().cpu()
    order = removal_order(scores)
    tensors, losses = {"score": scores.to(torch.float64)}, []
    for k, removed in enumerate(counts):
        kept = order[removed:].sort().values
        tensors[f"kept.{k}"] = kept.to(torch.int64)
        tensors[f"weight.{k}"] = weight[:, unit_indices(kept, cols_per_unit)].contiguous()
        if mean is not None:
            bias = compensation_bias(weight, mean, unit_indices(order[:removed], cols_per_unit))
            if proj.bias is not None:
                bias = bias + proj.bias.detach().cpu().to(torch.float64)
            tensors[f"bias.{k}"] = bias.to(weight.dtype)
        losses.append(float(scores[order[:removed]].sum()))
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"obs_loss": json.dumps(losses)})
    return losses

