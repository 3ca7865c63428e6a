"""Stage evaluate: perplexity on the held-out eval set of the dense model, the searched and the
uniform models (one-shot and finetuned), sizes, and one self-contained MLflow run for comparison."""

import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import llama_cpp_speed, measure_speed, perplexity, ranges_apart, run_lm_eval
from pipeline.model.export import load_pruned
from pipeline.model.materialize import materialize
from pipeline.model.structure import count_params, dense_source
from pipeline.pruning.database import open_with_dense_model
from pipeline.run import tracking
from pipeline.run.outputs import GGUF, MODELS, levels_path, metrics_path, read_json
from pipeline.run.plots import baseline_panel, layer_structure, panel_table
from pipeline.run.resources import gib
from pipeline.run.stage import run_stage

UPSTREAM = ("base", "calibration", "database", "uniform", "search", "finetune@searched", "finetune@uniform",
            "baselines", "recovery", "export", "size_dense",
            "size_panel")  # evaluate runs last: it closes the pipeline's run


def main(params, say, group):
    batch = params.evaluate.batch_size
    eval_tokens = load_tokens("eval")
    db, dense, _ = open_with_dense_model(params, group.device)
    say(f"needs: the dense model {gib(count_params(dense) * dense.dtype.itemsize)} and two pruned models at most "
        f"as large on {group.device.type}; nothing large on disk")
    ppl = {"dense": perplexity(dense, eval_tokens, batch)}
    say(f"dense perplexity {ppl['dense']:.3f} on {eval_tokens.numel():,} eval tokens")
    sizes = {"dense": count_params(dense)}
    structures, finetuned_models = {}, {}
    for name in ("searched", "uniform"):
        levels = read_json(levels_path(name))
        oneshot = materialize(dense, db.structure, db.weights_for(levels))
        ppl[f"{name}_oneshot"] = perplexity(oneshot, eval_tokens, batch)
        finetuned = finetuned_models[name] = load_pruned(MODELS[name]).to(group.device)
        ppl[f"{name}_finetuned"] = perplexity(finetuned, eval_tokens, batch)
        sizes[name] = count_params(finetuned)
        structures[name] = {"heads": [len(r["q_heads"]) for r in finetuned.config.layers],
                            "neurons": [r["mlp"] for r in finetuned.config.layers]}
        say(f"{name}: one-shot {ppl[f'{name}_oneshot']:.3f}, finetuned {ppl[f'{name}_finetuned']:.3f}, "
            f"{sizes[name]:,} parameters")
    speed = _speeds(params.evaluate, {"dense": dense, "searched": finetuned_models["searched"],
                                      "uniform": finetuned_models["uniform"]}, say)
    engine_speed = _llama_cpp_speeds(params.evaluate, say)
    lm_eval = _lm_eval(params, say, group.device)
    upstream = {stage: read_json(metrics_path(stage)).get("mlflow_run_id") for stage in UPSTREAM}
    tracking.set_tags({f"upstream.{stage.replace('@', '_')}": run_id for stage, run_id in upstream.items() if run_id})
    tracking.log_figure(layer_structure(structures, db.structure.num_heads, db.structure.intermediate_size),
                        "plots/layer_structure.png")
    metrics = {
        "ppl": {"dense": ppl["dense"], "searched_oneshot": ppl["searched_oneshot"],
                "searched_finetuned": ppl["searched_finetuned"], "uniform_oneshot": ppl["uniform_oneshot"],
                "uniform_finetuned": ppl["uniform_finetuned"]},
        "gain_over_uniform": {"oneshot": ppl["uniform_oneshot"] / ppl["searched_oneshot"] - 1,
                              "finetuned": ppl["uniform_finetuned"] / ppl["searched_finetuned"] - 1},
        "params": {"dense": sizes["dense"], "pruned": sizes["searched"], "uniform": sizes["uniform"],
                   "ratio": sizes["searched"] / sizes["dense"]},
        "panel": _panel(ppl),
        **speed,
        **engine_speed,
        **lm_eval,
    }
    if metrics["panel"]:
        tracking.log_table(pd.DataFrame(panel_table(metrics["panel"])), "panel.json")
        tracking.log_figure(baseline_panel(metrics["panel"]), "plots/baselines.png")
    tracking.log_metrics({k: v for k, v in metrics.items() if k in ("ppl", "gain_over_uniform", "params", "speed",
                                                                     "speedup", "llama_cpp", "lm_eval", "panel")})
    tracking.log_pipeline_metrics({k: v for k, v in metrics.items() if k in ("ppl", "gain_over_uniform", "params",
                                                                              "speedup", "panel")})
    prefix = params.tracking.register_as
    for name in ("searched", "uniform"):  # logged models, with the metrics that describe them
        tracking.log_model(MODELS[name], f"pruned_{name}", register_as=f"{prefix}-{name}" if prefix else None,
                           metrics={"ppl_oneshot": ppl[f"{name}_oneshot"], "ppl_finetuned": ppl[f"{name}_finetuned"],
                                    "parameters": sizes[name]})
    return metrics


def _panel(ppl: dict) -> dict:
    """The baselines stage's rows (size, one-shot ppl, KL to dense per method), with the finetuned
    perplexities of the models this stage evaluated."""
    panel = read_json(metrics_path("baselines")).get("panel", {})
    for name in ("searched", "uniform"):
        if name in panel:
            panel[name]["ppl_finetuned"] = ppl[f"{name}_finetuned"]
    return panel


def _lm_eval(params, say, device) -> dict:
    p = params.evaluate
    if not p.lm_eval_tasks:
        return {}
    results = {}
    for name, folder in (("dense", dense_source(params)), ("searched", MODELS["searched"]),
                         ("uniform", MODELS["uniform"])):
        results[name] = run_lm_eval(folder, list(p.lm_eval_tasks), p.lm_eval_include_path, p.lm_eval_limit,
                                    p.batch_size, device=str(device), dtype=params.model.dtype,
                                    fewshot=p.lm_eval_fewshot)
        say(f"lm-eval {name}: {results[name]}")
    return {"lm_eval": results}


def _speeds(p, models: dict, say) -> dict:
    """Speed of each model on this device and the pruned models' speedups over dense."""
    if not p.speed:
        return {}
    speed = {}
    for name, model in models.items():
        speed[name] = measure_speed(model, batch_size=p.speed_batch_size, prompt_len=p.speed_prompt_len,
                                    decode_tokens=p.speed_decode_tokens, repeats=p.speed_repeats)
        say(f"speed {name}: prefill {speed[name]['prefill_tokens_per_s']:,.0f} tokens/s, decode "
            f"{speed[name]['decode_ms_per_token']:.2f} ms/token, peak {speed[name]['peak_memory_mb']:.1f} MiB")
    device = speed["dense"]["device"]
    tracking.set_tags({"device": device})
    figures = ("prefill_tokens_per_s", "decode_ms_per_token", "peak_memory_mb")
    dense = speed["dense"]
    return {
        "device": device,
        "speed": {name: {k: s[k] for k in figures} for name, s in speed.items()},
        "speedup": {name: {"prefill": speed[name]["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
                           "decode": dense["decode_ms_per_token"] / speed[name]["decode_ms_per_token"]}
                    for name in ("searched", "uniform")},
    }


def _llama_cpp_speeds(p, say) -> dict:
    """Speed of the exported GGUF files in llama.cpp, measured interleaved, with the speedups over dense,
    the speedup the file sizes lead to expect (decode reads every weight once per token), and whether
    the runs' spread leaves the speedup meaningful."""
    if not (p.speed and p.speed_gguf_type):
        return {}
    paths = {name: GGUF / f"{name}-{p.speed_gguf_type}.gguf" for name in ("dense", "searched", "uniform")}
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    for name in ("searched", "uniform"):
        say(f"llama.cpp {p.speed_gguf_type}: {name} is {sizes[name] / sizes['dense']:.1%} of dense's bytes: "
            f"expect up to {sizes['dense'] / sizes[name]:.2f}x decode where decode reads the weights from memory")
    measured = llama_cpp_speed(paths, prompt_len=p.speed_prompt_len, decode_tokens=p.speed_decode_tokens,
                               repeats=p.speed_repeats)
    dense = measured["dense"]
    speedup = {}
    for name in ("searched", "uniform"):
        m = measured[name]
        speedup[name] = {
            "prefill": m["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "decode": dense["decode_ms_per_token"] / m["decode_ms_per_token"],
            "expected_from_bytes": sizes["dense"] / sizes[name],
            # 1 when every run of one of the two beat every run of the other, 0 when their ranges overlap
            "prefill_beyond_spread": int(ranges_apart(m["prefill_times"], dense["prefill_times"])),
            "decode_beyond_spread": int(ranges_apart(m["decode_times"], dense["decode_times"]))}
    for name, m in measured.items():
        line = (f"llama.cpp {name}: prefill {m['prefill_tokens_per_s']:,.0f} tokens/s (spread "
                f"{m['prefill_spread']:.0%}), decode {m['decode_ms_per_token']:.2f} ms/token (spread "
                f"{m['decode_spread']:.0%})")
        if name in speedup:
            s = speedup[name]
            line += (f"; {s['prefill']:.2f}x prefill, {s['decode']:.2f}x decode"
                     + ("" if s["prefill_beyond_spread"] and s["decode_beyond_spread"] else
                        " (within the runs' spread: this machine's noise could explain the difference)"))
        say(line)
    figures = ("prefill_tokens_per_s", "decode_ms_per_token", "prefill_spread", "decode_spread")
    return {"llama_cpp": {"type": p.speed_gguf_type, "threads": dense["threads"], "bytes": sizes,
                          "speed": {name: {k: m[k] for k in figures} for name, m in measured.items()},
                          "speedup": speedup}}


if __name__ == "__main__":
    all_sections = ("model", "demo", "data", "database", "search", "finetune", "evaluate", "export", "tracking")
    run_stage("evaluate", all_sections, main, close_pipeline=True)
