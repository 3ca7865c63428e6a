"""Stage recovery (`recovery.enabled`): how many training tokens each method needs. The searched model, the
uniform one, Sheared-LLaMA's learned pruning (masks trained on the train set at the searched size; their
tokens are charged to it) and one one-shot baseline (`recovery.baseline`), all at the searched model's size,
are trained alike (the finetune params: distillation, lr, batch; a constant learning rate, so each point of a
curve is the same run at a budget) and evaluated on held-out text at log-spaced budgets.

Writes plots/recovery.csv (one row per budget: tokens, each method's perplexity), metrics/recovery.json (the
curves, the tokens each method needs to reach each final perplexity, and the headline: the searched model at
T tokens against Sheared at 5T) and MLflow metrics `recovery_ppl.<method>` with step = training tokens."""

import copy

import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import first_budget_reaching, perplexity, recovery_budgets, units_perplexity
from pipeline.model.materialize import materialize
from pipeline.pruning.activation_stats import calibration_stats
from pipeline.pruning.database import open_with_dense_model
from pipeline.pruning.sheared import ShearedMasks, fit_to_size, kept_and_weights, shear, size_under
from pipeline.run import tracking
from pipeline.run.outputs import levels_path, read_json, write_text
from pipeline.run.plots import recovery_curves
from pipeline.run.stage import run_stage
from pipeline.search.evolution import prunable_params
from pipeline.search.panel import NEEDS_STATS, choose
from pipeline.train import train_causal_lm

CURVES = "plots/recovery.csv"
COLUMNS = ("searched", "uniform", "sheared", "baseline")


def main(params, say, group):
    r = params.recovery
    if not r.enabled:
        write_text(CURVES, "tokens," + ",".join(COLUMNS) + "\n")
        say("recovery.enabled is false: no curves")
        return {"enabled": False}
    db, dense, _ = open_with_dense_model(params, group.device)
    s = db.structure
    target = prunable_params(db, read_json(levels_path("searched")))
    slack = params.search.budget_tolerance * s.dense_prunable_params
    train_tokens, eval_tokens = load_tokens("train"), load_tokens("eval")
    seq_len = train_tokens.shape[1]
    models = {name: materialize(dense, s, db.weights_for(read_json(levels_path(name))))
              for name in ("searched", "uniform")}
    models["sheared"], sheared_info = _sheared(dense, s, train_tokens, target, slack, params.sheared, say)
    models["baseline"] = _baseline(r.baseline, db, dense, target, slack, params, group, say)
    sizes = {name: _size(s, m) for name, m in models.items()}
    for name, size in sizes.items():
        say(f"{name}: {size:,} attention+MLP parameters ({size / target - 1:+.2%} of the searched size)")

    f, p = params.finetune, params.evaluate
    budgets = recovery_budgets(r.steps, r.points)
    tokens_per_step = f.batch_size * seq_len
    curves = {}
    for name, model in models.items():
        curve = {0: perplexity(model, eval_tokens, p.batch_size)}

        def evaluate(step, _info, model=model, curve=curve):
            if step + 1 in budgets:
                curve[(step + 1) * tokens_per_step] = perplexity(model, eval_tokens, p.batch_size)

        train_causal_lm(model, train_tokens, steps=budgets[-1], batch_size=f.batch_size, lr=f.lr,
                        weight_decay=f.weight_decay, seed=f.seed, constant_lr=True, on_step=evaluate,
                        teacher=dense if f.distill > 0 else None, distill=f.distill, temperature=f.temperature)
        curves[name] = curve
        say(f"{name}: " + ", ".join(f"{t:,} tokens {v:.3f}" for t, v in curve.items()))
        for tokens, value in curve.items():
            tracking.log_metrics({f"recovery_ppl.{name}": value}, step=tokens)
            tracking.log_pipeline_metrics({f"recovery_ppl.{name}": value}, step=tokens)
        del model

    table = pd.DataFrame({"tokens": sorted(curves["searched"]), **{n: [curves[n][t] for t in sorted(curves[n])]
                                                                   for n in COLUMNS}})
    write_text(CURVES, table.to_csv(index=False))
    tracking.log_figure(recovery_curves(curves, r.baseline, sheared_info["tokens"]), "plots/recovery.png")
    finals = {n: curves[n][max(curves[n])] for n in COLUMNS}
    reach = {n: {f"{m}_final": first_budget_reaching(curves[n], finals[m]) for m in COLUMNS} for n in COLUMNS}
    return {"enabled": True, "target_params": target, "baseline": r.baseline, "tokens_per_step": tokens_per_step,
            "params": sizes, "within_tolerance": {n: abs(v - target) <= slack for n, v in sizes.items()},
            "sheared": sheared_info, "curves": {n: {str(t): v for t, v in c.items()} for n, c in curves.items()},
            "budgets_steps": budgets, "tokens_to_reach": reach, "headline": _headline(curves)}


def _sheared(dense, structure, train_tokens, target, slack, p, say):
    """Sheared-LLaMA at `target`: masks and weights trained from a copy of the dense model, the final masks
    fitted to the tolerance and folded into a physically pruned model."""
    model = copy.deepcopy(dense)
    masks = ShearedMasks(structure, p.seed)
    say(f"sheared: training masks and weights {p.steps} steps of {p.batch_size} x {train_tokens.shape[1]} tokens "
        f"towards {target:,} attention+MLP parameters")

    def progress(step, info):
        if (step + 1) % max(1, p.steps // 4) == 0 or step + 1 == p.steps:
            say(f"sheared step {step + 1}/{p.steps}: loss {info['loss']:.4f}, expected removed "
                f"{info['expected_removed']:.3f} (target {info['target_removed']:.3f})")

    result = shear(model, masks, train_tokens, target, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                   mask_lr=p.mask_lr, warmup_steps=p.warmup_steps, seed=p.seed, on_step=progress)
    z, moved = fit_to_size(structure, result.masks, masks.log_alpha, target, slack)
    _, weights = kept_and_weights(model, structure, z)
    pruned = materialize(model, structure, weights)
    info = {"tokens": result.tokens, "steps": result.steps, "expected_removed": result.expected_removed[-1],
            "size_from_masks": size_under(structure, result.masks), "neurons_moved_to_fit": moved,
            "attn_layers_removed": int((z["attn_layer"] == 0).sum()),
            "mlp_layers_removed": int((z["mlp_layer"] == 0).sum())}
    say(f"sheared: {result.tokens:,} tokens; the masks keep {info['size_from_masks']:,} parameters, {moved} neurons "
        f"moved to land within the tolerance")
    return pruned, info


def _baseline(name, db, dense, target, slack, params, group, say):
    stats, calib = None, load_tokens("calib")
    if name in NEEDS_STATS:
        stats = calibration_stats(dense, calib, params.database.batch_size, group)

    oneshot_ppl = units_perplexity(dense, db.structure, load_tokens("fitness"), params.evaluate.batch_size)
    return choose(name, db, dense, stats, calib, target, slack, params.database.batch_size, group, oneshot_ppl,
                  say).model(db, dense)


def _size(structure, model) -> int:
    return sum(structure.kept_attention_params(layer["q_heads"]) + structure.mlp_params(layer["mlp"])
               for layer in model.config.layers)


def _headline(curves) -> list[dict]:
    """At every budget T whose 5T is also a budget: the searched model's perplexity at T and Sheared's at 5T
    (training tokens after pruning; Sheared's mask training is reported beside it, `sheared.tokens`)."""
    rows = []
    for t in sorted(curves["searched"]):
        if t and 5 * t in curves["sheared"]:
            rows.append({"tokens": t, "searched": curves["searched"][t], "sheared_at_5x": curves["sheared"][5 * t],
                         "searched_better": curves["searched"][t] < curves["sheared"][5 * t]})
    return rows


if __name__ == "__main__":
    run_stage("recovery", ("database", "search", "finetune", "evaluate", "sheared", "recovery"), main)
