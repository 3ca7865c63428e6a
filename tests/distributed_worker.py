"""Run under `torchrun --nproc-per-node N` by tests/test_distributed.py: one piece of pipeline work
on a tiny model with N gloo processes, results written for the test to compare with one process."""
import contextlib
import json
import sys
from pathlib import Path

import torch
from helpers import (
    shipped,
    tiny_llama,
)

from pipeline.config import SelectionStage
from pipeline.model.materialize import materialize
from pipeline.model.structure import structure_of
from pipeline.pruning.database import Database, build_database
from pipeline.run import distributed
from pipeline.search.evolution import LevelSwapper, evolve, uniform_levels
from pipeline.search.fitness import teacher_targets
from pipeline.train import full_state_dict, train_causal_lm

TRAIN_LEVELS = {"attn": [1, 4, 2], "mlp": [4, 0, 3]}  # a layer without heads, one without neurons


def tokens(n=12, seed=1):
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))


def search_params():
    return shipped("search", target=0.5, generations=4, offspring=6, tas=True, train_lr=1e-3, batch_size=4, seed=3,
                   schedule=(SelectionStage(survivors=3, fitness_tokens=64, train_tokens=32),
                             SelectionStage(survivors=1, fitness_tokens=128, train_tokens=64)))


def build(out: Path, group):
    model = tiny_llama()
    build_database(model, structure_of(model), tokens(), 4, 0.01, out, {}, batch_size=5, group=group)


def search(db_path: Path, group):
    model, db = tiny_llama(), Database(db_path)
    fit, train = tokens(16, 2), tokens(16, 3)
    teacher = teacher_targets(model, fit, 4, "kl")
    start = uniform_levels(0.5, db.levels, db.structure.num_layers)
    state = evolve(LevelSwapper(model, db), start, search_params(), fit, teacher, train, group=group)
    return {"levels": state.parent, "fitness": [r["fitness"] for r in state.history]}


def train(db_path: Path, group, fsdp: bool, checkpoint: Path | None = None, on_step=None):
    dense, db = tiny_llama(), Database(db_path)
    model = materialize(dense, db.structure, db.weights_for(TRAIN_LEVELS))
    losses = train_causal_lm(model, tokens(24, 4), steps=6, batch_size=4, lr=1e-2, warmup_steps=2, seed=5,
                             teacher=dense, distill=0.5, group=group, fsdp=fsdp, checkpoint=checkpoint,
                             checkpoint_every=2, on_step=on_step)
    return losses, full_state_dict(model, fsdp)


class Interrupted(Exception):
    pass


def train_interrupted_then_resumed(db_path: Path, group, checkpoint: Path):
    """Sharded training stopped after step 4 (checkpointed at 4), then a fresh model resumes it."""
    def stop_after_step_4(step, _values):
        if step == 3:
            raise Interrupted
    with contextlib.suppress(Interrupted):
        train(db_path, group, True, checkpoint, stop_after_step_4)
    group.barrier()  # rank 0 has finished writing the checkpoint
    steps_run = []
    losses, weights = train(db_path, group, True, checkpoint, lambda step, _values: steps_run.append(step))
    return losses, weights, steps_run


if __name__ == "__main__":
    task, path = sys.argv[1], Path(sys.argv[2])
    group = distributed.init("cpu")
    if task == "database":
        build(path / "db", group)
    elif task == "search":
        result = search(path / "db", group)
        (path / f"search.rank{group.rank}.json").write_text(json.dumps(result))
    elif task == "fsdp_resumed":
        losses, weights, steps_run = train_interrupted_then_resumed(path / "db", group, path / "checkpoint.pt")
        if group.is_main:
            torch.save({"losses": losses, "weights": weights, "steps_run": steps_run}, path / f"{task}.pt")
    else:
        losses, weights = train(path / "db", group, fsdp=task == "fsdp")
        if group.is_main:
            torch.save({"losses": losses, "weights": weights}, path / f"{task}.pt")
    distributed.close()
