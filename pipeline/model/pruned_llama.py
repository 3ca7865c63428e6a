"""A Llama-layout causal LM whose layers have their own widths: physically fewer query heads,
key/value heads and MLP neurons per layer (a layer may have no attention or no MLP at all).

This file imports only torch and transformers so that it can be copied into an exported model
folder and loaded with `trust_remote_code=True` where this project is not installed.

The config holds one record per layer: the *original* indices of the kept query heads and kept
key/value heads, and the kept MLP width,

    layers = [{"q_heads": [0, 1, 3], "kv_heads": [0, 1], "mlp": 5632}, ...]

(no query heads: the attention is removed; "mlp": 0: the MLP is removed). A record may also say
"o_bias": true / "down_bias": true: that layer's o_proj / down_proj has an output bias although the
family has none (FLAP's bias compensation of removed channels); records without them have none.
Each decoder layer is built from its record. Query head q uses the kept key/value head that held
q's original group, so GQA groups may shrink unevenly. A removed attention or MLP holds no parameters, nor does its
input norm (only the constant output bias where the family has one), so every parameter gets a
gradient (DDP/FSDP need no special cases). The same blocks serve Llama, Mistral, Qwen2
(biases on q/k/v only: `qkv_bias`) and Qwen3 (per-head RMSNorm of queries and keys: `qk_norm`).
"""
from __future__ import annotations

import json
from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


def layer_record(q_heads, kv_heads, mlp, o_bias: bool = False, down_bias: bool = False) -> dict:
    """One layer of the config: kept query heads, kept key/value heads (original indices), MLP width, and
    whether o_proj / down_proj carry a bias of this layer's own (only written when they do)."""
    record = {"q_heads": [int(h) for h in q_heads], "kv_heads": [int(h) for h in kv_heads], "mlp": int(mlp)}
    record.update({k: True for k, v in (("o_bias", o_bias), ("down_bias", down_bias)) if v})
    return record


@strict
class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    layers: list | None = None  # one `layer_record` per layer; None: every layer dense
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2) independently of attention_bias
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Qwen3)
    source_model_type: str | None = None  # the dense model's family, for the record

    def __post_init__(self, layer_q_heads=None, layer_kv_heads=None, layer_intermediate_sizes=None, **kwargs):
        super().__post_init__(**kwargs)
        if layer_q_heads is not None:  # exported before per-layer records: three parallel lists
            if self.layers is not None:
                raise ValueError("config has both `layers` and the old `layer_q_heads` lists")
            self.layers = list(zip(layer_q_heads, layer_kv_heads, layer_intermediate_sizes))
        if self.layers is None:
            self.layers = [(range(self.num_attention_heads), range(self.num_key_value_heads),
                            self.intermediate_size)] * self.num_hidden_layers
        self.layers = [layer_record(r["q_heads"], r["kv_heads"], r["mlp"], r.get("o_bias", False),
                                    r.get("down_bias", False)) if isinstance(r, dict)
                       else layer_record(*r) for r in self.layers]

    def validate_architecture(self):
        super().validate_architecture()
        if self.layers is None:
            return
        if len(self.layers) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layers)} layer records for num_hidden_layers={self.num_hidden_layers}")
        group = self.num_attention_heads // self.num_key_value_heads
        for i, record in enumerate(self.layers):
            q_heads, kv_heads = record["q_heads"], record["kv_heads"]
            if any(q // group not in kv_heads for q in q_heads):
                raise ValueError(f"layer {i}: query heads {q_heads} need key/value heads missing from {kv_heads}")

    def to_json_string(self, use_diff: bool = True) -> str:
        """As usual, with one line per layer record instead of one line per head index."""
        values = json.loads(super().to_json_string(use_diff))
        if "layers" not in values:
            return json.dumps(values, indent=2, sort_keys=True) + "\n"
        values["layers"] = "@layers@"
        lines = ",\n".join(f"    {json.dumps(r)}" for r in self.layers)
        return json.dumps(values, indent=2, sort_keys=True).replace('"@layers@"', f"[\n{lines}\n  ]") + "\n"


class PrunedAttention(nn.Module):
    """Attention over the kept query heads of one layer and the key/value heads they use."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__()
        record = config.layers[layer_idx]
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_heads, kv_heads = record["q_heads"], record["kv_heads"]
        group = config.num_attention_heads // config.num_key_value_heads
        kv_map = [kv_heads.index(q // group) for q in q_heads]
        self.num_heads, self.num_kv_heads = len(q_heads), len(kv_heads)
        # Uneven groups are served by gathering key/value heads per query head; even ones by the
        # stock repeat (and flash/sdpa GQA kernels).
        even = kv_map == [i // (self.num_heads // self.num_kv_heads) for i in range(self.num_heads)]
        self.num_key_value_groups = self.num_heads // self.num_kv_heads if even else 1
        self.kv_map = None if even else kv_map
        self._kv_index: torch.Tensor | None = None  # not a buffer: meta-device loading would leave it empty
        in_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=in_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=in_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=in_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size,
                                bias=config.attention_bias or record.get("o_bias", False))
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
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


class OutputBias(nn.Module):
    """What is left of a removed module's output projection in families with biases there: the
    constant bias (stored under the projection's name, `o_proj.bias` / `down_proj.bias`)."""

    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(size))

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(like)


class RemovedAttention(nn.Module):
    """A layer without query heads: outputs zeros (or o_proj's bias) and holds no weights. With a
    KV cache it stores an empty key/value entry so the cache's length bookkeeping stays right."""
    num_heads = num_kv_heads = 0

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        if config.attention_bias or config.layers[layer_idx].get("o_bias", False):
            self.o_proj = OutputBias(config.hidden_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        if cache is not None:
            empty = hidden_states.new_zeros(input_shape[0], 1, input_shape[1], self.head_dim)
            cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
        if hasattr(self, "o_proj"):
            return self.o_proj(hidden_states), None
        return hidden_states.new_zeros(hidden_states.shape), None


class PrunedMLP(nn.Module):
    """SwiGLU MLP over the kept neurons."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.layers[layer_idx]["mlp"]
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size,
                                   bias=bias or config.layers[layer_idx].get("down_bias", False))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RemovedMLP(nn.Module):
    """A layer without MLP neurons: outputs zeros (or down_proj's bias) and holds no weights."""
    intermediate_size = 0

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__()
        if config.mlp_bias or config.layers[layer_idx].get("down_bias", False):
            self.down_proj = OutputBias(config.hidden_size)

    def forward(self, x):
        return self.down_proj(x) if hasattr(self, "down_proj") else torch.zeros_like(x)


class PrunedDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer built from its record: its own attention and MLP widths."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__()
        record = config.layers[layer_idx]
        self.hidden_size = config.hidden_size
        self.self_attn = (PrunedAttention(config, layer_idx) if record["q_heads"]
                          else RemovedAttention(config, layer_idx))
        self.mlp = PrunedMLP(config, layer_idx) if record["mlp"] else RemovedMLP(config, layer_idx)
        # A removed module's input norm would feed nothing (and get no gradient): none is built.
        self.input_layernorm = (LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if record["q_heads"]
                                else nn.Identity())
        self.post_attention_layernorm = (LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if record["mlp"]
                                         else nn.Identity())

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class PrunedLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = PrunedLlamaConfig
    _no_split_modules = ["PrunedDecoderLayer"]
    _can_record_outputs = {"hidden_states": PrunedDecoderLayer, "attentions": PrunedAttention}
    # Exports made before per-layer records stored (zero-width) weights and norms of removed modules.
    _keys_to_ignore_on_load_unexpected = [r"\.self_attn\.([qkvo]_proj\.(weight|bias)|[qk]_norm\.weight)$",
                                          r"\.mlp\.(gate|up|down)_proj\.(weight|bias)$",
                                          r"\.(input|post_attention)_layernorm\.weight$"]


class PrunedLlamaModel(PrunedLlamaPreTrainedModel):
    """Embeddings, the per-record decoder layers, final norm and RoPE; the stock Llama forward."""

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PrunedDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = LlamaModel.forward


class PrunedLlamaForCausalLM(PrunedLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.model = PrunedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = LlamaForCausalLM.forward
