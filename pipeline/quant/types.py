"""GGUF tensor types as llama.cpp stores them: names, block sizes, exact byte counts, and the type a
tensor really gets when its rows are not a multiple of the type's block.

llama.cpp's quantizer silently replaces a K-quant (blocks of 256) on a row whose width is not a multiple
of 256 by a 32-block type of about the same size (llama-quant.cpp: q2_k/q3_k -> iq4_nl, q4_k -> q5_0,
q5_k -> q5_1, q6_k -> q8_0), and any type on a row that is not a multiple of 32 by f16. Here that rule is
applied explicitly: `effective_type` is what a tensor of that width is written as, the byte budget counts
it, the fitness quantizes with it, and the export reports each replaced tensor, so nothing falls back
unseen. (SmolLM2's width 576 is 2.25 x 256: every tensor whose rows are the hidden size falls back.)
"""
from __future__ import annotations

import gguf

from pipeline.errors import ConfigError

# The ladder a search may use (best first by bits per weight). i-quants below 4 bits need an importance
# matrix for every tensor and 256-wide rows; they are left out.
LADDER_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "iq4_nl", "q4_0", "q3_k", "q2_k")
K_QUANT_FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
DATA_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name.upper()]


def block_size(name: str) -> int:
    return gguf.GGML_QUANT_SIZES[ggml_type(name)][0]


def bits_per_weight(name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[ggml_type(name)]
    return 8 * size / block


def effective_type(name: str, row_width: int, ndim: int = 2) -> str:
    """The type a tensor whose rows are `row_width` wide is written as (1-D tensors: f32)."""
    if ndim == 1 or name == "f32":
        return "f32"
    if name in K_QUANT_FALLBACK and row_width % block_size(name):
        name = K_QUANT_FALLBACK[name]
    return name if row_width % block_size(name) == 0 else "f16"


def tensor_bytes(shape: tuple[int, ...], name: str) -> int:
    """Bytes of a tensor of `shape` (rows last, as numpy / torch) stored as type `name`, without padding."""
    block, size = gguf.GGML_QUANT_SIZES[ggml_type(name)]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} are not a multiple of {name}'s block of {block}")
    return rows * shape[-1] // block * size


def padded(nbytes: int, alignment: int = DATA_ALIGNMENT) -> int:
    """GGUF aligns every tensor's data (and the data section's start) to `alignment` bytes."""
    return (nbytes + alignment - 1) // alignment * alignment


def check_ladder(types: list[str], key: str = "search.quant_types") -> None:
    unknown = [t for t in types if t not in LADDER_TYPES]
    if unknown or not types:
        raise ConfigError(f"{key} {types}: each must be one of {', '.join(LADDER_TYPES)}")
    if len(set(types)) != len(types):
        raise ConfigError(f"{key} {types}: a type is listed twice")
