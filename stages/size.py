"""Stage size@<budget>: the searches at one file-size budget (docs/method.md, "Size in bytes"), one per
`size.rows`: `joint` (structure levels and per-tensor GGUF types together), `quant` (types only, levels 0),
`structure` (levels only, every tensor `size.structure_type`) and `structure_q4_k_m` (levels only at q4_k,
then the pruned model quantized by llama.cpp's own q4_k_m, as a user would do). Each writes its genotype and
its GGUF to size/<budget>/<row>.{json,gguf}; the search checkpoints every generation and resumes."""
import contextlib
import copy
import json
import random
import sys

from safetensors.torch import load_file

from pipeline.config import parse_budget
from pipeline.data import load_tokens
from pipeline.errors import ConfigError
from pipeline.model.gguf_export import write_gguf
from pipeline.model.materialize import materialize
from pipeline.model.structure import dense_source
from pipeline.pruning.database import MANIFEST, open_with_dense_model
from pipeline.quant.budget import export_types, file_layout
from pipeline.quant.export import write_typed_gguf
from pipeline.quant.importance import export_importance
from pipeline.run import tracking
from pipeline.run.hashing import inputs_key
from pipeline.run.outputs import (
    DATABASE,
    SIZE,
    SIZE_DENSE,
    SIZE_IMPORTANCE,
    SIZE_WORK,
    TOKENS,
    atomic_dir,
    read_json,
    write_json,
    write_text,
)
from pipeline.run.stage import run_stage
from pipeline.search.evolution import evolve
from pipeline.search.fitness import fitness, teacher_targets
from pipeline.search.joint import (
    QuantSwapper,
    Space,
    byte_offspring,
    calibrated_errors,
    ladder_order,
    start_genotype,
    tensor_errors,
    uniform_genotype,
)


def budget_bytes(budget: str, sizes: dict) -> int:
    kind, value = parse_budget(budget)
    if kind == "bytes":
        return int(value)
    if kind == "fraction":
        return int(value * sizes["f16"])
    if value not in sizes:
        raise ConfigError(f"size.budgets: '{budget}' is a llama.cpp preset that size.presets does not make "
                          f"({', '.join(k for k in sizes if k != 'f16' and not k.endswith('imatrix'))}): add it there")
    return sizes[value]


def row_ladder(row: str, params) -> tuple[list[str], bool]:
    """(types best first, whether levels move) of one row."""
    s = params.size
    return {"joint": (ladder_order(s.quant_types), True), "quant": (ladder_order(s.quant_types), False),
            "structure": ([s.structure_type], True), "structure_q4_k_m": (["q4_k"], True)}[row]


def q4_k_m_ratio(layout, sizes: dict, num_layers: int) -> float:
    """How much smaller the dense model counts at q4_k everywhere (with fallbacks) than llama.cpp's q4_k_m of it
    is (q4_k_m keeps some tensors at q6_k / q8_0): the structure-then-q4_k_m row searches at the budget times
    this, so that llama.cpp's own q4_k_m of the pruned model comes out near the budget. 1 without the preset."""
    if "q4_k_m" not in sizes:
        return 1.0
    return layout.file_bytes(uniform_genotype(layout, num_layers, 0, "q4_k")) / sizes["q4_k_m"]


def type_errors(swapper, ladder, fitness_set, teacher, p, params, say, group) -> dict:
    """The calibrated error of every tensor at every ladder type (the byte searches' start), computed once per
    model, database and ladder and shared by every budget (kept beside the searches' checkpoints)."""
    key = inputs_key({"ladder": ladder, "fitness": p.fitness, "topk": p.topk, "model": dense_source(params)},
                     (DATABASE / MANIFEST, TOKENS / "fitness.pt", SIZE_IMPORTANCE))
    path = SIZE_WORK / f"type-errors-{key[:16]}.json"
    if path.is_file():
        return {tuple(json.loads(k)): v for k, v in json.loads(path.read_text()).items()}
    rows = max(1, 1024 // fitness_set.shape[1])
    say(f"calibrating the type errors ({len(ladder)} types) on {rows * fitness_set.shape[1]} fitness tokens")
    errors = calibrated_errors(tensor_errors(swapper, ladder), ladder, swapper,
                               lambda: fitness(swapper.model, fitness_set[:rows], teacher.subset(slice(0, rows)),
                                               p.batch_size), swapper.structure.num_layers)
    if group.is_main:
        write_text(path, json.dumps({json.dumps(list(k)): v for k, v in errors.items()}))
    return errors


def main(params, say, group):
    budget_name = sys.argv[1]
    given = [b for b in params.size.budgets if str(b) == budget_name]  # as typed in params.yaml (0.35 is no string)
    if not given:
        raise ConfigError(f"size budget '{budget_name}' is not in size.budgets ({params.size.budgets})")
    sizes = read_json(SIZE_DENSE / "sizes.json")
    budget = budget_bytes(given[0], sizes)
    db, model, tokenizer = open_with_dense_model(params, group.device)
    dense = copy.deepcopy(model)  # the search's model holds quantized weights; exports start from the dense ones
    importance = load_file(str(SIZE_IMPORTANCE))
    SIZE_WORK.mkdir(parents=True, exist_ok=True)
    layout = file_layout(db, model, tokenizer, SIZE_WORK / f".header-{budget_name}-{group.rank}.gguf")
    p = params.search.model_copy(update={"generations": params.size.generations, "tas": False,
                                         "schedule": params.size.schedule or params.search.schedule})
    fitness_set = load_tokens("fitness")
    teacher = teacher_targets(model, fitness_set, p.batch_size, p.fitness, p.topk)
    swapper = QuantSwapper(model, db, layout, importance, params.size.cache_mb * 2**20)
    errors = None
    if any(len(row_ladder(row, params)[0]) > 1 for row in params.size.rows):
        errors = type_errors(swapper, ladder_order(params.size.quant_types), fitness_set, teacher, p, params, say,
                             group)
    say(f"budget {budget_name}: {budget:,} bytes (dense f16 {sizes['f16']:,}), tolerance "
        f"{p.budget_tolerance:.1%}; rows {', '.join(params.size.rows)}; {p.generations} generations each")
    results = {}
    out = SIZE / str(budget_name)
    with atomic_dir(out) if group.is_main else contextlib.nullcontext() as tmp:
        for row in params.size.rows:
            ladder, move_levels = row_ladder(row, params)
            name = f"{params.model.name_or_path} {row} at {budget_name}"
            row_budget = budget
            if row == "structure_q4_k_m":  # aim the search so that llama.cpp's q4_k_m of its model lands on the budget
                row_budget = round(budget * q4_k_m_ratio(layout.named(name), sizes, db.structure.num_layers))
            space = Space(layout.named(name), ladder, db.levels, move_levels, row_budget, p.budget_tolerance)
            try:
                start = start_genotype(space, db.structure.num_layers, random.Random(p.seed), errors)
            except ValueError as error:
                say(f"{row}: cannot reach the budget ({error}); row skipped")
                results[row] = {"reachable": False}
                continue
            swapper.apply(start)
            start_fitness = fitness(model, fitness_set, teacher, p.batch_size)
            key = inputs_key({"search": p.model_dump(), "size": params.size.model_dump(), "row": row,
                              "budget": budget, "model": dense_source(params)},
                             (DATABASE / MANIFEST, TOKENS / "fitness.pt", SIZE_IMPORTANCE))

            def on_generation(record, parent, row=row):
                if group.is_main:
                    tracking.log_metrics({f"{row}.fitness": record["fitness"]}, step=record["generation"])
                    say(f"{row} generation {record['generation']}/{p.generations}: fitness {record['fitness']:.5f}")

            state = evolve(swapper, start, p, fitness_set, teacher, None, on_generation,
                           SIZE_WORK / f"{budget_name}-{row}.json", key, group,
                           propose=lambda parent, rng, space=space: byte_offspring(
                               parent, p.offspring, space, rng, p.max_level_switches))
            genotype = state.parent
            swapper.apply(genotype)
            final = fitness(model, fitness_set, teacher, p.batch_size)
            counted = space.layout.file_bytes(genotype)
            if not group.is_main:
                continue
            pruned = materialize(dense, db.structure, db.weights_for(genotype))
            path = tmp / f"{row}.gguf"
            if row == "structure_q4_k_m":
                report = write_gguf(pruned, tokenizer, path, "q4_k_m", name=name)
            else:
                report = write_typed_gguf(pruned, tokenizer, path, export_types(layout, genotype),
                                          export_importance(importance, db, genotype, layout.tied), name=name)
                if report.bytes != counted:
                    raise RuntimeError(f"{path}: {report.bytes:,} bytes written, {counted:,} counted by the search")
            results[row] = {"reachable": True, "bytes": report.bytes, "counted_bytes": counted,
                            "fitness_start": start_fitness, "fitness": final,
                            "within_tolerance": abs(report.bytes - budget) <= p.budget_tolerance * budget,
                            "replaced_types": len(report.replaced_types)}
            write_json(tmp / f"{row}.json", {
                "genotype": genotype, **results[row], "history": state.history, "tensor_types": report.tensor_types,
                "kept_heads": [db.kept_count("attn", lv) for lv in genotype["attn"]],
                "kept_neurons": [db.kept_count("mlp", lv) for lv in genotype["mlp"]],
                "dense_heads": db.structure.num_heads, "dense_neurons": db.structure.intermediate_size})
            say(f"{row}: {p.fitness} {start_fitness:.4f} (start) -> {final:.4f}; {report.bytes:,} bytes "
                f"({report.bytes / budget - 1:+.2%} of the budget)")
        if group.is_main:
            write_json(tmp / "budget.json", {"budget": budget_name, "bytes": budget,
                                             "tolerance": p.budget_tolerance, "rows": results})
    return {"budget_bytes": budget, "rows": results}


if __name__ == "__main__":
    run_stage(f"size@{sys.argv[1] if len(sys.argv) > 1 else ''}", ("search", "size"), main)
