"""A GGUF with one type per tensor (`write_gguf` with a store function): each 2-D weight quantized by
llama.cpp's quantizer at the type the search chose (or the fallback its rows force, `effective_type`), with
the calibration importance weights laid out as the file's columns are; norms and biases f32."""
from __future__ import annotations

import os

import numpy as np

from pipeline.errors import ExportError
from pipeline.model.gguf_export import DeciLayer, ExportReport, deci_output_columns, tensor_role, write_gguf
from pipeline.quant.ggml import quantize
from pipeline.quant.types import effective_type, ggml_type


def typed_store(types: dict[str, str], importance: dict[str, np.ndarray] | None, head_dim: int,
                replaced: dict[str, str]):
    """The store function of `write_gguf` for `types` (GGUF name -> asked type, every 2-D weight) and
    `importance` (GGUF name -> one weight per input column in the model's column order; None: plain
    quantization). Records "asked->written" in `replaced` where a tensor's rows force another type."""
    def store(name: str, array: np.ndarray, layer: DeciLayer | None):
        if tensor_role(name) is None:
            return array.astype(np.float32), ggml_type("f32")
        if name not in types:
            raise ExportError(f"no GGUF type given for tensor {name}")
        written = effective_type(types[name], array.shape[-1], array.ndim)
        if written != types[name]:
            replaced[name] = f"{types[name]}->{written}"
        weights = None if importance is None or not np.any(array) else importance.get(name)  # zeros: placeholders
        if weights is not None and name.endswith("attn_output.weight"):
            weights = deci_output_columns(weights[None, :], layer.query_slots, head_dim)[0]
        return quantize(array, written, weights), ggml_type(written)
    return store


def write_typed_gguf(model, tokenizer, path: str | os.PathLike, types: dict[str, str],
                     importance: dict[str, np.ndarray] | None = None, name: str = "pruned",
                     header_only: bool = False) -> ExportReport:
    """`model` as a `deci` GGUF with the per-tensor `types` (see `typed_store`)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    replaced: dict[str, str] = {}
    report = write_gguf(model, tokenizer, path, name=name, store=typed_store(types, importance, head_dim, replaced),
                        header_only=header_only)
    report.replaced_types = replaced
    return report
