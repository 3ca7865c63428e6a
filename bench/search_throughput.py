"""Search throughput: the reference approach (deep-copy the dense model per candidate, load every
module's level as zero-filled full-size weights, train dense-shaped) against ours (swap only the
modules whose level changed; train candidates as physically smaller models).

Reports candidates scored per second and training tokens per second for both, as ratios measured
in one run (medians of repeats). Usage:

    .venv/bin/python bench/search_throughput.py [--hidden 512 --layers 8 --intermediate 1536 ...]
"""
import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.database import Database, build_database  # noqa: E402
from pipeline.fitness import fitness, teacher_targets  # noqa: E402
from pipeline.model.materialize import materialize  # noqa: E402
from pipeline.modeling import MODULE_TYPES, masked_weight, output_projection, structure_of  # noqa: E402
from pipeline.obs import column_indices  # noqa: E402
from pipeline.search import LevelSwapper, mutate, uniform_levels  # noqa: E402
from pipeline.train import train_causal_lm  # noqa: E402


def reference_candidate(dense, db, levels):
    """What the reference implementation does per candidate: a full copy with every module reloaded."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for module in MODULE_TYPES:
            for layer, level in enumerate(levels[module]):
                units, weight = db.level_weight(layer, module, level)
                proj = output_projection(model, layer, module)
                proj.weight.copy_(masked_weight(proj.weight.shape, column_indices(units, db.structure.unit_size(module)),
                                                weight))
    return model


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--hidden", type=int, default=512)
    args.add_argument("--layers", type=int, default=8)
    args.add_argument("--heads", type=int, default=8)
    args.add_argument("--kv-heads", type=int, default=4)
    args.add_argument("--intermediate", type=int, default=1536)
    args.add_argument("--vocab", type=int, default=4096)
    args.add_argument("--seq-len", type=int, default=128)
    args.add_argument("--fitness-seqs", type=int, default=8)
    args.add_argument("--train-steps", type=int, default=8)
    args.add_argument("--candidates", type=int, default=8)
    args.add_argument("--repeats", type=int, default=3)
    args.add_argument("--target", type=float, default=0.5)
    a = args.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=a.seq_len)
    dense = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, a.vocab, (max(16, a.fitness_seqs), a.seq_len))
    structure = structure_of(dense)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_database(dense, structure, tokens, 10, 0.01, Path(tmp), {}, batch_size=8)
        print(f"database for {a.layers} layers built in {time.perf_counter() - t:.1f}s", flush=True)
        db = Database(tmp)
        fit = tokens[: a.fitness_seqs]
        teacher = teacher_targets(dense, fit, 8, "kl")
        rng = random.Random(0)
        chain = [uniform_levels(a.target, 10, a.layers)]
        for _ in range(a.candidates - 1):
            chain.append(mutate(chain[-1], 10, rng, 3))
        for levels in chain:  # load every level once so both sides read from memory
            db.weights_for(levels)

        def reference_scoring():
            for levels in chain:
                fitness(reference_candidate(dense, db, levels), fit, teacher, 8)

        work = copy.deepcopy(dense)
        swapper = LevelSwapper(work, db)

        def our_scoring():
            for levels in chain:
                swapper.apply(levels)
                fitness(work, fit, teacher, 8)

        train_tokens = a.train_steps * a.seq_len

        def reference_training():
            train_causal_lm(reference_candidate(dense, db, chain[0]), tokens, steps=a.train_steps, batch_size=1,
                            lr=1e-5, constant_lr=True)

        def our_training():
            train_causal_lm(materialize(work, db.structure, db.weights_for(chain[0])), tokens, steps=a.train_steps,
                            batch_size=1, lr=1e-5, constant_lr=True)

        our_scoring()  # warm-up
        reference_training()
        rows = {}
        for name, fn, amount, unit in (("scoring, reference", reference_scoring, a.candidates, "candidates/s"),
                                       ("scoring, ours", our_scoring, a.candidates, "candidates/s"),
                                       ("training, reference", reference_training, train_tokens, "tokens/s"),
                                       ("training, ours", our_training, train_tokens, "tokens/s")):
            seconds = median_seconds(fn, a.repeats)
            rows[name] = amount / seconds
            print(f"{name:22s} {amount / seconds:10.2f} {unit}  (median of {a.repeats}: {seconds:.3f}s)", flush=True)
    print(f"shape: hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, MLP {a.intermediate}, "
          f"vocab {a.vocab}, target {a.target}; torch threads {torch.get_num_threads()}")
    print(f"ratio ours/reference: scoring {rows['scoring, ours'] / rows['scoring, reference']:.2f}x, "
          f"training {rows['training, ours'] / rows['training, reference']:.2f}x")


if __name__ == "__main__":
    main()
