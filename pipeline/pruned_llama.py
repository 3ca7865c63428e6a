"""A Llama-layout causal LM whose layers have their own widths: physically fewer query heads,
key/value heads and MLP neurons per layer (a layer may have none of either).

This file imports only torch and transformers so that it can be copied into an exported model
folder and loaded with `trust_remote_code=True` where this project is not installed.

Per layer the config holds the *original* indices of the kept query heads and kept key/value
heads, and the kept MLP width. Query head q uses the kept key/value head that held q's original
group, so GQA groups may shrink unevenly. The same blocks serve Llama, Mistral, Qwen2 (biases on
q/k/v only: `qkv_bias`) and Qwen3 (per-head RMSNorm of queries and keys: `qk_norm`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


@strict
class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    layer_q_heads: list | None = None  # per layer: kept query heads (original indices)
    layer_kv_heads: list | None = None  # per layer: kept key/value heads (original indices)
    layer_intermediate_sizes: list | None = None  # per layer: kept MLP neurons
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2) independently of attention_bias
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Qwen3)
    source_model_type: str | None = None  # the dense model's family, for the record

    def layer_shape(self, idx: int) -> tuple[list[int], list[int], int]:
        if self.layer_q_heads is None:
            return (list(range(self.num_attention_heads)), list(range(self.num_key_value_heads)),
                    self.intermediate_size)
        return self.layer_q_heads[idx], self.layer_kv_heads[idx], self.layer_intermediate_sizes[idx]


class PrunedAttention(LlamaAttention):
    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_heads, kv_heads, _ = config.layer_shape(layer_idx)
        group = config.num_attention_heads // config.num_key_value_heads
        kv_map = [kv_heads.index(q // group) for q in q_heads]
        self.num_heads, self.num_kv_heads = len(q_heads), len(kv_heads)
        # Uneven groups are served by gathering key/value heads per query head; even ones by the
        # stock repeat (and flash/sdpa GQA kernels).
        even = self.num_kv_heads > 0 and kv_map == [i // (self.num_heads // self.num_kv_heads)
                                                     for i in range(self.num_heads)]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads if even else 1
        self.kv_map = None if even else kv_map
        self._kv_index: torch.Tensor | None = None  # not a buffer: meta-device loading would leave it empty
        in_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=in_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=in_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=in_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        if self.num_heads == 0:
            if cache is not None:  # keep the cache's length bookkeeping right for this layer
                empty = hidden_states.new_zeros(input_shape[0], 1, input_shape[1], self.head_dim)
                cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
            return self.o_proj.bias.expand(*input_shape, -1) if self.o_proj.bias is not None \
                else hidden_states.new_zeros(hidden_states.shape), None
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        if self.kv_map is not None:
            index = self._kv_index_on(key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


    def _kv_index_on(self, device) -> torch.Tensor:
        if self._kv_index is None or self._kv_index.device != device:
            self._kv_index = torch.tensor(self.kv_map, dtype=torch.long, device=device)
        return self._kv_index


class PrunedMLP(LlamaMLP):
    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.layer_shape(layer_idx)[2]
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        if self.intermediate_size == 0:
            return self.down_proj.bias.expand_as(x) if self.down_proj.bias is not None else torch.zeros_like(x)
        return super().forward(x)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        for idx, layer in enumerate(self.model.layers):
            layer.self_attn = PrunedAttention(config, idx)
            layer.mlp = PrunedMLP(config, idx)
        self.post_init()
