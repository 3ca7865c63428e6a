"""The exact byte size of the GGUF file a genotype (a structure level per module and a GGUF type per tensor)
exports to: the header, metadata and tensor index, then every tensor at the type it is written as
(`effective_type`), each padded to the file's alignment. The shapes come from `layer_shapes`, the
exporter's own description of what it writes, so the count and the file cannot drift apart (tested).

Genotype: {"attn": [level per layer], "mlp": [level per layer], "types": {gene: [type per layer]}} with the
genes "q" "k" "v" "o" "gate" "up" "down" per layer, and "embd" (and "output" for untied heads) of length 1.
Types are the ladder's names (`search.quant_types`); a tensor whose rows cannot hold one is counted, scored
and written as `effective_type` says.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from pipeline.model.gguf_export import DeciLayer, deci_layers, layer_shapes, tensor_role
from pipeline.model.structure import ATTN, MLP
from pipeline.quant.export import write_typed_gguf
from pipeline.quant.types import effective_type, padded, tensor_bytes

LAYER_GENES = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_GENES, MLP_GENES = LAYER_GENES[:4], LAYER_GENES[4:]


def tensor_info_bytes(name: str, ndim: int) -> int:
    """One entry of a GGUF tensor index: name (length-prefixed), dimensions, type, offset."""
    return 8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8


@functools.lru_cache(maxsize=65536)
def stored_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Padded bytes of one tensor asked to be `type_name`."""
    return padded(tensor_bytes(shape, effective_type(type_name, shape[-1], len(shape))))


@dataclass
class FileLayout:
    """What the byte count of one model's files needs: per layer and level, the attention's and the MLP's
    tensors as the exporter writes them, and the fixed part (metadata without the tensor index, embedding,
    output head, final norm, RoPE factors)."""
    metadata_bytes: int  # header + metadata, before the tensor index
    fixed: list[tuple[str, tuple[int, ...]]]  # tensors outside the layers
    attn: list[list[list[tuple[str, tuple[int, ...]]]]]  # [layer][level] -> (name, shape) of attention tensors
    mlp: list[list[list[tuple[str, tuple[int, ...]]]]]
    deci: list[list[DeciLayer]]  # [layer][attention level] -> the layer as written (query slots)
    tied: bool
    hidden: int
    name: str = "pruned"  # the file's general.name, part of its metadata

    def named(self, name: str) -> FileLayout:
        """The layout of files whose general.name is `name` (a GGUF string: its length is in the bytes)."""
        return dataclasses.replace(self, name=name,
                                   metadata_bytes=self.metadata_bytes + len(name.encode()) - len(self.name.encode()))

    @property
    def genes(self) -> list[str]:
        return [*LAYER_GENES, "embd", *([] if self.tied else ["output"])]

    def row_width(self, genotype: dict, gene: str, layer: int) -> int:
        """The width of the rows the tensor of `gene` has in `layer` under `genotype` (o and down: their
        kept columns as written)."""
        if gene in ("o", "down"):
            module, name = (ATTN, "attn_output.weight") if gene == "o" else (MLP, "ffn_down.weight")
            shapes = dict(getattr(self, module)[layer][genotype[module][layer]])
            return shapes[name][-1] if name in shapes else 1
        return self.hidden

    def file_bytes(self, genotype: dict) -> int:
        types = genotype["types"]
        index = 0
        data = 0
        for name, shape in self.fixed:
            role = tensor_role(name)
            kind = "f32" if role is None else types[role][0]
            data += stored_bytes(shape, kind)
            index += tensor_info_bytes(name, len(shape))
        for module, table in ((ATTN, self.attn), (MLP, self.mlp)):
            for layer, per_level in enumerate(table):
                for name, shape in per_level[genotype[module][layer]]:
                    role = tensor_role(name)
                    kind = "f32" if role is None else types[role][layer]
                    data += stored_bytes(shape, kind)
                    index += tensor_info_bytes(f"blk.{layer}.{name}", len(shape))
        return padded(self.metadata_bytes + index) + data


def file_layout(db, model, tokenizer, scratch: Path, name: str = "pruned") -> FileLayout:
    """The layout of every genotype over `db` for the dense `model`, written with general.name `name`. The
    metadata's size (without the tensor index) comes from a header-only export of the dense model as a
    per-tensor-typed file, at `scratch`."""
    header = write_typed_gguf(model, tokenizer, scratch, {}, name=name, header_only=True)
    scratch.unlink()
    header_bytes, header_tensors = header.bytes, header.tensor_shapes
    s, config = db.structure, model.config
    blocks = list(model.model.layers)
    bias = [(b.self_attn.q_proj.bias is not None, b.self_attn.o_proj.bias is not None,
             b.mlp.down_proj.bias is not None) for b in blocks]
    deci = [[None] * (db.levels + 1) for _ in range(s.num_layers)]
    attn = [[None] * (db.levels + 1) for _ in range(s.num_layers)]
    mlp = [[None] * (db.levels + 1) for _ in range(s.num_layers)]
    for level in range(db.levels + 1):
        records = []
        for layer in range(s.num_layers):
            heads = sorted(int(h) for h in db.level_units(layer, ATTN, level))
            records.append({"q_heads": heads, "kv_heads": s.kv_heads_used(heads),
                            "mlp": db.kept_count(MLP, level) * (s.unit_size(MLP))})
        fake = SimpleNamespace(layers=records, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads)
        for layer, written in enumerate(deci_layers(fake, [(b[1], b[2]) for b in bias])):
            shapes = layer_shapes(written, s.hidden_size, s.head_dim, bias[layer])
            deci[layer][level] = written
            attn[layer][level] = [(n, sh) for n, sh in shapes if n.startswith("attn_")]
            mlp[layer][level] = [(n, sh) for n, sh in shapes if n.startswith("ffn_")]
    fixed = [(n, sh) for n, sh in header_tensors if not n.startswith("blk.")]
    metadata = header_bytes - sum(tensor_info_bytes(n, len(sh)) for n, sh in header_tensors)
    return FileLayout(metadata, fixed, attn, mlp, deci, bool(getattr(config, "tie_word_embeddings", False)),
                      s.hidden_size, name)


def export_types(layout: FileLayout, genotype: dict) -> dict[str, str]:
    """GGUF tensor name -> asked type, as `write_typed_gguf` takes it."""
    types = genotype["types"]
    out = {}
    for module, table in ((ATTN, layout.attn), (MLP, layout.mlp)):
        for layer, per_level in enumerate(table):
            for name, _ in per_level[genotype[module][layer]]:
                role = tensor_role(name)
                if role is not None:
                    out[f"blk.{layer}.{name}"] = types[role][layer]
    out["token_embd.weight"] = types["embd"][0]
    if not layout.tied:
        out["output.weight"] = types["output"][0]
    return out
