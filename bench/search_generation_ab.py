"""Seconds per generation of the demo's own search (training-aware selection on), before and after, in one run.

Runs on the demo's outputs (`dvc repro` first). Three variants, interleaved (A B C A B C ...), each repeat a
fresh process measuring 6 generations from the uniform start with the old level-sum budget, so that all three
do the same work and must choose the same parents:

- `before`: commit 7175937 (the code when the speed issue was filed), checked out into a temporary git
  worktree with this repository's base/, database/ and data/ linked in, one process, torch's default threads;
- `after, 1 process`: the current code, one process (torch's default threads);
- `after, 2 processes`: the current code under torchrun with one process per core (the demo's compute.nproc),
  each scoring its share of every selection step's candidates.

    python bench/search_generation_ab.py [--repeats 3]

Prints the median s/generation of each, the ratio to `before`, and each variant's parents and fitness history.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BEFORE = "7175937"
GENERATIONS = 6
ROOT = Path(__file__).resolve().parents[1]

# Run inside each variant's checkout (cwd), so that its own `pipeline` package is imported.
MEASURE = f"""
import json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
from pipeline.config import load_params
new = os.path.isdir("pipeline/search")
if new:
    from pipeline.model.structure import load_dense
    from pipeline.pruning.database import Database
    from pipeline.run import distributed
    from pipeline.search.evolution import LevelSwapper, evolve, uniform_levels
    from pipeline.search.fitness import teacher_targets
    group = distributed.init("cpu")
    if group.world > 1:
        distributed.set_threads(None)
    p = load_params("params.yaml").search.model_copy(update={{"generations": {GENERATIONS}, "budget": "levels"}})
else:
    import dataclasses
    from pipeline.database import Database
    from pipeline.fitness import teacher_targets
    from pipeline.modeling import load_dense
    from pipeline.search import LevelSwapper, evolve, uniform_levels
    group = None
    p = dataclasses.replace(load_params("params.yaml").search, generations={GENERATIONS}, budget="levels")
db = Database("database")
model, _ = load_dense("base/model")
fitness_set, train_set = torch.load("data/tokens/fitness.pt"), torch.load("data/tokens/train.pt")
teacher = teacher_targets(model, fitness_set, p.batch_size, p.fitness, p.topk)
start = uniform_levels(p.target, db.levels, db.structure.num_layers)
swapper = LevelSwapper(model, db)
swapper.apply(start)
began = time.perf_counter()
state = evolve(swapper, start, p, fitness_set, teacher, train_set, **({{"group": group}} if group else {{}}))
seconds = (time.perf_counter() - began) / {GENERATIONS}
if group is None or group.is_main:
    print("RESULT", json.dumps({{"seconds": seconds, "parent": state.parent,
                                "fitness": [round(h["fitness"], 6) for h in state.history]}}))
if group is not None:
    distributed.close()
"""


def before_checkout(work: Path) -> Path:
    checkout = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), BEFORE],
                   check=True, capture_output=True)
    for name in ("base", "database", "data"):  # untracked outputs in that commit: link this repo's
        (checkout / name).symlink_to(ROOT / name)
    return checkout


def measure(cwd: Path, processes: int) -> dict:
    script = Path(tempfile.mkstemp(suffix=".py")[1])
    script.write_text(MEASURE)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    out = subprocess.run([*launcher, str(script)], cwd=cwd, capture_output=True, text=True, env=env, check=True)
    script.unlink()
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for needed in ("base/model", "database", "data/tokens/train.pt"):
        if not (ROOT / needed).exists():
            sys.exit(f"{needed} is missing: run `dvc repro` first")
    with tempfile.TemporaryDirectory() as tmp:
        before = before_checkout(Path(tmp))
        try:
            variants = {"before (7175937), 1 process": (before, 1), "after, 1 process": (ROOT, 1),
                        "after, 2 processes": (ROOT, 2)}
            runs = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, (cwd, processes) in variants.items():
                    runs[name].append(measure(cwd, processes))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    reference = statistics.median(r["seconds"] for r in runs["before (7175937), 1 process"])
    print("| code | s / generation (median) | repeats | speedup |\n|---|---|---|---|")
    for name, results in runs.items():
        seconds = [r["seconds"] for r in results]
        median = statistics.median(seconds)
        print(f"| {name} | {median:.3f} | {', '.join(f'{s:.3f}' for s in seconds)} | {reference / median:.2f}x |")
    for name, results in runs.items():
        print(f"{name}: parent {results[-1]['parent']}, fitness {results[-1]['fitness']}")


if __name__ == "__main__":
    main()
