"""Stage uniform: the baseline with every module at (nearly) the same level, sized like the searched
model: `search.target` of the attention+MLP parameters removed, within `search.budget_tolerance`."""
from pipeline.pruning.database import Database
from pipeline.run.outputs import DATABASE, levels_path, write_json
from pipeline.run.stage import run_stage
from pipeline.search.evolution import prunable_params, uniform_at_size


def main(params, say, group):
    db = Database(DATABASE)
    levels = uniform_at_size(db, params.search.target, params.search.budget_tolerance)
    kept = prunable_params(db, levels)
    removed = 1 - kept / db.structure.dense_prunable_params
    say(f"uniform levels {levels['attn']} (attn) {levels['mlp']} (mlp): removes {removed:.1%} of attention+MLP")
    write_json(levels_path("uniform"), {**levels, "prunable_params": kept, "removed_fraction": removed})
    return {"removed_fraction": removed, "prunable_params": kept}


if __name__ == "__main__":
    run_stage("uniform", ("search",), main)
