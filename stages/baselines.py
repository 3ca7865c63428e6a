"""Stage baselines: the neighbouring methods (`evaluate.baselines`) at the searched model's size, each at its
own granularity (pipeline/search/baselines.py): their choices (levels/baselines/<name>.json: kept query heads
and neurons per layer, or levels for the database-based rows), and one row per method with the searched and
uniform models beside them (size, one-shot eval perplexity, KL to dense on the fitness set; eval perplexity
after the same training as the searched model for `evaluate.finetune_baselines`) in metrics/baselines.json,
plots/baselines.csv (one-shot and trained rows apart) and an MLflow table and chart."""

import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import perplexity, units_perplexity
from pipeline.pruning.activation_stats import calibration_stats
from pipeline.pruning.database import open_with_dense_model
from pipeline.run import tracking
from pipeline.run.outputs import (
    BASELINE_LEVELS,
    BASELINE_PANEL,
    atomic_dir,
    levels_path,
    read_json,
    write_json,
    write_text,
)
from pipeline.run.plots import baseline_panel, panel_table
from pipeline.run.stage import run_stage
from pipeline.search.evolution import prunable_params
from pipeline.search.fitness import fitness, teacher_targets
from pipeline.search.panel import NEEDS_STATS, Choice, choose
from pipeline.train import train_causal_lm


def main(params, say, group):
    p, names = params.evaluate, list(params.evaluate.baselines)
    db, dense, _ = open_with_dense_model(params, group.device)
    s = db.structure
    searched, uniform = read_json(levels_path("searched")), read_json(levels_path("uniform"))
    target = prunable_params(db, searched)
    slack = params.search.budget_tolerance * s.dense_prunable_params
    say(f"panel at the searched size: {target:,} of {s.dense_prunable_params:,} attention+MLP parameters "
        f"(± {slack:,.0f}); baselines: {', '.join(names) or 'none'}")
    calib = load_tokens("calib") if set(names) & (NEEDS_STATS | {"wanda_sp"}) else None
    stats = None
    if set(names) & NEEDS_STATS:
        say(f"calibration statistics and block influence over {calib.numel():,} tokens, block by block")
        stats = calibration_stats(dense, calib, params.database.batch_size, group)
        say("block influence (1 - cos): " + ", ".join(f"{v:.3f}" for v in stats.block_influence))
    fitness_set = load_tokens("fitness")

    oneshot_ppl = units_perplexity(dense, s, fitness_set, p.batch_size)
    choices = {"searched": Choice("levels", searched), "uniform": Choice("levels", uniform)}
    for name in names:
        choices[name] = choose(name, db, dense, stats, calib, target, slack, params.database.batch_size, group,
                               oneshot_ppl, say)
    with atomic_dir(BASELINE_LEVELS) as folder:
        for name in names:
            write_json(folder / f"{name}.json", choices[name].record(db))

    eval_tokens = load_tokens("eval")
    kind_kl = "topk_kl" if params.search.fitness == "topk_kl" else "kl"
    teacher = teacher_targets(dense, fitness_set, p.batch_size, kind_kl, params.search.topk)
    panel, train_tokens = {}, None
    for name, choice in choices.items():
        model, kept = choice.model(db, dense), choice.size(db)
        r = {"granularity": choice.granularity, "prunable_params": kept,
             "removed_fraction": 1 - kept / s.dense_prunable_params,
             "within_tolerance": abs(kept - target) <= slack,
             "ppl_oneshot": perplexity(model, eval_tokens, p.batch_size),
             "kl": fitness(model, fitness_set, teacher, p.batch_size),
             "attn_kept": " ".join(str(len(layer["q_heads"])) for layer in model.config.layers),
             "mlp_kept": " ".join(str(layer["mlp"]) for layer in model.config.layers)}
        say(f"{name} ({choice.granularity}): {r['removed_fraction']:.1%} removed, one-shot ppl {r['ppl_oneshot']:.3f}, "
            f"{kind_kl} {r['kl']:.4f}" + ("" if r["within_tolerance"] else " (NOT within the size tolerance)"))
        if name in p.finetune_baselines:
            train_tokens = train_tokens if train_tokens is not None else load_tokens("train")
            r["ppl_finetuned"] = _finetuned_ppl(model, dense, params, train_tokens, eval_tokens)
            say(f"{name}: trained {params.finetune.steps} steps as the searched model is: eval ppl "
                f"{r['ppl_finetuned']:.3f}")
        panel[name] = r
        del model
    table = pd.DataFrame(panel_table(panel))
    write_text(BASELINE_PANEL, table.to_csv(index=False))
    tracking.log_table(table, "baselines.json")
    tracking.log_figure(baseline_panel(panel), "plots/baselines.png")
    numbers = ("prunable_params", "removed_fraction", "within_tolerance", "ppl_oneshot", "kl", "ppl_finetuned")
    tracking.log_metrics({"panel": {n: {k: r[k] for k in numbers if k in r} for n, r in panel.items()}})
    return {"target_params": target, "kl_kind": kind_kl,
            "panel": {n: {k: v for k, v in r.items() if k not in ("attn_kept", "mlp_kept")} for n, r in panel.items()}}


def _finetuned_ppl(model, dense, params, train_tokens, eval_tokens) -> float:
    """Train the baseline's model with the finetune params (the searched model's training), one process."""
    f = params.finetune
    train_causal_lm(model, train_tokens, steps=f.steps, batch_size=f.batch_size, lr=f.lr,
                    weight_decay=f.weight_decay, warmup_steps=f.warmup_steps, seed=f.seed,
                    teacher=dense if f.distill > 0 else None, distill=f.distill, temperature=f.temperature)
    model.eval()
    return perplexity(model, eval_tokens, params.evaluate.batch_size)


if __name__ == "__main__":
    run_stage("baselines", ("database", "search", "finetune", "evaluate"), main)
