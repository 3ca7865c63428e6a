"""Seconds per generation of the demo's own search (training-aware selection on), median of 3 repeats of 4
generations, on the demo's outputs (run `dvc repro` first), with the current layout (`new`) or, run from a
checkout of commit 7175937 with this repo's base/, database/ and data/ linked in, the layout before it (`old`).
Prints the parent and fitness history, so the two can be checked to choose the same.

    python bench/search_generation_ab.py new
"""
import dataclasses
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")  # the checkout this is run from: the current layout, or the one before it
NEW = len(sys.argv) > 1 and sys.argv[1] == "new"
if NEW:
    from pipeline.config import load_params
    from pipeline.model.structure import load_dense
    from pipeline.pruning.database import Database
    from pipeline.search.evolution import LevelSwapper, evolve, uniform_levels
    from pipeline.search.fitness import teacher_targets
else:
    from pipeline.config import load_params
    from pipeline.database import Database
    from pipeline.fitness import teacher_targets
    from pipeline.modeling import load_dense
    from pipeline.search import LevelSwapper, evolve, uniform_levels

GENERATIONS, REPEATS = 4, 3


def main():
    params = load_params("params.yaml")
    if NEW:
        p = params.search.model_copy(update={"generations": GENERATIONS})
    else:
        p = dataclasses.replace(params.search, generations=GENERATIONS)
    db = Database("database")
    model, _ = load_dense("base/model")
    fitness_set, train_set = torch.load("data/tokens/fitness.pt"), torch.load("data/tokens/train.pt")
    teacher = teacher_targets(model, fitness_set, p.batch_size, p.fitness, p.topk)
    start = uniform_levels(p.target, db.levels, db.structure.num_layers)
    times = []
    for _ in range(REPEATS):
        swapper = LevelSwapper(model, db)
        swapper.apply(start)
        began = time.perf_counter()
        state = evolve(swapper, start, p, fitness_set, teacher, train_set)
        times.append((time.perf_counter() - began) / GENERATIONS)
    print("new" if NEW else "old", "median s/generation", round(statistics.median(times), 3),
          [round(t, 3) for t in times], state.parent, [h["fitness"] for h in state.history])


if __name__ == "__main__":
    main()
