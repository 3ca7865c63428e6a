"""llama.cpp's own presets of a whole model (what `llama-quantize model-f16.gguf out.gguf Q4_K_M` makes), the
first alternative a user has at a given file size, and the per-tensor types such a file chose, so the same
mix can be rewritten with importance weights (llama.cpp's `--imatrix`) by `write_gguf(types=...)`."""
from __future__ import annotations

from pathlib import Path

import gguf

from pipeline.errors import ExportError
from pipeline.model.gguf_export import llama_cpp_quantize

PRESET_FTYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q5_1": "Q5_1",
                 "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_1": "Q4_1", "q4_0": "Q4_0",
                 "iq4_nl": "IQ4_NL", "q3_k_l": "Q3_K_L", "q3_k_m": "Q3_K_M", "q3_k_s": "Q3_K_S", "q2_k": "Q2_K"}


def quantize_file(source: Path, out: Path, preset: str) -> None:
    """llama.cpp's quantizer makes `out` from the f16 `source` as its preset `preset`."""
    if preset not in PRESET_FTYPES:
        raise ExportError(f"llama.cpp preset '{preset}'; valid: {', '.join(PRESET_FTYPES)}")
    llama_cpp_quantize(source, out, f"LLAMA_FTYPE_MOSTLY_{PRESET_FTYPES[preset]}")


def tensor_types(path: Path) -> dict[str, str]:
    """Name -> type of every tensor in a GGUF file (lower-case ggml type names)."""
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
