"""The layer database (DESIGN.md 2.2): Hessians of the output projections' inputs over the
calibration set, structured OBS per (layer, module), and compact storage of every level.

On disk: `manifest.json` plus one `layer_NNN.safetensors` per layer holding, for each module and
level k, the kept unit indices (`{module}.kept.{k}`) and the corrected output projection on the
kept columns only (`{module}.weight.{k}`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.modeling import MODULE_TYPES, Structure, output_projection
from pipeline.obs import greedy_obs, prepare_hessian, removal_counts
from pipeline.outputs import write_text

MANIFEST = "manifest.json"
PROGRESS = "progress.json"


class DatabaseError(ValueError):
    """A database that is corrupted on disk or was built for another model."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Identifies a model's weights cheaply: config, and each tensor's name, shape and moments."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        total = float(tensor.sum(dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
        digest.update(f"{name}{tuple(tensor.shape)}{total:.6e}{norm:.6e}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_hessians(model, structure: Structure, sequences: torch.Tensor, batch_size: int,
                     dtype: torch.dtype = torch.float64,
                     on_batch: Callable[[int, int], None] | None = None) -> dict:
    """H = X^T X / N for the inputs X of every o_proj and down_proj, from the dense model."""
    hessians, hooks = {}, []
    tokens = 0

    def accumulate(key):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(dtype)
            if key not in hessians:
                hessians[key] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype)
            hessians[key].addmm_(x.T, x)
        return hook

    for layer in range(structure.num_layers):
        for module in MODULE_TYPES:
            hooks.append(output_projection(model, layer, module).register_forward_hook(accumulate((layer, module))))
    try:
        batches = list(torch.split(sequences, batch_size))
        for i, batch in enumerate(batches):
            model(input_ids=batch.to(model.device))
            tokens += batch.numel()
            if on_batch:
                on_batch(i + 1, len(batches))
    finally:
        for h in hooks:
            h.remove()
    return {key: h / tokens for key, h in hessians.items()}


def obs_unit_heads(structure: Structure, module: str, attn_unit: str, mlp_unit: int) -> int:
    """How many of the model's query heads (attention) or neurons (MLP) one OBS unit removes:
    a query head, a key/value head with its query heads (`kv_group`), or a block of neurons."""
    if module == "attn":
        return structure.group_size if attn_unit == "kv_group" else 1
    return mlp_unit


def check_units(structure: Structure, attn_unit: str, mlp_unit: int) -> None:
    if attn_unit not in ("query", "kv_group"):
        raise ValueError(f"database.attn_unit is {attn_unit!r}: valid values are 'query', 'kv_group'")
    if structure.intermediate_size % mlp_unit:
        raise ValueError(f"database.mlp_unit ({mlp_unit}) does not divide the MLP width "
                         f"({structure.intermediate_size}); pick a divisor")


def build_database(model, structure: Structure, hessians: dict, levels: int, damp: float, out_dir: Path,
                   identity: dict, on_module: Callable[[int, str, list[float]], None] | None = None,
                   attn_unit: str = "query", mlp_unit: int = 1) -> dict:
    """Run OBS for every (layer, module) and write the compact database; returns the manifest.
    Kept indices are stored in OBS units; `Database` hands them out as query heads / neurons.

    Layers already finished in `out_dir` by an interrupted call with the same inputs are kept
    (`progress.json` lists them with their losses), so a rerun resumes at the first missing layer."""
    check_units(structure, attn_unit, mlp_unit)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_unit = {m: obs_unit_heads(structure, m, attn_unit, mlp_unit) for m in MODULE_TYPES}
    counts = {m: removal_counts(structure.units(m) // per_unit[m], levels) for m in MODULE_TYPES}
    progress_file = out_dir / PROGRESS
    done = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    for layer in range(structure.num_layers):
        if str(layer) in done and (out_dir / _layer_file(layer)).is_file():
            continue
        tensors, layer_losses = {}, {}
        for module in MODULE_TYPES:
            weight = output_projection(model, layer, module).weight.detach()
            hessian = prepare_hessian(hessians[(layer, module)], damp)
            snapshots = greedy_obs(weight.cpu(), hessian, structure.unit_size(module) * per_unit[module],
                                   counts[module])
            for k, snap in enumerate(snapshots):
                tensors[f"{module}.kept.{k}"] = snap.kept_units.to(torch.int64)
                tensors[f"{module}.weight.{k}"] = snap.weight.to(weight.dtype).contiguous()
            layer_losses[module] = [s.loss for s in snapshots]
            if on_module:
                on_module(layer, module, layer_losses[module])
        save_file(tensors, str(out_dir / _layer_file(layer)))
        done[str(layer)] = layer_losses
        write_text(progress_file, json.dumps(done))
    losses = {m: [done[str(i)][m] for i in range(structure.num_layers)] for m in MODULE_TYPES}
    manifest = {
        "format": 1,
        "sha256": {_layer_file(i): file_sha256(out_dir / _layer_file(i)) for i in range(structure.num_layers)},
        "levels": levels,
        "structure": structure.__dict__,
        "attn_unit": attn_unit,
        "mlp_unit": mlp_unit,
        "kept_units": {m: [structure.units(m) - c * per_unit[m] for c in counts[m]] for m in MODULE_TYPES},
        "obs_loss": losses,
        "damp": damp,
        "identity": identity,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    progress_file.unlink()
    return manifest


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


class Database:
    """Read access to a built database; tensors are loaded lazily and kept in memory. Each layer file
    is checked against its manifest checksum the first time it is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no layer database at '{self.path}' ({MANIFEST} missing): run the database stage")
        self.manifest = json.loads(manifest_path.read_text())
        self.levels: int = self.manifest["levels"]
        self.structure = Structure(**self.manifest["structure"])
        self.per_unit = {m: obs_unit_heads(self.structure, m, self.manifest.get("attn_unit", "query"),
                                           self.manifest.get("mlp_unit", 1)) for m in MODULE_TYPES}
        self._cache: dict = {}
        self._verified: set[int] = set()

    def check_model(self, model) -> None:
        """Refuse to serve a model other than the one the database was built from."""
        built_for = self.manifest["identity"].get("model_fingerprint")
        if built_for and built_for != model_fingerprint(model):
            raise DatabaseError(
                f"the layer database at '{self.path}' was built for another model "
                f"({self.manifest['identity'].get('model')}, fingerprint {built_for}) than the one loaded "
                f"(fingerprint {model_fingerprint(model)}): rebuild it (dvc repro)")

    def _verify(self, layer: int) -> Path:
        path = self.path / _layer_file(layer)
        if layer not in self._verified:
            expected = self.manifest.get("sha256", {}).get(_layer_file(layer))
            if not path.is_file():
                raise DatabaseError(f"layer database file '{path}' is missing: rebuild the database (dvc repro)")
            if expected and file_sha256(path) != expected:
                raise DatabaseError(f"layer database file '{path}' is corrupted (checksum mismatch): rebuild it "
                                    "with `dvc repro --force database` or restore it with `dvc checkout database`")
            self._verified.add(layer)
        return path

    def level_weight(self, layer: int, module: str, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept query heads or neurons, corrected output weight on their columns) of one module at one level."""
        if not 0 <= level <= self.levels:
            raise ValueError(f"level {level} outside 0..{self.levels}")
        key = (layer, module, level)
        if key not in self._cache:
            with safe_open(str(self._verify(layer)), framework="pt") as f:
                units = f.get_tensor(f"{module}.kept.{level}")
                n = self.per_unit[module]
                heads = (units[:, None] * n + torch.arange(n)).reshape(-1)
                self._cache[key] = (heads, f.get_tensor(f"{module}.weight.{level}"))
        return self._cache[key]

    def weights_for(self, levels: dict[str, list[int]]) -> dict:
        """`levels[module][layer]` -> {(layer, module): (kept units, weight)} for `materialize`."""
        return {(layer, module): self.level_weight(layer, module, lv)
                for module in MODULE_TYPES for layer, lv in enumerate(levels[module])}

    def kept_units(self, module: str, level: int) -> int:
        return self.manifest["kept_units"][module][level]
