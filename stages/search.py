"""Stage search: the evolutionary search for per-module levels (docs/method.md, section 3). Checkpoints every
generation (outside DVC's outputs) and resumes an interrupted search of the same inputs."""

import pandas as pd

from pipeline.data import load_tokens
from pipeline.errors import ConfigError
from pipeline.evaluate import perplexity
from pipeline.model.structure import count_params, dense_source
from pipeline.pruning.database import MANIFEST, open_with_dense_model
from pipeline.run import tracking
from pipeline.run.hashing import inputs_key
from pipeline.run.outputs import (
    DATABASE,
    SEARCH_CHECKPOINT,
    SEARCH_HISTORY,
    SEARCH_STRUCTURE,
    TOKENS,
    levels_path,
    write_json,
    write_text,
)
from pipeline.run.plots import layer_structure, search_curve
from pipeline.run.resources import gib, training_bytes
from pipeline.run.stage import run_stage
from pipeline.search.evolution import (
    LevelSwapper,
    SearchState,
    depth_levels,
    evolve,
    prunable_params,
    uniform_at_size,
)
from pipeline.search.fitness import fitness, teacher_bytes, teacher_targets


def main(params, say, group):
    p = params.search
    db, model, _ = open_with_dense_model(params, group.device)
    fitness_set, train_set, eval_set = load_tokens("fitness"), load_tokens("train"), load_tokens("eval")
    need = teacher_bytes(p.fitness, fitness_set.numel(), model.config.vocab_size, p.topk)
    weights = count_params(model) * model.dtype.itemsize
    say(f"needs per process: the dense model {gib(weights)} on {group.device.type}, dense targets ({p.fitness}) for "
        f"{fitness_set.numel():,} tokens {gib(need)} in CPU memory"
        + (f", a trained candidate at most {gib(training_bytes(count_params(model)))}"
           if p.tas else ""))
    teacher = teacher_targets(model, fitness_set, p.batch_size, p.fitness, p.topk)
    start = (depth_levels(p.target, db.levels, db.structure.num_layers) if p.space == "depth"
             else uniform_at_size(db, p.target, p.budget_tolerance))
    if p.space == "depth" and sum(start["attn"]) in (0, db.levels * db.structure.num_layers):
        raise ConfigError(f"search.target {p.target} removes {'no' if sum(start['attn']) == 0 else 'every'} "
                          f"sublayer of the {db.structure.num_layers} layers with search.space: depth; "
                          f"pick a target between {0.5 / db.structure.num_layers:.3f} and "
                          f"{1 - 0.5 / db.structure.num_layers:.3f}")
    dense = db.structure.dense_prunable_params
    kept = prunable_params(db, start)
    say(f"target {p.target:.0%} -> starts from the uniform levels (level sums {sum(start['attn'])} attention, "
        f"{sum(start['mlp'])} MLP over {db.structure.num_layers} layers, K={db.levels}); "
        f"attention+MLP {dense:,} -> {kept:,} parameters ({1 - kept / dense:.1%} removed); "
        f"budget: {p.budget}; training-aware selection: {'on' if p.tas else 'off'}")
    swapper = LevelSwapper(model, db)
    swapper.apply(start)
    start_fitness = fitness(model, fitness_set, teacher, p.batch_size) if group.is_main else None

    def on_generation(record, parent):
        if not group.is_main:
            return
        metrics = {k: v for k, v in record.items() if k != "generation"}
        if p.eval_every and record["generation"] % p.eval_every == 0:
            swapper.apply(parent)
            metrics["parent_eval_ppl"] = record["parent_eval_ppl"] = perplexity(model, eval_set, p.batch_size)
        tracking.log_metrics(metrics, step=record["generation"])
        survivors = "/".join(str(record[k]) for k in record if k.endswith("_survivors"))
        say(f"generation {record['generation']}/{p.generations}: fitness {record['fitness']:.5f}, "
            f"survivors {survivors}{' (parent kept)' if record['parent_kept'] else ''}"
            + (f", parent eval ppl {record['parent_eval_ppl']:.3f}" if "parent_eval_ppl" in record else ""))

    key = inputs_key({"search": p.model_dump(), "model": dense_source(params)},
                     (DATABASE / MANIFEST, TOKENS / "fitness.pt", TOKENS / "train.pt"))
    resumed = SearchState.load(SEARCH_CHECKPOINT, key)
    if resumed and resumed.generation >= p.generations:
        say(f"this exact search already finished ({SEARCH_CHECKPOINT}): reusing its result")
    elif resumed:
        say(f"resuming the interrupted search after generation {resumed.generation} ({SEARCH_CHECKPOINT})")
    state = evolve(swapper, start, p, fitness_set, teacher, train_set, on_generation, SEARCH_CHECKPOINT, key, group)
    if not group.is_main:
        return {}
    final_fitness = fitness(model, fitness_set, teacher, p.batch_size)
    write_text(SEARCH_HISTORY, pd.DataFrame(state.history).to_csv(index=False))
    kept = prunable_params(db, state.parent)
    write_json(levels_path("searched"), {**state.parent, "prunable_params": kept, "removed_fraction": 1 - kept / dense})
    tracking.log_figure(search_curve(state.history), "plots/search_curve.png")
    table = _structure_table(db, state.parent, start)
    write_text(SEARCH_STRUCTURE, table.to_csv(index=False))
    tracking.log_figure(layer_structure({kind: {"heads": list(table[f"heads_{kind}"]),
                                                "neurons": list(table[f"neurons_{kind}"])}
                                         for kind in ("searched", "uniform")},
                                        db.structure.num_heads, db.structure.intermediate_size),
                        "plots/layer_structure.png")
    tracking.log_dict(state.parent, "levels.json")
    say(f"searched levels {state.parent['attn']} (attn) {state.parent['mlp']} (mlp); "
        f"{p.fitness} on the whole fitness set {start_fitness:.5f} (uniform) -> {final_fitness:.5f}")
    return {"fitness.uniform": start_fitness, "fitness.searched": final_fitness, "generations": state.generation,
            "module_swaps": swapper.swaps, "removed_fraction": 1 - kept / dense}


def _structure_table(db, searched, uniform) -> pd.DataFrame:
    rows = []
    for layer in range(db.structure.num_layers):
        rows.append({"layer": layer,
                     "heads_searched": db.kept_count("attn", searched["attn"][layer]),
                     "heads_uniform": db.kept_count("attn", uniform["attn"][layer]),
                     "neurons_searched": db.kept_count("mlp", searched["mlp"][layer]),
                     "neurons_uniform": db.kept_count("mlp", uniform["mlp"][layer])})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    run_stage("search", ("search",), main)
