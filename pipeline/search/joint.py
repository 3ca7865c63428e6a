"""The search over file bytes (docs/method.md, "Size in bytes"): a genotype holds a structure level per module
and a GGUF type per tensor (`pipeline.quant.budget`); its size is the exact byte count of the file it exports
to. Mutation switches levels as the structure search does and steps types up and down the ladder, then is
repaired into `budget_tolerance` of the byte budget. Freezing an axis gives structure-only (one type) and
quantization-only (levels at 0) searches with the same code.

Scoring holds one dense-shaped model: each tensor is set to what llama.cpp will hold, i.e. quantized by
llama.cpp's quantizer (with the calibration importance weights) and read back, only where a gene changed;
round trips are cached within a byte bound.
"""
from __future__ import annotations

import copy
import random
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.gguf_export import deci_output_columns, model_output_columns
from pipeline.model.structure import ATTN, MLP, masked_weight, output_projection, unit_indices
from pipeline.quant.budget import ATTN_GENES, LAYER_GENES, MLP_GENES, FileLayout, stored_bytes
from pipeline.quant.ggml import roundtrip
from pipeline.quant.types import bits_per_weight, effective_type
from pipeline.search.evolution import genotype_key, mutate, switch_count

MODES = ("joint", "quant", "structure")


@dataclass
class Space:
    """What a byte search may change: `ladder` (types, best first), whether levels move, the budget band."""
    layout: FileLayout
    ladder: list[str]
    levels: int  # K
    move_levels: bool
    budget: int
    tolerance: float

    @property
    def low(self) -> int:
        return int(self.budget * (1 - self.tolerance))

    @property
    def high(self) -> int:
        return int(self.budget * (1 + self.tolerance))

    def within(self, genotype: dict) -> bool:
        return self.low <= self.layout.file_bytes(genotype) <= self.high


def ladder_order(types: list[str]) -> list[str]:
    """The ladder best first (most bits per weight first)."""
    return sorted(types, key=bits_per_weight, reverse=True)


def uniform_genotype(layout: FileLayout, num_layers: int, level: int, type_name: str) -> dict:
    types = {g: [type_name] * num_layers for g in LAYER_GENES}
    types["embd"] = [type_name]
    if not layout.tied:
        types["output"] = [type_name]
    return {ATTN: [level] * num_layers, MLP: [level] * num_layers, "types": types}


def _gene_tensor(layout: FileLayout, genotype: dict, gene: str, layer: int) -> tuple[int, ...] | None:
    """The shape of the tensor of `gene` in `layer` under `genotype` (None: not in the file)."""
    if gene in ("embd", "output"):
        name = "token_embd.weight" if gene == "embd" else "output.weight"
        return dict(layout.fixed).get(name)
    module = ATTN if gene in ATTN_GENES else MLP
    name = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
            "down": "ffn_down"}[gene] + ".weight"
    return dict(getattr(layout, module)[layer][genotype[module][layer]]).get(name)


def tensor_errors(swapper: QuantSwapper, ladder: list[str]) -> dict[tuple[str, int], dict[str, float]]:
    """For every tensor of the dense model (levels 0) and ladder type: the relative output error llama.cpp's
    quantization would make, sum_ij imp_j (W - Q)_ij^2 / sum_ij imp_j W_ij^2, with imp the calibration
    importance of each input column (the diagonal approximation of E||(W - Q) x||^2 / E||W x||^2). Computed
    through the swapper's round trips, so they are cached for the search."""
    layers = swapper.structure.num_layers
    errors: dict[tuple[str, int], dict[str, float]] = {}
    inputs = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
              "down": "down_in"}
    for layer in range(layers):
        for gene in LAYER_GENES:
            if gene in ("o", "down"):  # level 0 keeps every column, in order
                dense = swapper.db.level_weight(layer, ATTN if gene == "o" else MLP, 0)[1].float().numpy()
            else:
                dense = swapper.dense[(layer, gene)]
            imp = swapper._imp(f"{layer}.{inputs[gene]}")
            imp = np.ones(dense.shape[1], np.float32) if imp is None else imp
            scale = float((dense ** 2 @ imp).sum()) or 1.0
            per_type = {}
            for kind in ladder:
                if gene == "o":
                    q = swapper._attention_output(layer, 0, kind).numpy()
                elif gene == "down":
                    q = swapper._down(layer, 0, kind).numpy()
                else:
                    q = swapper._rows(layer, gene, kind).numpy()
                per_type[kind] = float(((dense - q) ** 2 @ imp).sum()) / scale
            errors[(gene, layer)] = per_type
    for gene in ("embd", *(() if swapper.layout.tied else ("output",))):
        dense = swapper.dense[gene]
        imp = swapper._imp("output_in")
        imp = np.ones(dense.shape[1], np.float32) if imp is None else imp
        scale = float((dense ** 2 @ imp).sum()) or 1.0
        errors[(gene, 0)] = {kind: float(((dense - roundtrip(dense, effective_type(kind, dense.shape[1]), imp)) ** 2
                                          @ imp).sum()) / scale for kind in ladder}
    return errors


def calibrated_errors(errors: dict, ladder: list[str], swapper: QuantSwapper, score, num_layers: int) -> dict:
    """The relative errors of `tensor_errors` made comparable across kinds of tensor: for each gene (q, ..., down,
    the embedding) and type, the measured rise of `score` (the search's fitness on a few rows) when every tensor
    of that gene takes the type and all others the best one, shared among the layers in proportion to their
    relative errors (a value, an output head and a down projection differ in how much a unit of error costs)."""
    base_genotype = uniform_genotype(swapper.layout, num_layers, 0, ladder[0])
    swapper.apply(base_genotype)
    base = score()
    genes = sorted({gene for gene, _ in errors})
    out = {}
    for gene in genes:
        layers = sorted(i for g, i in errors if g == gene)
        for kind in ladder[1:]:
            trial = copy.deepcopy(base_genotype)
            trial["types"][gene] = [kind] * len(trial["types"][gene])
            swapper.apply(trial)
            rise = max(score() - base, 0.0)
            total = sum(errors[(gene, i)][kind] for i in layers) or 1.0
            for i in layers:
                out.setdefault((gene, i), {ladder[0]: 0.0})[kind] = rise * errors[(gene, i)][kind] / total
    swapper.apply(base_genotype)
    return out


def greedy_types(genotype: dict, space: Space, errors: dict) -> dict | None:
    """From `genotype`, the type steps down that cost the least error per byte saved, one at a time, until
    the file fits under the budget's upper edge (the knapsack's greedy solution on the error proxy of
    `tensor_errors`); None when the ladder's bottom does not fit."""
    import heapq
    current = copy.deepcopy(genotype)
    layout = space.layout

    def next_step(gene, i):
        shape = _gene_tensor(layout, current, gene, i)
        if shape is None:
            return None
        now = current["types"][gene][i]
        width = shape[-1]
        at = space.ladder.index(now) + 1
        while at < len(space.ladder) and effective_type(space.ladder[at], width) == effective_type(now, width):
            at += 1
        if at >= len(space.ladder):
            return None
        new = space.ladder[at]
        saved = stored_bytes(shape, now) - stored_bytes(shape, new)
        if saved <= 0:
            return None
        cost = errors[(gene, i)][new] - errors[(gene, i)][now]
        return (cost / saved, gene, i, new)
    heap = [step for gene, values in current["types"].items() for i in range(len(values))
            if (step := next_step(gene, i)) is not None]
    heapq.heapify(heap)
    size = layout.file_bytes(current)
    while size > space.high:
        if not heap:
            return None
        _, gene, i, new = heapq.heappop(heap)
        shape = _gene_tensor(layout, current, gene, i)
        size -= stored_bytes(shape, current["types"][gene][i]) - stored_bytes(shape, new)
        current["types"][gene][i] = new
        if (step := next_step(gene, i)) is not None:
            heapq.heappush(heap, step)
    return current


def start_genotype(space: Space, num_layers: int, rng: random.Random, errors: dict | None = None) -> dict:
    """The start of a byte search, repaired into the band: the least pruned uniform levels at which the types
    fit under the budget's upper edge, the types chosen by `greedy_types` on `errors` (`calibrated_errors`),
    or without errors the best single type that fits. Raises ValueError when nothing fits."""
    levels = range(space.levels + 1) if space.move_levels else [0]
    for level in levels:
        top = uniform_genotype(space.layout, num_layers, level, space.ladder[0])
        if errors is not None and len(space.ladder) > 1:
            fitted = greedy_types(top, space, errors)
        else:
            fitting = (uniform_genotype(space.layout, num_layers, level, kind) for kind in space.ladder)
            fitted = next((g for g in fitting if space.layout.file_bytes(g) <= space.high), None)
        if fitted is not None:
            return repair(fitted, space, rng) or fitted
    smallest = uniform_genotype(space.layout, num_layers, levels[-1], space.ladder[-1])
    raise ValueError(f"the smallest genotype is {space.layout.file_bytes(smallest):,} bytes, above the budget's "
                     f"upper edge {space.high:,}")


def _type_moves(genotype: dict, space: Space, direction: int) -> list[tuple[str, int, str]]:
    """(gene, index, new type) of every type change in `direction` (+1: fewer bits, -1: more) to the next
    ladder type that this tensor, at its current width, would really be written as differently (types its
    rows force to the same fallback are stepped over)."""
    moves = []
    ladder = space.ladder
    for gene, values in genotype["types"].items():
        for i, current in enumerate(values):
            width = space.layout.row_width(genotype, gene, i)
            now = effective_type(current, width)
            at = ladder.index(current) + direction
            while 0 <= at < len(ladder) and effective_type(ladder[at], width) == now:
                at += direction
            if 0 <= at < len(ladder):
                moves.append((gene, i, ladder[at]))
    return moves


def _level_moves(genotype: dict, space: Space, direction: int) -> list[tuple[str, int, int]]:
    if not space.move_levels:
        return []
    return [(m, i, lv + direction) for m in (ATTN, MLP) for i, lv in enumerate(genotype[m])
            if 0 <= lv + direction <= space.levels]


def _moved(genotype: dict, move) -> dict:
    """`genotype` with one gene changed; only the changed list is copied (repair tries many moves per step)."""
    key, index, value = move
    child = {**genotype, "types": dict(genotype["types"])}
    genes = child if key in (ATTN, MLP) else child["types"]
    genes[key] = [*genes[key][:index], value, *genes[key][index + 1:]]
    return child


def repair(genotype: dict, space: Space, rng: random.Random, max_steps: int = 400) -> dict | None:
    """Random single steps toward the band: while too big, a type one step down or a module one level up;
    while too small, the reverse, only among steps that do not overshoot the upper edge. None when the band
    cannot be reached from here."""
    current = genotype
    size = space.layout.file_bytes(current)
    for _ in range(max_steps):
        if space.low <= size <= space.high:
            return current
        shrink = size > space.high
        moves = [*_type_moves(current, space, +1 if shrink else -1),
                 *_level_moves(current, space, +1 if shrink else -1)]
        rng.shuffle(moves)
        for move in moves:
            child = _moved(current, move)
            child_size = space.layout.file_bytes(child)
            if child_size != size and (shrink or child_size <= space.high):
                current, size = child, child_size
                break
        else:
            return None
    return current if space.low <= size <= space.high else None


def mutate_joint(parent: dict, space: Space, rng: random.Random, max_switches: int) -> dict:
    """n = min(U{1..m}, U{1..m}) switches, each on a random free axis: a level switch (one module a level
    down, another up) or a type switch (one tensor a step up the ladder, another a step down)."""
    child = copy.deepcopy(parent)
    axes = [a for a, free in (("levels", space.move_levels), ("types", len(space.ladder) > 1)) if free]
    for _ in range(switch_count(rng, max_switches)):
        if rng.choice(axes) == "levels":
            moved = mutate({ATTN: child[ATTN], MLP: child[MLP]}, space.levels, rng, 1, across_types=True)
            child[ATTN], child[MLP] = moved[ATTN], moved[MLP]
        else:
            ups, downs = _type_moves(child, space, -1), _type_moves(child, space, +1)
            pairs = [(u, d) for u in rng.sample(ups, min(len(ups), 8)) for d in rng.sample(downs, min(len(downs), 8))
                     if u[:2] != d[:2]]
            if pairs:
                up, down = rng.choice(pairs)
                child = _moved(_moved(child, up), down)
    return child


def byte_offspring(parent: dict, count: int, space: Space, rng: random.Random, max_switches: int) -> list[dict]:
    """`count` distinct children within the budget band, none equal to the parent (fewer if none found)."""
    children, seen = [], {genotype_key(parent)}
    for _ in range(count * 50):
        child = repair(mutate_joint(parent, space, rng, max_switches), space, rng)
        if child is not None and genotype_key(child) not in seen:
            seen.add(genotype_key(child))
            children.append(child)
            if len(children) == count:
                break
    return children


class QuantSwapper:
    """One dense-shaped model whose every tensor holds what llama.cpp would hold for the applied genotype:
    each layer's attention / MLP is rewritten only when its level or one of its types changed, from round
    trips cached within `cache_bytes`."""

    def __init__(self, model, db, layout: FileLayout, importance: dict[str, torch.Tensor], cache_bytes: int):
        self.model, self.db, self.layout, self.importance = model, db, layout, importance
        self.structure = db.structure
        self.dense = {}
        for i, block in enumerate(model.model.layers):
            for gene, proj in (("q", block.self_attn.q_proj), ("k", block.self_attn.k_proj),
                               ("v", block.self_attn.v_proj), ("gate", block.mlp.gate_proj),
                               ("up", block.mlp.up_proj)):
                self.dense[(i, gene)] = proj.weight.detach().float().cpu().numpy().copy()
        self.dense["embd"] = model.model.embed_tokens.weight.detach().float().cpu().numpy().copy()
        if not layout.tied:
            self.dense["output"] = model.lm_head.weight.detach().float().cpu().numpy().copy()
        self.applied: dict = {}
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self.cached_bytes = cache_bytes, 0
        self.swaps = self.quantized = 0

    def _roundtrip(self, key: tuple, make) -> torch.Tensor:
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        value = torch.from_numpy(make())
        self.quantized += 1
        size = value.numel() * value.element_size()
        if size <= self.cache_bytes:
            self.cache[key] = value
            self.cached_bytes += size
            while self.cached_bytes > self.cache_bytes:
                _, old = self.cache.popitem(last=False)
                self.cached_bytes -= old.numel() * old.element_size()
        return value

    def _imp(self, key: str) -> np.ndarray | None:
        value = self.importance.get(key)
        return None if value is None else value.numpy()

    def _rows(self, layer: int, gene: str, type_name: str) -> torch.Tensor:
        """A q/k/v/gate/up weight, every dense row (quantization is per row: kept rows are a subset)."""
        dense = self.dense[(layer, gene)]
        kind = effective_type(type_name, dense.shape[-1])
        imp = self._imp(f"{layer}.{'attn_in' if gene in ATTN_GENES else 'mlp_in'}")
        return self._roundtrip((layer, gene, kind), lambda: roundtrip(dense, kind, imp))

    def _attention_output(self, layer: int, level: int, type_name: str) -> torch.Tensor:
        units, weight = self.db.level_weight(layer, ATTN, level)
        proj = output_projection(self.model, layer, ATTN)
        cols = unit_indices(units, self.structure.head_dim)
        written = self.layout.deci[layer][level]
        hd = self.structure.head_dim

        def make():
            compact = weight.float().cpu().numpy()
            if compact.shape[1] == 0:
                return np.zeros(tuple(proj.weight.shape), np.float32)
            laid = deci_output_columns(compact, written.query_slots, hd)
            kind = effective_type(type_name, laid.shape[-1])
            imp = self._imp(f"{layer}.o_in")
            imp = None if imp is None else deci_output_columns(imp[cols.numpy()][None, :], written.query_slots, hd)[0]
            back = model_output_columns(roundtrip(laid, kind, imp), written.query_slots, hd, len(units))
            return masked_weight(proj.weight.shape, cols, torch.from_numpy(back)).numpy()
        kind = effective_type(type_name, len(written.query_slots) * hd) if len(units) else "none"
        return self._roundtrip((layer, "o", level, kind), make)

    def _down(self, layer: int, level: int, type_name: str) -> torch.Tensor:
        units, weight = self.db.level_weight(layer, MLP, level)
        proj = output_projection(self.model, layer, MLP)
        kind = effective_type(type_name, max(len(units), 1))

        def make():
            if len(units) == 0:
                return np.zeros(tuple(proj.weight.shape), np.float32)
            imp = self._imp(f"{layer}.down_in")
            imp = None if imp is None else imp[units.numpy()]
            back = roundtrip(weight.float().cpu().numpy(), kind, imp)
            return masked_weight(proj.weight.shape, units, torch.from_numpy(back)).numpy()
        return self._roundtrip((layer, "down", level, kind), make)

    @torch.no_grad()
    def apply(self, genotype: dict) -> None:
        types = genotype["types"]
        for i, block in enumerate(self.model.model.layers):
            for module, genes in ((ATTN, ATTN_GENES), (MLP, MLP_GENES)):
                state = (genotype[module][i], *(types[g][i] for g in genes))
                if self.applied.get((i, module)) == state:
                    continue
                level = state[0]
                if module == ATTN:
                    attn = block.self_attn
                    for gene, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
                        proj.weight.copy_(self._rows(i, gene, types[gene][i]))
                    attn.o_proj.weight.copy_(self._attention_output(i, level, types["o"][i]))
                else:
                    mlp = block.mlp
                    for gene, proj in (("gate", mlp.gate_proj), ("up", mlp.up_proj)):
                        proj.weight.copy_(self._rows(i, gene, types[gene][i]))
                    mlp.down_proj.weight.copy_(self._down(i, level, types["down"][i]))
                self.applied[(i, module)] = state
                self.swaps += 1
        for gene, param in (("embd", self.model.model.embed_tokens.weight),
                            *((("output", self.model.lm_head.weight),) if not self.layout.tied else ())):
            kind = effective_type(types[gene][0], self.dense[gene].shape[-1])
            if self.applied.get(gene) != kind:
                imp = self._imp("output_in") if gene == "output" or self.layout.tied else None
                dense = self.dense[gene]
                param.copy_(self._roundtrip((gene, kind), lambda d=dense, k=kind, i=imp: roundtrip(d, k, i)))
                self.applied[gene] = kind
