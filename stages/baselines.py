"""Stage baselines: the neighbouring methods (`evaluate.baselines`) at the searched model's size: their
databases built from the same calibration set, their levels (levels/baselines/<name>.json), and one row per
method with the searched and uniform models beside them (size, one-shot eval perplexity, KL to dense on the
fitness set; eval perplexity after the same training as the searched model for `evaluate.finetune_baselines`)
in metrics/baselines.json, plots/baselines.csv and an MLflow table and chart."""

import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import perplexity
from pipeline.model.materialize import materialize
from pipeline.pruning.activation_stats import calibration_stats
from pipeline.pruning.database import Database, open_with_dense_model
from pipeline.pruning.scored import build_scored_database
from pipeline.run import tracking
from pipeline.run.outputs import (
    BASELINE_LEVELS,
    BASELINE_PANEL,
    BASELINES_WORK,
    atomic_dir,
    levels_path,
    read_json,
    write_json,
    write_text,
)
from pipeline.run.plots import baseline_panel
from pipeline.run.stage import run_stage
from pipeline.search.baselines import BASELINES, baseline_levels
from pipeline.search.evolution import prunable_params
from pipeline.search.fitness import fitness, teacher_targets
from pipeline.train import train_causal_lm


def main(params, say, group):
    p, names = params.evaluate, list(params.evaluate.baselines)
    db, dense, _ = open_with_dense_model(params, group.device)
    dense_prunable = db.structure.dense_prunable_params
    searched, uniform = read_json(levels_path("searched")), read_json(levels_path("uniform"))
    target = prunable_params(db, searched)
    slack = params.search.budget_tolerance * dense_prunable
    say(f"panel at the searched size: {target:,} of {dense_prunable:,} attention+MLP parameters "
        f"(± {slack:,.0f}); baselines: {', '.join(names) or 'none'}")
    dbs, influence = _databases(names, db, dense, params, group, say)
    entries = [("searched", db, searched), ("uniform", db, uniform)]
    with atomic_dir(BASELINE_LEVELS) as folder:
        for name in names:
            base_db = dbs[BASELINES[name]]
            levels = baseline_levels(name, base_db, target, slack, influence)
            kept = prunable_params(base_db, levels)
            write_json(folder / f"{name}.json", {**levels, "database": base_db.method, "prunable_params": kept,
                                                 "removed_fraction": 1 - kept / dense_prunable})
            entries.append((name, base_db, levels))

    eval_tokens, fitness_set = load_tokens("eval"), load_tokens("fitness")
    kind = "topk_kl" if params.search.fitness == "topk_kl" else "kl"
    teacher = teacher_targets(dense, fitness_set, p.batch_size, kind, params.search.topk)
    rows, train_tokens = [], None
    for name, base_db, levels in entries:
        levels = {m: levels[m] for m in ("attn", "mlp")}
        model = materialize(dense, base_db.structure, base_db.weights_for(levels))
        kept = prunable_params(base_db, levels)
        r = {"method": name, "database": base_db.method, "prunable_params": kept,
             "removed_fraction": 1 - kept / dense_prunable, "within_tolerance": abs(kept - target) <= slack,
             "ppl_oneshot": perplexity(model, eval_tokens, p.batch_size),
             "kl": fitness(model, fitness_set, teacher, p.batch_size),
             **{f"{m}_levels": " ".join(map(str, levels[m])) for m in ("attn", "mlp")}}
        say(f"{name} ({r['database']}): {r['removed_fraction']:.1%} removed, one-shot ppl {r['ppl_oneshot']:.3f}, "
            f"{kind} {r['kl']:.4f}" + ("" if r["within_tolerance"] else " (NOT within the size tolerance)"))
        if name in p.finetune_baselines:
            train_tokens = train_tokens if train_tokens is not None else load_tokens("train")
            r["ppl_finetuned"] = _finetuned_ppl(model, dense, params, train_tokens, eval_tokens)
            say(f"{name}: trained {params.finetune.steps} steps as the searched model is: eval ppl "
                f"{r['ppl_finetuned']:.3f}")
        rows.append(r)
        del model
    write_text(BASELINE_PANEL, pd.DataFrame(rows).to_csv(index=False))
    tracking.log_table(pd.DataFrame(rows), "baselines.json")
    tracking.log_figure(baseline_panel(rows), "plots/baselines.png")
    numbers = ("prunable_params", "removed_fraction", "within_tolerance", "ppl_oneshot", "kl", "ppl_finetuned")
    panel = {r["method"]: {k: r[k] for k in ("database", *numbers) if k in r} for r in rows}
    tracking.log_metrics({"panel": panel})
    return {"target_params": target, "kl_kind": kind, "panel": panel}


def _databases(names, db, dense, params, group, say) -> tuple[dict, list[float]]:
    """{database method: Database} for the named baselines ("main": the run's database), built from the
    calibration statistics when a method needs them; and the block influence (empty when not gathered)."""
    dbs = {"main": db}
    methods = sorted({BASELINES[n] for n in names} - {"main"})
    stats = None
    if set(methods) - {"magnitude"} or {"cfsp", "shortgpt"} & set(names):
        calib = load_tokens("calib")
        say(f"calibration statistics and block influence over {calib.numel():,} tokens, block by block")
        stats = calibration_stats(dense, calib, params.database.batch_size, group)
        say("block influence (1 - cos): " + ", ".join(f"{v:.3f}" for v in stats.block_influence))
    for method in methods:
        with atomic_dir(BASELINES_WORK / method) as work:
            build_scored_database(dense, db.structure, method, stats, db.levels, work, db.manifest["identity"],
                                  attn_unit=db.manifest.get("attn_unit", "query"),
                                  mlp_unit=db.manifest.get("mlp_unit", 1))
        dbs[method] = Database(BASELINES_WORK / method)
    return dbs, stats.block_influence if stats else []


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
