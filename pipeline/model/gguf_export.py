"""Pruned (or dense) Llama-layout models as llama.cpp GGUF files, architecture `deci`.

llama.cpp's `deci` graph reads per-layer arrays of query heads, key/value heads and feed-forward
widths, so a model whose layers have their own widths runs there as it is. What `deci` cannot express
is rewritten into something it can, exactly (zero weights contribute exactly zero):

- Query head h uses key/value head h // (heads / kv_heads): every key/value head must serve the same
  number of query heads. Uneven groups are padded with zero-weight query heads (zero q rows, zero
  o_proj columns) up to the largest group; the KV cache is unchanged, the extra heads cost compute.
- A feed-forward width of 0 makes llama.cpp skip the layer's residual add (the attention output is
  lost, and the last layer aborts): a removed MLP is written as one neuron with zero weights.
- The head size is read from layer 0's head count, and a layer with query heads but no key/value
  heads is Nemotron's linear attention: layer 0 without attention keeps one zero query head with
  one zero key/value head, and no layer is written with query heads but no key/value heads.
- A removed module with a constant output bias (o_proj / down_proj bias) keeps that placeholder
  head / neuron, which carries the bias; `deci` adds nothing for an attention-free layer.
- Qwen3's per-head q/k norms are not in the `deci` graph: such models are refused.
- llama.cpp's RoPE rotates consecutive pairs of a head's values, Hugging Face's Llama rotates its
  two halves: q/k rows (and biases) are interleaved per head. Llama-3 / linear RoPE scaling is
  written as the `rope_freqs` factors (each frequency divided by its factor).

Types: f32, f16 (1-D norms and biases stay f32, as llama.cpp's own converter keeps them), q8_0 (rows
whose width is not a multiple of 32 stay f16, as llama.cpp's quantizer does), and the K-quants such as
q4_k_m through llama.cpp's own quantizer (`llama_model_quantize` of llama-cpp-python) from the f16 file.
"""
from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from pipeline.errors import ExportError

ARCH = "deci"
# The types (names as params.yaml gives them, `pipeline.config.GGUF_WRITTEN` / `GGUF_BY_LLAMA_CPP`).
WRITTEN_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Written by llama.cpp's quantizer from the f16 file: the name of its llama_ftype constant.
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
GGUF_TYPES = (*WRITTEN_TYPES, *LLAMA_CPP_TYPES)
_Q8_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
_SUPPORTED_ROPE = ("default", "llama3", "linear")


@dataclass(frozen=True)
class DeciLayer:
    """One layer as written: `query_slots[h]` is the model's (physical) query head behind llama.cpp's
    query head h, None for a zero padding head; `kv_heads` key/value heads (placeholder: one zero
    head); `mlp` the model's MLP width (0: removed, written as one zero neuron)."""
    query_slots: tuple[int | None, ...]
    kv_heads: int
    mlp: int

    @property
    def head_count(self) -> int:
        return len(self.query_slots)

    @property
    def padded_heads(self) -> int:
        return sum(slot is None for slot in self.query_slots)

    @property
    def feed_forward_length(self) -> int:
        return max(self.mlp, 1)


@dataclass
class ExportReport:
    """What the file holds beyond the model: padding heads, placeholder modules, unquantized rows."""
    path: str
    gguf_type: str
    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]
    padded_query_heads: int = 0
    padded_params: int = 0
    placeholder_layers: list[str] = field(default_factory=list)
    unquantized_tensors: list[str] = field(default_factory=list)
    bytes: int = 0
    tensor_types: dict[str, str] = field(default_factory=dict)  # each 2-D weight's type as written
    replaced_types: dict[str, str] = field(default_factory=dict)  # "asked->written" where rows forced another
    tensor_shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # header_only: the index


def query_slots(kv_of_query: list[int], num_kv: int) -> tuple[int | None, ...]:
    """llama.cpp's query heads in order: each key/value head's query heads, padded with None (a zero
    head) to the largest group, so query head h uses key/value head h // group as llama.cpp assumes."""
    groups = [[q for q, kv in enumerate(kv_of_query) if kv == j] for j in range(num_kv)]
    width = max((len(g) for g in groups), default=0)
    return tuple(slot for g in groups for slot in [*g, *[None] * (width - len(g))])


def interleave_rope_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Per head, rows (or bias entries) in rotate-half order [x_0..x_{d/2-1}, y_0..y_{d/2-1}] become
    llama.cpp's pair order [x_0, y_0, x_1, y_1, ...]: both rotate (x_i, y_i) by the same angle."""
    heads = rows.shape[0] // head_dim
    halves = rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:])
    return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(rows.shape)


def layer_records(config) -> list[dict]:
    """Per layer: kept query heads, kept key/value heads (original indices) and MLP width, for a
    pruned config (`layers`) or a dense one (every layer full)."""
    records = getattr(config, "layers", None)
    if records is not None:
        return [dict(r) for r in records]
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return [{"q_heads": list(range(heads)), "kv_heads": list(range(kv)), "mlp": config.intermediate_size}
            ] * config.num_hidden_layers


def deci_layers(config, output_biases: list[tuple[bool, bool]]) -> list[DeciLayer]:
    """The layers as `deci` can express them. `output_biases[i]` = (o_proj has a bias, down_proj has
    a bias) in layer i: a removed module with a bias keeps a placeholder that carries it."""
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None)
                                           or config.num_attention_heads)
    layers = []
    for i, record in enumerate(layer_records(config)):
        q_heads, kv_heads = record["q_heads"], record["kv_heads"]
        if q_heads:
            slots = query_slots([kv_heads.index(q // group) for q in q_heads], len(kv_heads))
            layers.append(DeciLayer(slots, len(kv_heads), record["mlp"]))
        elif i == 0 or output_biases[i][0]:
            layers.append(DeciLayer((None,), 1, record["mlp"]))
        else:
            layers.append(DeciLayer((), 0, record["mlp"]))
    return layers


def check_exportable(model) -> None:
    """Refuse what the `deci` graph would run wrongly, before writing anything."""
    config = model.config
    attention = [layer.self_attn for layer in model.model.layers]
    if getattr(config, "qk_norm", False) or any(hasattr(a, "q_norm") for a in attention):
        raise ExportError(
            f"{config.model_type} normalises queries and keys per head (Qwen3 q_norm/k_norm), which llama.cpp's "
            "`deci` architecture does not apply: a GGUF would load and give wrong outputs; export is not supported "
            "for this family (Llama, Mistral and Qwen2 are)")
    if config.hidden_act not in ("silu", "swish"):
        raise ExportError(f"hidden_act '{config.hidden_act}': llama.cpp's `deci` MLP is SwiGLU (silu)")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in _SUPPORTED_ROPE:
        raise ExportError(f"RoPE scaling '{rope.get('rope_type')}' is not written by this export "
                          f"(supported: {', '.join(_SUPPORTED_ROPE)})")


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})


def rope_freq_factors(model, head_dim: int) -> np.ndarray | None:
    """llama.cpp divides each RoPE frequency by its factor: the unscaled frequencies over the model's
    own (`rotary_emb.inv_freq`, whatever scaling made them); None when they are unscaled."""
    rotary = model.model.rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ExportError("RoPE scaling with an attention factor is not written by this export")
    theta = float(rope_parameters(model.config)["rope_theta"])
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (plain / rotary.inv_freq.double().cpu()).numpy().astype(np.float32)
    return None if np.allclose(factors, 1.0, rtol=1e-6) else factors


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _heads(rows: np.ndarray, slots, head_dim: int) -> np.ndarray:
    """Rows of the heads in `slots` (None: zeros), in that order."""
    parts = [np.zeros((head_dim, *rows.shape[1:]), np.float32) if s is None else rows[s * head_dim:(s + 1) * head_dim]
             for s in slots]
    return np.concatenate(parts, axis=0)


def layer_tensors(block, layer: DeciLayer, hidden: int, head_dim: int) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name without the `blk.N.` prefix, float32 array) of one decoder layer."""
    attn, mlp = block.self_attn, block.mlp
    o_bias = _array(getattr(getattr(attn, "o_proj", None), "bias", None))
    if layer.head_count:
        norm = getattr(block.input_layernorm, "weight", None)
        yield "attn_norm.weight", np.ones(hidden, np.float32) if norm is None else _array(norm)
        if layer.padded_heads == layer.head_count:  # placeholder: one zero head, one zero key/value head
            zero = np.zeros((head_dim, hidden), np.float32)
            yield from (("attn_q.weight", zero), ("attn_k.weight", zero), ("attn_v.weight", zero))
            yield "attn_output.weight", np.zeros((hidden, head_dim), np.float32)
        else:
            slots = layer.query_slots
            yield "attn_q.weight", interleave_rope_rows(_heads(_array(attn.q_proj.weight), slots, head_dim), head_dim)
            yield "attn_k.weight", interleave_rope_rows(_array(attn.k_proj.weight), head_dim)
            yield "attn_v.weight", _array(attn.v_proj.weight)
            if attn.q_proj.bias is not None:
                yield "attn_q.bias", interleave_rope_rows(_heads(_array(attn.q_proj.bias), slots, head_dim), head_dim)
                yield "attn_k.bias", interleave_rope_rows(_array(attn.k_proj.bias), head_dim)
                yield "attn_v.bias", _array(attn.v_proj.bias)
            columns = _heads(_array(attn.o_proj.weight).T, slots, head_dim)
            yield "attn_output.weight", np.ascontiguousarray(columns.T)
        if o_bias is not None:
            yield "attn_output.bias", o_bias
    norm = getattr(block.post_attention_layernorm, "weight", None)
    yield "ffn_norm.weight", np.ones(hidden, np.float32) if norm is None else _array(norm)
    down_bias = _array(getattr(getattr(mlp, "down_proj", None), "bias", None))
    if layer.mlp:
        yield "ffn_gate.weight", _array(mlp.gate_proj.weight)
        yield "ffn_up.weight", _array(mlp.up_proj.weight)
        yield "ffn_down.weight", _array(mlp.down_proj.weight)
        if mlp.gate_proj.bias is not None:
            yield "ffn_gate.bias", _array(mlp.gate_proj.bias)
            yield "ffn_up.bias", _array(mlp.up_proj.bias)
    else:  # one neuron with zero weights: silu(0) * 0 = 0 (its gate/up biases, if any, are zero too)
        yield "ffn_gate.weight", np.zeros((1, hidden), np.float32)
        yield "ffn_up.weight", np.zeros((1, hidden), np.float32)
        yield "ffn_down.weight", np.zeros((hidden, 1), np.float32)
        if down_bias is not None:
            yield "ffn_gate.bias", np.zeros(1, np.float32)
            yield "ffn_up.bias", np.zeros(1, np.float32)
    if down_bias is not None:
        yield "ffn_down.bias", down_bias


ROLES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
         "ffn_down": "down", "token_embd": "embd", "output": "output"}


def tensor_role(name: str) -> str | None:
    """The genotype's type gene of a 2-D weight tensor ("q" ... "down", "embd", "output"); None for norms,
    biases and RoPE factors, which are always f32."""
    stem = name.rsplit(".", 1)
    if stem[-1] != "weight":
        return None
    return ROLES.get(stem[0].split(".")[-1])


def layer_shapes(layer: DeciLayer, hidden: int, head_dim: int, biases: tuple[bool, bool, bool] = (False, False, False)
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor `layer_tensors` writes for `layer`: the same branches, no data.
    `biases` = (q/k/v, o_proj, down_proj and gate/up) have biases."""
    qkv_bias, o_bias, mlp_bias = biases
    shapes = []
    if layer.head_count:
        q_rows = layer.head_count * head_dim
        kv_rows = layer.kv_heads * head_dim
        shapes += [("attn_norm.weight", (hidden,)), ("attn_q.weight", (q_rows, hidden)),
                   ("attn_k.weight", (kv_rows, hidden)), ("attn_v.weight", (kv_rows, hidden))]
        if qkv_bias and layer.padded_heads != layer.head_count:
            shapes += [("attn_q.bias", (q_rows,)), ("attn_k.bias", (kv_rows,)), ("attn_v.bias", (kv_rows,))]
        shapes.append(("attn_output.weight", (hidden, q_rows)))
        if o_bias:
            shapes.append(("attn_output.bias", (hidden,)))
    shapes.append(("ffn_norm.weight", (hidden,)))
    width = layer.feed_forward_length
    shapes += [("ffn_gate.weight", (width, hidden)), ("ffn_up.weight", (width, hidden)),
               ("ffn_down.weight", (hidden, width))]
    if mlp_bias:
        shapes += [("ffn_gate.bias", (width,)), ("ffn_up.bias", (width,)), ("ffn_down.bias", (hidden,))]
    return shapes


def deci_output_columns(weight: np.ndarray, slots, head_dim: int) -> np.ndarray:
    """o_proj as written: its columns (or an importance vector's entries) per query head in llama.cpp's slot
    order, zeros for padding heads. Quantization blocks run along these rows, so the fitness must quantize
    this layout, not the model's, to hold what llama.cpp holds."""
    return np.ascontiguousarray(_heads(np.asarray(weight).T, slots, head_dim).T)


def model_output_columns(written: np.ndarray, slots, head_dim: int, heads: int) -> np.ndarray:
    """The inverse of `deci_output_columns`: the model's o_proj columns (heads in the model's order) from the
    written layout, padding heads dropped."""
    out = np.empty((written.shape[0], heads * head_dim), dtype=written.dtype)
    for s, slot in enumerate(slots):
        if slot is not None:
            out[:, slot * head_dim:(slot + 1) * head_dim] = written[:, s * head_dim:(s + 1) * head_dim]
    return out


# --- tokenizer --------------------------------------------------------------------------------

@dataclass
class GgufVocab:
    model: str  # "llama" (SentencePiece-style BPE with byte fallback) or "gpt2" (byte-level BPE)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_space_prefix: bool = False  # SentencePiece: "▁" before the text, as Metaspace's prepend_scheme says


def _token_types(tokens: list[str], specials: set[int], added: set[int], unk: int | None,
                 byte_pieces: bool) -> list[int]:
    kinds = gguf.TokenType
    types = []
    for i, piece in enumerate(tokens):
        if i == unk:
            types.append(kinds.UNKNOWN)
        elif i in specials:
            types.append(kinds.CONTROL)
        elif i in added:
            types.append(kinds.USER_DEFINED)
        elif byte_pieces and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(kinds.BYTE)
        else:
            types.append(kinds.NORMAL)
    return [int(t) for t in types]


def _bpe_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer with the same splitting rules."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)
    if pre_tokenizer and byte_level(pre_tokenizer):
        return "gpt-2"  # the GPT-2 regex: 's|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        parts = pre_tokenizer.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"  # each digit alone, then the GPT-2 regex
    raise ExportError(f"byte-level BPE tokenizer with pre-tokenizer {json.dumps(pre_tokenizer)}: no llama.cpp "
                      "pre-tokenizer is known to split text the same way")


def gguf_vocab(tokenizer, vocab_size: int) -> GgufVocab:
    """The tokenizer as llama.cpp reads it, from the Hugging Face fast tokenizer's own description
    (tokenizer.json): SentencePiece-style BPE (Metaspace, byte fallback; Llama 1/2, stories260K) as
    `llama`, byte-level BPE (GPT-2 style; SmolLM2, the demo's tokenizer) as `gpt2`. The model's
    embedding may have more rows than the tokenizer has tokens: those are written as unused tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export reads "
                          "tokenizer.json")
    spec = json.loads(backend.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE":
        raise ExportError(f"tokenizer model {bpe.get('type')}: GGUF export writes BPE tokenizers only")
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_size} rows")
    by_id = {i: piece for piece, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    unused = {i for i in range(vocab_size) if i not in by_id}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    unk = vocab.get(bpe.get("unk_token")) if bpe.get("unk_token") else None
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special_ids = {name: int(i) for name, i in ids.items() if i is not None}
    pre = spec.get("pre_tokenizer")
    sentencepiece = bpe.get("byte_fallback") and (
        (pre or {}).get("type") == "Metaspace" or "Prepend" in json.dumps(spec.get("normalizer")))
    # The pipeline feeds every document as [BOS] text EOS, so a model it trained expects BOS first.
    add_bos = "bos" in special_ids
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores
        # highest; Hugging Face's BPE the pair of lowest merge rank: score = -(first rank making it).
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1) if " " in m else m, r)
        scores = [-float(rank[t]) if t in rank else (0.0 if i in specials or len(t) <= 1 or i in unused
                                                      else -1e9) for i, t in enumerate(tokens)]
        types = _token_types(tokens, specials, added - specials, unk, byte_pieces=True)
        types = [int(gguf.TokenType.UNUSED) if i in unused else t for i, t in enumerate(types)]
        metaspace = (pre or {}).get("type") == "Metaspace"
        prefix = pre.get("prepend_scheme", "always") != "never" if metaspace else True  # legacy: normalizer prepends
        return GgufVocab("llama", None, tokens, types, scores, None, special_ids, add_bos, prefix)
    if spec.get("normalizer") is not None:
        raise ExportError(f"byte-level BPE tokenizer with normalizer {json.dumps(spec['normalizer'])}: llama.cpp "
                          "does not normalise byte-level BPE input")
    types = _token_types(tokens, specials, added - specials, unk, byte_pieces=False)
    types = [int(gguf.TokenType.UNUSED) if i in unused else t for i, t in enumerate(types)]
    return GgufVocab("gpt2", _bpe_pre(pre), tokens, types, None, merges, special_ids, add_bos)


def _write_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)


# --- the file ---------------------------------------------------------------------------------

def _stored(name: str, array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType, bool]:
    """(data, type, fell back to f16) of one tensor in a file of `gguf_type`."""
    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32, False
    if gguf_type == "q8_0":
        if array.shape[-1] % _Q8_BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(array.astype(np.float32), qtype), qtype, False
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16, True
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16, False


# How one tensor is stored: (GGUF name, float32 array as written, its layer or None) -> (data, type).
Store = Callable[[str, np.ndarray, "DeciLayer | None"], tuple[np.ndarray, gguf.GGMLQuantizationType]]


def write_gguf(model, tokenizer, path: str | os.PathLike, gguf_type: str = "f16", name: str = "pruned",
               store: Store | None = None, header_only: bool = False) -> ExportReport:
    """Write `model` (a pruned model of `pipeline.model.pruned_llama` or a dense Llama / Mistral / Qwen2)
    and its tokenizer as a `deci` GGUF of `gguf_type` (f32, f16, q8_0, or one of `LLAMA_CPP_TYPES`).

    `store`: each tensor stored as this function says instead (`gguf_type` "mixed": one type per tensor, as
    `pipeline.quant.export` writes them). `header_only`: write header, metadata and tensor index only
    (`report.bytes` is then their unpadded size, `report.tensor_shapes` the index)."""
    if store is not None:
        gguf_type = "mixed"
    elif gguf_type in LLAMA_CPP_TYPES:
        return _quantized_by_llama_cpp(model, tokenizer, Path(path), gguf_type, name)
    if gguf_type not in WRITTEN_TYPES and gguf_type != "mixed":
        raise ExportError(f"GGUF type '{gguf_type}'; valid: {', '.join(GGUF_TYPES)}")
    check_exportable(model)
    config = model.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    blocks = list(model.model.layers)
    biases = [(getattr(getattr(b.self_attn, "o_proj", None), "bias", None) is not None,
               getattr(getattr(b.mlp, "down_proj", None), "bias", None) is not None) for b in blocks]
    layers = deci_layers(config, biases)
    embedding = model.model.embed_tokens.weight
    vocab = gguf_vocab(tokenizer, embedding.shape[0])
    report = ExportReport(str(path), gguf_type, [la.head_count for la in layers], [la.kv_heads for la in layers],
                          [la.feed_forward_length for la in layers])
    for i, la in enumerate(layers):
        if la.head_count and la.padded_heads == la.head_count:
            report.placeholder_layers.append(f"{i}.attention")
        elif la.padded_heads:
            report.padded_query_heads += la.padded_heads
            report.padded_params += 2 * la.padded_heads * head_dim * hidden
        if not la.mlp:
            report.placeholder_layers.append(f"{i}.mlp")

    writer = gguf.GGUFWriter(os.fspath(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(int(FILE_TYPES.get(gguf_type, gguf.LlamaFileType.GUESSED)))
    if gguf_type != "f16" and gguf_type != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(len(layers))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(report.feed_forward_length)
    writer.add_head_count(report.head_count)
    writer.add_head_count_kv(report.head_count_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(vocab.tokens))
    _write_vocab(writer, vocab)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        yield "token_embd.weight", _array(embedding)
        factors = rope_freq_factors(model, head_dim)
        if factors is not None:
            yield "rope_freqs.weight", factors
        for i, (block, la) in enumerate(zip(blocks, layers)):
            for tensor_name, array in layer_tensors(block, la, hidden, head_dim):
                yield f"blk.{i}.{tensor_name}", array
        yield "output_norm.weight", _array(model.model.norm.weight)
        if not getattr(config, "tie_word_embeddings", False):  # tied: llama.cpp reuses token_embd
            yield "output.weight", _array(model.lm_head.weight)

    for tensor_name, array in tensors():
        if header_only:
            writer.add_tensor_info(tensor_name, array.shape, np.dtype(np.float32), array.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType.F32)
            report.tensor_shapes.append((tensor_name, tuple(array.shape)))
            continue
        if store is not None:
            layer = layers[int(tensor_name.split(".")[1])] if tensor_name.startswith("blk.") else None
            data, qtype = store(tensor_name, array, layer)
            fell_back = False
        else:
            data, qtype, fell_back = _stored(tensor_name, array, gguf_type)
        if fell_back:
            report.unquantized_tensors.append(tensor_name)
        if array.ndim == 2:
            report.tensor_types[tensor_name] = qtype.name.lower()
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if header_only:
        writer.write_ti_data_to_file()
        writer.close()
        report.bytes = Path(path).stat().st_size
        return report
    writer.write_tensors_to_file()
    writer.close()
    report.bytes = Path(path).stat().st_size
    return report


def _quantized_by_llama_cpp(model, tokenizer, path: Path, gguf_type: str, name: str) -> ExportReport:
    """Write f16, then let llama.cpp's own quantizer (K-quants: rows of 256) make `gguf_type`."""
    source = path.with_name(f".{path.name}.f16")
    try:
        report = write_gguf(model, tokenizer, source, "f16", name)
        llama_cpp_quantize(source, path, LLAMA_CPP_TYPES[gguf_type])
    finally:
        source.unlink(missing_ok=True)
    report.path, report.gguf_type, report.bytes = str(path), gguf_type, path.stat().st_size
    report.unquantized_tensors = []  # llama.cpp decides per tensor (it logs its fallbacks)
    return report


def llama_cpp_quantize(source: Path, out: Path, ftype: str) -> None:
    """llama.cpp's quantizer (`llama_model_quantize` of llama-cpp-python) makes `out` from the f16 `source`;
    `ftype`: the name of its llama_ftype constant, e.g. LLAMA_FTYPE_MOSTLY_Q4_K_M."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError(f"{out.name} is made by llama.cpp's quantizer: install llama-cpp-python "
                          "(.venv/bin/pip install -r requirements-eval.txt), or use f32, f16 or q8_0") from error
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(out), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({status}) making {out} from {source}")
