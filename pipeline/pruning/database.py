"""The layer database (docs/method.md, section 2): Hessians of the output projections' inputs over the
calibration set, structured OBS per (layer, module), and compact storage of every level.

On disk: `manifest.json` plus one `layer_NNN.{attn,mlp}.safetensors` per (layer, module) holding,
for each level k, the kept unit indices (`kept.{k}`) and the corrected output projection on the
kept columns only (`weight.{k}`); its metadata holds the OBS loss of every level.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import ConfigError, DatabaseError
from pipeline.model.structure import MODULE_TYPES, Structure, load_dense_model, output_projection, unit_indices
from pipeline.pruning.block_stream import BlockRunner
from pipeline.pruning.obs import greedy_obs, prepare_hessian, removal_counts
from pipeline.run.distributed import SINGLE, Group
from pipeline.run.hashing import file_sha256, model_fingerprint
from pipeline.run.outputs import DATABASE, atomic_file, write_text

MANIFEST = "manifest.json"
FORMAT = 2


@torch.no_grad()
def block_hessians(runner: BlockRunner, group: Group, dtype: torch.dtype, total_tokens: int,
                   keep_outputs: bool = True) -> dict:
    """Advance `runner` by one block and return H = X^T X / N for the inputs X of that block's
    o_proj and down_proj, summed over every rank's calibration shard (N = `total_tokens`, all ranks')."""
    layer = runner.next_block
    hessians, hooks = {}, []

    def accumulate(module):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(dtype)
            if module not in hessians:
                hessians[module] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
            hessians[module].addmm_(x.T, x)
        return hook

    for module in MODULE_TYPES:
        hooks.append(output_projection(runner.model, layer, module).register_forward_hook(accumulate(module)))
    try:
        runner.advance(keep_outputs)
    finally:
        for h in hooks:
            h.remove()
    return {m: group.all_reduce_sum_(hessians[m].to(group.device)) / total_tokens for m in MODULE_TYPES}


def module_owner(layer: int, module: str, world: int) -> int:
    """Which rank runs OBS for (layer, module). Blocks are processed in groups of `world`; within a
    group every rank gets one MLP and one attention module (the MLP dominates the cost), so the
    ranks finish a group together."""
    i = layer % world
    return i if module == "mlp" else (i + 1) % world


def obs_unit_heads(structure: Structure, module: str, attn_unit: str, mlp_unit: int) -> int:
    """How many of the model's query heads (attention) or neurons (MLP) one OBS unit removes:
    a query head, a key/value head with its query heads (`kv_group`), or a block of neurons."""
    if module == "attn":
        return structure.group_size if attn_unit == "kv_group" else 1
    return mlp_unit


def check_units(structure: Structure, attn_unit: str, mlp_unit: int) -> None:
    if attn_unit not in ("query", "kv_group"):
        raise ConfigError(f"database.attn_unit is {attn_unit!r}: valid values are 'query', 'kv_group'")
    if structure.intermediate_size % mlp_unit:
        raise ConfigError(f"database.mlp_unit ({mlp_unit}) does not divide the MLP width "
                         f"({structure.intermediate_size}); pick a divisor")


def build_database(model, structure: Structure, calib: torch.Tensor, levels: int, damp: float, out_dir: Path,
                   identity: dict, *, batch_size: int = 8, hessian_dtype: torch.dtype = torch.float64,
                   attn_unit: str = "query", mlp_unit: int = 1, group: Group = SINGLE,
                   spill_file: Path | None = None,
                   on_module: Callable[[int, str, list[float]], None] | None = None) -> dict | None:
    """Stream the calibration windows through the dense model block by block, and run OBS for each
    (layer, module) on the Hessians of that block; write the compact database, return the manifest
    (on rank 0; None on the other ranks). Kept indices are stored in OBS units; `Database` hands
    them out as query heads / neurons.

    Each rank streams its shard of `calib`; Hessians are summed over ranks and each (layer, module)
    is solved by one rank (`module_owner`). Each module's file is written atomically, so a rerun with
    the same inputs into the same `out_dir` skips finished modules and resumes the stream at the
    first block with work left."""
    check_units(structure, attn_unit, mlp_unit)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_unit = {m: obs_unit_heads(structure, m, attn_unit, mlp_unit) for m in MODULE_TYPES}
    counts = {m: removal_counts(structure.unit_count(m) // per_unit[m], levels) for m in MODULE_TYPES}
    def missing(layer: int) -> list[str]:
        return [m for m in MODULE_TYPES if not (out_dir / module_file(layer, m)).is_file()]

    todo = [layer for layer in range(structure.num_layers) if missing(layer)]
    group.barrier()  # every rank has looked at the same finished files
    if todo:
        runner = BlockRunner(model, group.shard(calib), batch_size, group.device, spill_file)
        for _ in range(todo[0]):
            runner.advance()
        for first in range(todo[0] - todo[0] % group.world, structure.num_layers, group.world):
            owned = []
            for layer in range(max(first, todo[0]), min(first + group.world, todo[-1] + 1)):
                if layer not in todo:
                    runner.advance()
                    continue
                hessians = block_hessians(runner, group, hessian_dtype, calib.numel(), keep_outputs=layer != todo[-1])
                owned += [(layer, m, hessians[m]) for m in missing(layer)
                          if module_owner(layer, m, group.world) == group.rank]
                del hessians
            for layer, module, hessian in owned:
                losses = _solve_module(model, structure, layer, module, prepare_hessian(hessian, damp),
                                       structure.unit_size(module) * per_unit[module], counts[module], out_dir)
                if on_module:
                    on_module(layer, module, losses)
            del owned
            if first + group.world > todo[-1]:
                break
    group.barrier()
    if not group.is_main:
        return None
    return write_manifest(out_dir, structure, levels, attn_unit, mlp_unit, identity, {"method": "obs", "damp": damp})


def write_manifest(out_dir: Path, structure: Structure, levels: int, attn_unit: str, mlp_unit: int, identity: dict,
                   extra: dict) -> dict:
    """The manifest of a database whose module files are all in `out_dir`: checksums, structure, kept
    units per level and each module's loss per level (`obs_loss`: OBS's, or the removed units' summed
    score for the scored methods); returns it."""
    per_unit = {m: obs_unit_heads(structure, m, attn_unit, mlp_unit) for m in MODULE_TYPES}
    counts = {m: removal_counts(structure.unit_count(m) // per_unit[m], levels) for m in MODULE_TYPES}
    losses = {m: [_stored_losses(out_dir / module_file(i, m)) for i in range(structure.num_layers)]
              for m in MODULE_TYPES}
    files = [module_file(i, m) for i in range(structure.num_layers) for m in MODULE_TYPES]
    manifest = {
        "format": FORMAT,
        "sha256": {f: file_sha256(out_dir / f) for f in files},
        "levels": levels,
        "structure": structure.__dict__,
        "attn_unit": attn_unit,
        "mlp_unit": mlp_unit,
        "kept_units": {m: [structure.unit_count(m) - c * per_unit[m] for c in counts[m]] for m in MODULE_TYPES},
        "obs_loss": losses,
        **extra,
        "identity": identity,
    }
    write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _solve_module(model, structure: Structure, layer: int, module: str, hessian: torch.Tensor, unit_size: int,
                  counts: list[int], out_dir: Path) -> list[float]:
    """Structured OBS for one module, on the Hessian's device; writes the module's file atomically."""
    weight = output_projection(model, layer, module).weight.detach()
    snapshots = greedy_obs(weight.to(hessian.device), hessian, unit_size, counts)
    tensors = {}
    for k, snap in enumerate(snapshots):
        tensors[f"kept.{k}"] = snap.kept_units.to("cpu", torch.int64)
        tensors[f"weight.{k}"] = snap.weight.to("cpu", weight.dtype).contiguous()
    losses = [s.loss for s in snapshots]
    with atomic_file(out_dir / module_file(layer, module)) as tmp:
        save_file(tensors, str(tmp), metadata={"obs_loss": json.dumps(losses)})
    return losses


def _stored_losses(path: Path) -> list[float]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["obs_loss"])


def finished_modules(out_dir: Path) -> int:
    """How many (layer, module) files an interrupted build left in `out_dir`."""
    return len(list(Path(out_dir).glob("layer_*.safetensors")))


def module_file(layer: int, module: str) -> str:
    return f"layer_{layer:03d}.{module}.safetensors"


def open_with_dense_model(params, device) -> tuple[Database, torch.nn.Module, object]:
    """What the stages after the database start from: the database, the dense model it was built from
    (checked, then moved to `device`) and its tokenizer."""
    dense, tokenizer = load_dense_model(params)
    db = Database.open_for(DATABASE, dense)
    return db, dense.to(device), tokenizer


class Database:
    """Read access to a built database; tensors are loaded lazily and the most recently used ones kept in
    memory, up to `cache_bytes` (all of Llama-3.1-8B's levels would take about 26 GB). Each module's file
    is checked against its manifest checksum the first time it is read."""

    def __init__(self, path: str | Path, cache_bytes: int = 4 * 2**30):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no layer database at '{self.path}' ({MANIFEST} missing): run the database stage")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DatabaseError(f"the layer database at '{self.path}' has format {self.manifest.get('format')}, "
                                f"this version reads format {FORMAT}: rebuild it (dvc repro --force database)")
        self.levels: int = self.manifest["levels"]
        self.structure = Structure(**self.manifest["structure"])
        self.per_unit = {m: obs_unit_heads(self.structure, m, self.manifest.get("attn_unit", "query"),
                                           self.manifest.get("mlp_unit", 1)) for m in MODULE_TYPES}
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes, self.cache_bytes = 0, cache_bytes
        self._biases: dict = {}
        self._verified: set[str] = set()

    @classmethod
    def open_for(cls, path: str | Path, model) -> Database:
        """The database at `path`, refused unless it was built from `model`."""
        db = cls(path)
        db.check_model(model)
        return db

    def check_model(self, model) -> None:
        """Refuse to serve a model other than the one the database was built from."""
        built_for = self.manifest["identity"].get("model_fingerprint")
        if built_for and built_for != model_fingerprint(model):
            raise DatabaseError(
                f"the layer database at '{self.path}' was built for another model "
                f"({self.manifest['identity'].get('model')}, fingerprint {built_for}) than the one loaded "
                f"(fingerprint {model_fingerprint(model)}): rebuild it (dvc repro)")

    def _verify(self, layer: int, module: str) -> Path:
        name = module_file(layer, module)
        path = self.path / name
        if name not in self._verified:
            expected = self.manifest["sha256"].get(name)
            if not path.is_file():
                raise DatabaseError(f"layer database file '{path}' is missing: rebuild the database (dvc repro)")
            if expected and file_sha256(path) != expected:
                raise DatabaseError(f"layer database file '{path}' is corrupted (checksum mismatch): rebuild it "
                                    "with `dvc repro --force database` or restore it with `dvc checkout database`")
            self._verified.add(name)
        return path

    def level_weight(self, layer: int, module: str, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept query heads or neurons, corrected output weight on their columns) of one module at one level."""
        if not 0 <= level <= self.levels:
            raise ValueError(f"level {level} outside 0..{self.levels}")
        key = (layer, module, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with safe_open(str(self._verify(layer, module)), framework="pt") as f:
            entry = unit_indices(f.get_tensor(f"kept.{level}"), self.per_unit[module]), f.get_tensor(f"weight.{level}")
        self._cache[key] = entry
        self._cached_bytes += _nbytes(entry)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return entry

    def level_units(self, layer: int, module: str, level: int) -> torch.Tensor:
        """The kept query heads or neurons of one module at one level, without reading its weight."""
        if (layer, module, level) in self._cache:
            return self._cache[(layer, module, level)][0]
        with safe_open(str(self._verify(layer, module)), framework="pt") as f:
            return unit_indices(f.get_tensor(f"kept.{level}"), self.per_unit[module])

    def level_bias(self, layer: int, module: str, level: int) -> torch.Tensor | None:
        """The output projection's whole bias at that level where the database stores one (FLAP's bias
        compensation, the dense bias included), else None (the dense model's bias, if any, stands)."""
        if not 0 <= level <= self.levels:
            raise ValueError(f"level {level} outside 0..{self.levels}")
        key = (layer, module, level)
        if key not in self._biases:  # one hidden-size vector (or None) per level: kept outside the byte budget
            with safe_open(str(self._verify(layer, module)), framework="pt") as f:
                names = set(f.keys())
                self._biases[key] = f.get_tensor(f"bias.{level}") if f"bias.{level}" in names else None
        return self._biases[key]

    def weights_for(self, levels: dict[str, list[int]]) -> dict:
        """`levels[module][layer]` -> {(layer, module): (kept units, weight, bias or None)} for `materialize`."""
        return {(layer, module): (*self.level_weight(layer, module, lv), self.level_bias(layer, module, lv))
                for module in MODULE_TYPES for layer, lv in enumerate(levels[module])}

    def unit_scores(self, layer: int, module: str) -> torch.Tensor:
        """The scores a scored database (magnitude, wanda_sp, flap) ranked the module's units by, one per
        database unit (`per_unit` query heads or neurons); higher is more important."""
        with safe_open(str(self._verify(layer, module)), framework="pt") as f:
            if "score" not in set(f.keys()):
                raise DatabaseError(f"the {self.method} database at '{self.path}' stores no unit scores")
            return f.get_tensor("score")

    @property
    def method(self) -> str:
        """How the units were chosen: obs, magnitude, wanda_sp or flap."""
        return self.manifest.get("method", "obs")

    def kept_count(self, module: str, level: int) -> int:
        return self.manifest["kept_units"][module][level]


def _nbytes(entry: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in entry)
