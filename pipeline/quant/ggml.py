"""Quantize and dequantize one tensor exactly as llama.cpp stores it.

Quantization calls llama.cpp's own C quantizer, `ggml_quantize_chunk` of the `libggml-base` that the pinned
llama-cpp-python ships, one tensor at a time, with optional importance weights per input column (what
llama.cpp's imatrix holds: the mean square of each column's activations). Dequantization uses the `gguf`
package's numpy code, which reads every type back; both sides are tested against llama.cpp's own files.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np

from pipeline.errors import ExportError
from pipeline.quant.types import ggml_type, tensor_bytes


@functools.cache
def _library() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError("quantizing to GGUF types uses llama.cpp's quantizer: install llama-cpp-python "
                          "(.venv/bin/pip install -r requirements-eval.txt)") from error
    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob("libggml-base.*"))
    if not candidates:
        raise ExportError(f"llama-cpp-python has no libggml-base library in {folder}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def quantize(weight: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes llama.cpp stores for the 2-D float32 `weight` (rows last) as `type_name`; `importance`:
    one non-negative weight per column (None: plain round-to-nearest-style quantization, as without an
    imatrix). f32 / f16 are plain casts."""
    if type_name == "f32":
        return np.ascontiguousarray(weight, dtype=np.float32)
    if type_name == "f16":
        return np.ascontiguousarray(weight, dtype=np.float16)
    src = np.ascontiguousarray(weight, dtype=np.float32)
    rows, width = src.reshape(-1, src.shape[-1]).shape
    qtype = int(ggml_type(type_name))
    lib = _library()
    if importance is None and lib.ggml_quantize_requires_imatrix(qtype):
        raise ExportError(f"{type_name} needs importance weights")
    out = np.empty(tensor_bytes(src.shape, type_name), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        imatrix = np.ascontiguousarray(importance, dtype=np.float32)
        if imatrix.shape != (width,):
            raise ValueError(f"importance has shape {imatrix.shape}, the rows {width} columns")
    written = lib.ggml_quantize_chunk(qtype, src.ctypes.data, out.ctypes.data, 0, rows, width,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {type_name} {src.shape}, "
                           f"expected {out.nbytes}")
    return out.reshape(*src.shape[:-1], -1)


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """Float32 values of stored data (the inverse of `quantize` up to its rounding)."""
    if type_name in ("f32", "f16"):
        return np.asarray(data, dtype=np.float32)
    return gguf.quants.dequantize(data, ggml_type(type_name)).astype(np.float32, copy=False)


def roundtrip(weight: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """What llama.cpp computes with: `weight` quantized to `type_name` and read back, as float32."""
    return dequantize(quantize(weight, type_name, importance), type_name)
