"""The dense model's prunable structure, loading, and helpers for dense-shaped models with pruned
columns zeroed (cheap level swaps for the search). Physically smaller models: `pipeline.model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import ModelStructureError
from pipeline.run.outputs import BASE_MODEL

ATTN, MLP = "attn", "mlp"
MODULE_TYPES = (ATTN, MLP)
_ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Structure:
    """What can be pruned: per layer, query heads (units of head_dim columns of o_proj) and MLP
    neurons (single columns of down_proj)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def unit_count(self, module: str) -> int:
        return self.num_heads if module == ATTN else self.intermediate_size

    def unit_size(self, module: str) -> int:
        return self.head_dim if module == ATTN else 1

    def attention_params(self, q_heads: int, kv_heads: int) -> int:
        return self.hidden_size * self.head_dim * (2 * q_heads + 2 * kv_heads)

    def mlp_params(self, neurons: int) -> int:
        return 3 * self.hidden_size * neurons

    @property
    def dense_prunable_params(self) -> int:
        per_layer = self.attention_params(self.num_heads, self.num_kv_heads) + self.mlp_params(self.intermediate_size)
        return self.num_layers * per_layer

    def kept_attention_params(self, q_heads) -> int:
        """Attention parameters left with these query heads kept (key/value heads without any counted as removed)."""
        return self.attention_params(len(q_heads), len(self.kv_heads_used(q_heads)))

    def kv_heads_used(self, q_heads) -> list[int]:
        """Key/value heads that still serve at least one of the kept query heads."""
        return sorted({int(q) // self.group_size for q in q_heads})


def unit_indices(units: torch.Tensor, size: int) -> torch.Tensor:
    """The indices that units of `size` consecutive members cover: unit u covers u*size .. u*size+size-1.
    A query head's columns of o_proj (or rows of q_proj), a key/value head's rows of k/v_proj, an OBS
    unit's query heads or neurons."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (units[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def structure_of(model) -> Structure:
    """Read the prunable structure, refusing models without the Llama block layout."""
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelStructureError(
            f"{type(model).__name__} has no `model.layers`: this pipeline prunes decoder-only models with the "
            "Llama block layout (Llama, Mistral, Qwen2/3)")
    for i, layer in enumerate(layers):
        for parent, names in (("self_attn", _ATTN_PROJECTIONS), ("mlp", _MLP_PROJECTIONS)):
            module = getattr(layer, parent, None)
            missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Linear)]
            if missing:
                raise ModelStructureError(
                    f"layer {i} of {type(model).__name__} lacks {parent}.{', '.join(missing)} as linear layers; "
                    f"expected {parent}.{{{', '.join(names)}}} (Llama block layout)")
    if config.hidden_act not in ("silu", "swish"):
        raise ModelStructureError(f"hidden_act '{config.hidden_act}' is not a SwiGLU MLP (expected 'silu')")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Structure(num_layers=len(layers), hidden_size=config.hidden_size, num_heads=heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                     head_dim=head_dim, intermediate_size=config.intermediate_size)


def is_gguf(name_or_path: str) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def hf_location(name_or_path: str | Path) -> tuple[str, dict]:
    """`from_pretrained` arguments for a hub id, a folder, or a GGUF file (its folder and `gguf_file`;
    transformers dequantizes it to float32)."""
    if is_gguf(name_or_path):
        return str(Path(name_or_path).parent), {"gguf_file": Path(name_or_path).name}
    return str(name_or_path), {}


def load_dense(path: str | Path, dtype: str = "float32", revision: str | None = None):
    """Load a causal LM and its tokenizer the ordinary Hugging Face way (hub id, local folder or GGUF file)."""
    where, extra = hf_location(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), revision=revision, **extra)
    if extra:  # dequantized to ordinary tensors, but still marked as a GGUF-quantized model, which refuses saving
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, **extra)
    model.eval()
    structure_of(model)
    return model, tokenizer


def dense_source(params) -> str:
    """Where the dense model is loaded from: the base stage's folder (the demo pretrained, or a GGUF file
    dequantized once) or the user's hub id or folder."""
    return str(BASE_MODEL) if params.is_demo or is_gguf(params.model.name_or_path) else params.model.name_or_path


def load_dense_model(params):
    """The stages' dense model (and tokenizer) as params.yaml names it, on the CPU."""
    return load_dense(dense_source(params), params.model.dtype, params.model.revision)


def output_projection(model, layer: int, module: str) -> nn.Linear:
    block = model.model.layers[layer]
    return block.self_attn.o_proj if module == ATTN else block.mlp.down_proj


def masked_weight(full_shape, kept_columns: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dense-shaped output-projection weight: the stored corrected columns, zeros elsewhere."""
    full = weight.new_zeros(full_shape)
    full[:, kept_columns] = weight
    return full


def block_features(model) -> dict:
    """What distinguishes the supported families' attention blocks."""
    attn = model.model.layers[0].self_attn
    return {"qkv_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
            "qk_norm": hasattr(attn, "q_norm") and hasattr(attn, "k_norm")}


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
