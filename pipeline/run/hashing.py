"""Content hashes that identify work: a piece of work by its params and input files (so unfinished
work is only resumed by the same work), files and folders by their bytes, a model by its weights."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

_BLOCK = 1 << 22


def _json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()  # sorted: dict order does not matter


def json_sha256(value, length: int = 64) -> str:
    """sha256 of `value` as JSON with sorted keys."""
    return hashlib.sha256(_json_bytes(value)).hexdigest()[:length]


def inputs_key(values, files=()) -> str:
    """Identifies one piece of work by its params and the bytes of its input files."""
    digest = hashlib.sha256(_json_bytes(values))
    for f in files:
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:16]


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _update_with_file(digest, path)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """sha256 over the relative names and contents of every file in the folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        _update_with_file(digest, path)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Identifies a model's weights cheaply: config, and each tensor's name, shape and moments."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        total = float(tensor.sum(dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
        digest.update(f"{name}{tuple(tensor.shape)}{total:.6e}{norm:.6e}".encode())
    return digest.hexdigest()[:16]
