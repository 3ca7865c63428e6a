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

sys.path.insert(0, ".")
import torch

new = len(sys.argv) > 1 and sys.argv[1] == "new"
if new:
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
params = load_params("params.yaml")
p = params.search.model_copy(update={"generations": 4}) if new else dataclasses.replace(params.search, generations=4)
db = Database("database"); model, _ = load_dense("base/model")
fit, train = torch.load("data/tokens/fitness.pt"), torch.load("data/tokens/train.pt")
teacher = teacher_targets(model, fit, p.batch_size, p.fitness, p.topk)
start = uniform_levels(p.target, db.levels, db.structure.num_layers)
times, parents = [], []
for _ in range(3):
    sw = LevelSwapper(model, db); sw.apply(start)
    t = time.perf_counter(); state = evolve(sw, start, p, fit, teacher, train); times.append((time.perf_counter() - t) / 4)
    parents.append(state.parent)
print(("new" if new else "old"), "median s/generation", round(statistics.median(times), 3), [round(x, 3) for x in times], parents[0], [h["fitness"] for h in state.history])
