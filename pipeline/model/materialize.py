"""Physically smaller models from a dense one and database levels: the pruned config (one record
per layer) and the model built from it, filled module by module with the kept rows/columns."""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.initialization import no_init_weights

from pipeline.model.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM, layer_record
from pipeline.model.structure import ATTN, MLP, Structure, block_features, output_projection, unit_indices

_DROPPED_KEYS = ("architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype")


@functools.cache
def _config_fields() -> frozenset[str]:
    """The keys a PrunedLlamaConfig takes from the dense config (computed once: it builds a LlamaConfig)."""
    return frozenset({f.name for f in dataclasses.fields(PrunedLlamaConfig)} | set(LlamaConfig().to_dict()))


def pruned_config(dense_config, structure: Structure, kept: dict, families: dict,
                  biased: frozenset = frozenset()) -> PrunedLlamaConfig:
    """`kept[(layer, module)]` = kept unit indices (query heads or neurons); `biased` = the (layer, module)
    whose output projection gets a bias of its own (FLAP's compensation)."""
    fields = _config_fields()
    values = {k: v for k, v in dense_config.to_dict().items() if k in fields and k not in _DROPPED_KEYS}
    layers = []
    for i in range(structure.num_layers):
        q_heads = sorted(int(h) for h in kept[(i, ATTN)])
        layers.append(layer_record(q_heads, structure.kv_heads_used(q_heads), len(kept[(i, MLP)]),
                                   (i, ATTN) in biased, (i, MLP) in biased))
    values.update(source_model_type=dense_config.model_type, qkv_bias=families["qkv_bias"],
                  qk_norm=families["qk_norm"], attention_bias=families["o_bias"], head_dim=structure.head_dim,
                  layers=layers)
    config = PrunedLlamaConfig(**values)
    config.architectures = ["PrunedLlamaForCausalLM"]
    return config


@torch.no_grad()
def dense_unit_weights(dense_model, structure: Structure, kept: dict, biases: dict | None = None) -> dict:
    """`kept[(layer, module)]` = kept query heads or neurons -> `materialize`'s input: the dense output
    projection's columns of the kept units, uncorrected, and `biases[(layer, module)]` where given."""
    biases = biases or {}
    out = {}
    for (layer, module), units in kept.items():
        units = torch.as_tensor(units, dtype=torch.long)
        weight = output_projection(dense_model, layer, module).weight.detach()
        out[(layer, module)] = (units, weight[:, unit_indices(units, structure.unit_size(module))].clone(),
                                biases.get((layer, module)))
    return out


@torch.no_grad()
def materialize(dense_model, structure: Structure, level_weights: dict) -> PrunedLlamaForCausalLM:
    """A physically smaller model: kept q/k/v/gate/up rows from the dense model, corrected
    o_proj/down_proj columns from the database.

    `level_weights[(layer, module)]` = (kept unit indices, corrected output weight on kept columns) or
    (..., output bias or None): a bias replaces the dense one (FLAP's compensation, `Database.weights_for`).
    Weights take the dtype of the dense model's first parameter; buffers (RoPE frequencies) keep
    the dense model's dtype.
    """
    kept = {key: value[0] for key, value in level_weights.items()}
    biases = {key: value[2] for key, value in level_weights.items() if len(value) > 2 and value[2] is not None}
    config = pruned_config(dense_model.config, structure, kept, block_features(dense_model), frozenset(biases))
    with torch.device("meta"), no_init_weights():  # every weight is copied below: initialising them is wasted
        model = PrunedLlamaForCausalLM(config)
    first = next(dense_model.parameters())

    def put(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """A fresh copy of `tensor` becomes the parameter `module.<name>`."""
        setattr(module, name, nn.Parameter(tensor.to(device=first.device, dtype=first.dtype, copy=True)))

    def same(target: nn.Module, source: nn.Module) -> None:
        for name, param in source.named_parameters(recurse=False):
            put(target, name, param)

    pruned, dense = model.model, dense_model.model
    same(pruned.embed_tokens, dense.embed_tokens)
    same(pruned.norm, dense.norm)
    d = structure.head_dim
    for i, (layer, source) in enumerate(zip(pruned.layers, dense.layers)):
        attn, dense_attn = layer.self_attn, source.self_attn
        q_units, o_weight = level_weights[(i, ATTN)][:2]
        if config.layers[i]["q_heads"]:
            same(layer.input_layernorm, source.input_layernorm)
            q_rows = unit_indices(q_units, d)
            kv_rows = unit_indices(config.layers[i]["kv_heads"], d)
            for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for name, param in getattr(dense_attn, proj).named_parameters():
                    put(getattr(attn, proj), name, param[rows])
            put(attn.o_proj, "weight", o_weight)
            if config.qk_norm:
                same(attn.q_norm, dense_attn.q_norm)
                same(attn.k_norm, dense_attn.k_norm)
        if (i, ATTN) in biases:
            put(attn.o_proj, "bias", biases[(i, ATTN)])
        elif dense_attn.o_proj.bias is not None:
            put(attn.o_proj, "bias", dense_attn.o_proj.bias)
        mlp, dense_mlp = layer.mlp, source.mlp
        neurons, down_weight = level_weights[(i, MLP)][:2]
        if config.layers[i]["mlp"]:
            same(layer.post_attention_layernorm, source.post_attention_layernorm)
            neurons = torch.as_tensor(neurons, dtype=torch.long)
            for proj in ("gate_proj", "up_proj"):
                for name, param in getattr(dense_mlp, proj).named_parameters():
                    put(getattr(mlp, proj), name, param[neurons])
            put(mlp.down_proj, "weight", down_weight)
        if (i, MLP) in biases:
            put(mlp.down_proj, "bias", biases[(i, MLP)])
        elif dense_mlp.down_proj.bias is not None:
            put(mlp.down_proj, "bias", dense_mlp.down_proj.bias)
    if config.tie_word_embeddings:
        model.lm_head.weight = pruned.embed_tokens.weight
    else:
        same(model.lm_head, dense_model.lm_head)
    for name, _ in list(model.named_buffers()):  # as the dense model has them, dtype included
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, dense_model.get_buffer(name).to(first.device, copy=True))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"materialize: nothing copied into {left}")
    model.eval()
    return model
