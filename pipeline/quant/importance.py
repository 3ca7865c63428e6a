"""Importance weights for quantization (llama.cpp's imatrix): for every linear layer, the mean square of each
input column over the calibration tokens. q/k/v share the attention input, gate/up the MLP input; o_proj and
down_proj get the inputs the database's Hessians are built from (their diagonals); the LM head the final
norm's output. The token embedding is a lookup, not a product: it gets none (as in llama.cpp).

Keys: "<layer>.attn_in", "<layer>.o_in", "<layer>.mlp_in", "<layer>.down_in", "output_in"."""
from __future__ import annotations

import torch

from pipeline.run.distributed import device_of

INPUTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
          "down_in": "mlp.down_proj"}


@torch.no_grad()
def column_importance(model, sequences: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}

    def accumulate(key):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        return hook

    hooks = [model.get_submodule(f"model.layers.{i}.{path}").register_forward_hook(accumulate(f"{i}.{name}"))
             for i in range(len(model.model.layers)) for name, path in INPUTS.items()]
    hooks.append(model.lm_head.register_forward_hook(accumulate("output_in")))
    device = device_of(model)
    try:
        for batch in torch.split(sequences, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / sequences.numel()).float().cpu() for k, v in sums.items()}


def export_importance(importance: dict[str, torch.Tensor], db, genotype: dict, tied: bool) -> dict:
    """GGUF tensor name -> importance of its input columns in the pruned model's column order, for
    `write_gguf(importance=...)`: o_proj / down_proj restricted to the kept heads' columns / kept neurons.
    The token embedding gets the LM head's (llama.cpp multiplies by it when the head is tied)."""
    from pipeline.model.structure import ATTN, MLP, unit_indices

    def arr(key):
        return importance[key].numpy()
    out = {}
    for layer in range(db.structure.num_layers):
        heads = db.level_units(layer, ATTN, genotype[ATTN][layer])
        neurons = db.level_units(layer, MLP, genotype[MLP][layer])
        for name in ("attn_q", "attn_k", "attn_v"):
            out[f"blk.{layer}.{name}.weight"] = arr(f"{layer}.attn_in")
        columns = unit_indices(heads, db.structure.head_dim).numpy()
        out[f"blk.{layer}.attn_output.weight"] = arr(f"{layer}.o_in")[columns]
        out[f"blk.{layer}.ffn_gate.weight"] = out[f"blk.{layer}.ffn_up.weight"] = arr(f"{layer}.mlp_in")
        out[f"blk.{layer}.ffn_down.weight"] = arr(f"{layer}.down_in")[neurons.numpy()]
    out["output.weight"] = arr("output_in")
    if tied:
        out["token_embd.weight"] = arr("output_in")
    return out
