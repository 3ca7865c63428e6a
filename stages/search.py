"""Stage search: the evolutionary search for per-module levels (DESIGN.md 2.3)."""
import pandas as pd

from pipeline import tracking
from pipeline.database import Database
from pipeline.modeling import load_dense
from pipeline.outputs import DATABASE, SEARCH_HISTORY, levels_path, write_json, write_text
from pipeline.plots import search_curve
from pipeline.search import LevelSwapper, evolve, kl_fitness, prunable_params, teacher_logprobs, uniform_levels
from pipeline.stage import load_tokens, model_source, run_stage


def main(params, say):
    p = params.search
    db = Database(DATABASE)
    model, _ = load_dense(model_source(params), params.model.dtype, params.model.revision)
    fitness_set, train_set = load_tokens("fitness"), load_tokens("train")
    vocab = model.config.vocab_size
    say(f"dense log-probs for {fitness_set.numel():,} fitness tokens x {vocab:,} vocab "
        f"({fitness_set.numel() * vocab * 4 / 2**20:,.0f} MiB)")
    teacher = teacher_logprobs(model, fitness_set, p.batch_size)
    start = uniform_levels(p.target, db.levels, db.structure.num_layers)
    dense = db.structure.dense_prunable_params
    kept = prunable_params(db, start)
    say(f"target {p.target:.0%} -> level sum {sum(start['attn'])} per type over {db.structure.num_layers} layers "
        f"(K={db.levels}); attention+MLP {dense:,} -> {kept:,} parameters ({1 - kept / dense:.1%} removed)")
    swapper = LevelSwapper(model, db)
    swapper.apply(start)
    start_fitness = kl_fitness(model, fitness_set, teacher, p.batch_size)

    def on_generation(record):
        tracking.log_metrics({k: v for k, v in record.items() if k != "generation"}, step=record["generation"])
        say(f"generation {record['generation']}/{p.generations}: fitness {record['fitness']:.5f}"
            f"{' (parent kept)' if record['parent_kept'] else ''}")

    state = evolve(swapper, start, p, fitness_set, teacher, train_set, on_generation)
    final_fitness = kl_fitness(model, fitness_set, teacher, p.batch_size)
    history = pd.DataFrame(state.history)
    write_text(SEARCH_HISTORY, history.to_csv(index=False))
    kept = prunable_params(db, state.parent)
    write_json(levels_path("searched"), {**state.parent, "prunable_params": kept, "removed_fraction": 1 - kept / dense})
    tracking.log_figure(search_curve(state.history), "search_curve.png")
    tracking.log_dict(state.parent, "levels.json")
    say(f"searched levels {state.parent['attn']} (attn) {state.parent['mlp']} (mlp); "
        f"KL on the whole fitness set {start_fitness:.5f} (uniform) -> {final_fitness:.5f}")
    return {"kl.uniform": start_fitness, "kl.searched": final_fitness, "generations": state.generation,
            "module_swaps": swapper.swaps, "removed_fraction": 1 - kept / dense}


if __name__ == "__main__":
    run_stage("search", ("search",), main)
