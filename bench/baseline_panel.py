"""The baseline panel on a real model, outside DVC: the OBS database, the evolutionary search (the shipped
search params), and every baseline at the searched model's size, one-shot (eval perplexity, KL to dense on the
fitness set) and, for --finetune, after the shipped finetune training. Prints a markdown table for
bench/RESULTS.md and writes the rows as JSON. Quality, not speed: nothing here is timed.

    python bench/baseline_panel.py --model ../shared/data/stories260K --train ../shared/data/tinystories/train_head.txt \\
        --eval ../shared/data/tinystories/dev.txt --target 0.5 --finetune searched uniform flap shortgpt
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import load_params  # noqa: E402
from pipeline.data import eval_set, read_documents, split_train_sets, token_stream  # noqa: E402
from pipeline.evaluate import perplexity, units_perplexity  # noqa: E402
from pipeline.model.structure import load_dense, structure_of  # noqa: E402
from pipeline.pruning.activation_stats import calibration_stats  # noqa: E402
from pipeline.pruning.database import Database, build_database  # noqa: E402
from pipeline.run.distributed import SINGLE  # noqa: E402
from pipeline.search.baselines import BASELINES  # noqa: E402
from pipeline.search.evolution import LevelSwapper, evolve, prunable_params, uniform_at_size  # noqa: E402
from pipeline.search.fitness import fitness, teacher_targets  # noqa: E402
from pipeline.search.panel import Choice, choose  # noqa: E402
from pipeline.train import train_causal_lm  # noqa: E402


def main():
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--model", required=True)
    a.add_argument("--train", required=True)
    a.add_argument("--eval", required=True)
    a.add_argument("--target", type=float, default=0.5)
    a.add_argument("--seq-len", type=int, default=256)
    a.add_argument("--calib-tokens", type=int, default=16384)
    a.add_argument("--train-tokens", type=int, default=32768)
    a.add_argument("--eval-tokens", type=int, default=16384)
    a.add_argument("--generations", type=int, default=None, help="default: search.generations of params.yaml")
    a.add_argument("--finetune", nargs="*", default=[], help="rows to train with the finetune params too")
    a.add_argument("--out", default=None, help="JSON file for the rows")
    args = a.parse_args()
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    torch.manual_seed(0)
    model, tokenizer = load_dense(args.model)
    data = shipped.data.model_copy(update=dict(train=args.train, eval=args.eval, seq_len=args.seq_len,
                                               calib_tokens=args.calib_tokens, fitness_tokens=4096,
                                               train_tokens=args.train_tokens, eval_tokens=args.eval_tokens))
    sets = split_train_sets(token_stream(read_documents(data.train), tokenizer), data)
    evals = eval_set(token_stream(read_documents(data.eval), tokenizer), data)
    structure = structure_of(model)
    work = Path(tempfile.mkdtemp(prefix="panel-"))
    build_database(model, structure, sets["calib"], shipped.database.levels, shipped.database.damp, work / "obs", {},
                   batch_size=16)
    db = Database(work / "obs")

    search = shipped.search.model_copy(update={"target": args.target, **(
        {"generations": args.generations} if args.generations else {})})
    teacher = teacher_targets(model, sets["fitness"], 8, "kl")
    uniform = uniform_at_size(db, args.target, search.budget_tolerance)  # the pipeline's uniform stage
    swapper = LevelSwapper(model, db)
    swapper.apply(uniform)
    searched = evolve(swapper, uniform, search, sets["fitness"], teacher, sets["train"]).parent
    swapper.apply({m: [0] * structure.num_layers for m in ("attn", "mlp")})  # the dense model again

    stats = calibration_stats(model, sets["calib"], batch_size=16)
    target = prunable_params(db, searched)
    slack = search.budget_tolerance * structure.dense_prunable_params

    oneshot_ppl = units_perplexity(model, structure, sets["fitness"], 16)
    entries = [("searched", Choice("levels", searched)), ("uniform", Choice("levels", uniform))]
    entries += [(n, choose(n, db, model, stats, sets["calib"], target, slack, 16, SINGLE, oneshot_ppl)) for n in BASELINES]
    f = shipped.finetune
    rows = [{"method": "dense", "ppl_oneshot": perplexity(model, evals, 16), "kl": 0.0, "removed": 0.0}]
    for name, choice in entries:
        pruned, kept = choice.model(db, model), choice.size(db)
        row = {"method": name, "removed": 1 - kept / structure.dense_prunable_params,
               "within_tolerance": abs(kept - target) <= slack, "ppl_oneshot": perplexity(pruned, evals, 16),
               "kl": fitness(pruned, sets["fitness"], teacher, 8)}
        if name in args.finetune:
            train_causal_lm(pruned, sets["train"], steps=f.steps, batch_size=f.batch_size, lr=f.lr,
                            weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, seed=f.seed,
                            teacher=model if f.distill > 0 else None, distill=f.distill, temperature=f.temperature)
            row["ppl_finetuned"] = perplexity(pruned.eval(), evals, 16)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{Path(args.model).name}, target {args.target} ({search.generations} generations; "
          f"block influence {', '.join(f'{v:.3f}' for v in stats.block_influence)})\n")
    print("| method | removed | one-shot ppl | KL to dense | finetuned ppl |\n|---|---|---|---|---|")
    for r in rows:
        ft = f"{r['ppl_finetuned']:.2f}" if "ppl_finetuned" in r else ""
        print(f"| {r['method']} | {r['removed']:.1%} | {r['ppl_oneshot']:.2f} | {r['kl']:.4f} | {ft} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
