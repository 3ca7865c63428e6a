"""What a generation of the file-size search costs against today's structure-only generation, on the run's own
model and database: the same selection schedule (search.*, training-aware selection off in both), the same
fitness set, one process; the structure-only search with the parameter budget and the LevelSwapper, the joint
search with the byte budget and the QuantSwapper (every changed tensor quantized by llama.cpp's quantizer and
read back, cached within size.cache_mb). Alternating blocks of generations, medians per generation; the
joint search's first generations (cold cache) reported apart.

Run in a workspace where `dvc repro size_dense` has run (database, tokens, size/dense), e.g. the SmolLM2 preset:
    .venv/bin/python bench/size_generation.py --budget q4_k_m --generations 4 --rounds 3
"""
import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import load_params  # noqa: E402
from pipeline.data import load_tokens  # noqa: E402
from pipeline.pruning.database import open_with_dense_model  # noqa: E402
from pipeline.quant.budget import file_layout  # noqa: E402
from pipeline.run.distributed import SINGLE  # noqa: E402
from pipeline.run.outputs import SIZE_DENSE, SIZE_IMPORTANCE, read_json  # noqa: E402
from pipeline.search.evolution import LevelSwapper, SearchState, evolve, uniform_at_size  # noqa: E402
from pipeline.search.fitness import teacher_targets  # noqa: E402
from pipeline.search.joint import QuantSwapper, Space, byte_offspring, ladder_order, start_genotype  # noqa: E402
from stages.size import budget_bytes  # noqa: E402


def timed_generations(swapper, state, p, fitness_set, teacher, count, propose=None):
    """Per-generation seconds of `count` generations continuing from `state` (the parent carries on)."""
    times = []
    for _ in range(count):
        state.generation += 1  # a fresh random stream each generation, as a running search has
        began = time.perf_counter()
        new = evolve(swapper, state.parent, p.model_copy(update={"generations": 1, "seed": state.generation}),
                     fitness_set, teacher, propose=propose)
        times.append(time.perf_counter() - began)
        state.parent = new.parent
    return times


def main():
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--budget", default="q4_k_m")
    args.add_argument("--generations", type=int, default=4, help="generations per block")
    args.add_argument("--rounds", type=int, default=3, help="alternating blocks per search")
    a = args.parse_args()
    params = load_params("params.yaml")
    db, model, tokenizer = open_with_dense_model(params, SINGLE.device)
    p = params.search.model_copy(update={"tas": False})
    fitness_set = load_tokens("fitness")
    teacher = teacher_targets(model, fitness_set, p.batch_size, p.fitness, p.topk)
    structure_model = copy.deepcopy(model)
    structure = LevelSwapper(structure_model, db)
    structure_state = SearchState(uniform_at_size(db, p.target, p.budget_tolerance), 0, random.Random(0))
    layout = file_layout(db, model, tokenizer, Path(".darwinlm/.bench-header.gguf"))
    budget = budget_bytes(a.budget, read_json(SIZE_DENSE / "sizes.json"))
    space = Space(layout, ladder_order(params.size.quant_types), db.levels, True, budget, p.budget_tolerance)
    joint = QuantSwapper(model, db, layout, load_file(str(SIZE_IMPORTANCE)), params.size.cache_mb * 2**20)
    joint_state = SearchState(start_genotype(space, db.structure.num_layers, random.Random(0)), 0, random.Random(0))

    def propose(parent, rng):
        return byte_offspring(parent, p.offspring, space, rng, p.max_level_switches)
    cold = timed_generations(joint, joint_state, p, fitness_set, teacher, 2, propose)
    times = {"structure": [], "joint": []}
    for _ in range(a.rounds):
        times["structure"] += timed_generations(structure, structure_state, p, fitness_set, teacher, a.generations)
        times["joint"] += timed_generations(joint, joint_state, p, fitness_set, teacher, a.generations, propose)
    s, j = statistics.median(times["structure"]), statistics.median(times["joint"])
    print(f"model {params.model.name_or_path}; {p.offspring} offspring, schedule "
          f"{[(st.survivors, st.fitness_tokens) for st in p.schedule]}, budget {a.budget} = {budget:,} bytes, "
          f"ladder {space.ladder}; {a.rounds} x {a.generations} generations each, alternating")
    print("| generation | median s | min | max |")
    print("|---|---|---|---|")
    print(f"| structure-only (parameter budget, LevelSwapper) | {s:.2f} | {min(times['structure']):.2f} | "
          f"{max(times['structure']):.2f} |")
    print(f"| joint (byte budget, QuantSwapper), warm | {j:.2f} | {min(times['joint']):.2f} | {max(times['joint']):.2f} |")
    print(f"| joint, first 2 generations (cold cache) | {statistics.median(cold):.2f} | {min(cold):.2f} | {max(cold):.2f} |")
    print(f"ratio joint / structure (medians): {j / s:.2f}x; tensors quantized {joint.quantized}, "
          f"cached {joint.cached_bytes / 2**20:.0f} MiB, layer swaps {joint.swaps}")


if __name__ == "__main__":
    main()
