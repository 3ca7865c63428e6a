"""Stage finetune@<searched|uniform>: materialise the levels as a physically smaller model, train
it (causal-LM loss, optionally distilled from the dense model) and save a Hugging Face folder."""
import argparse
import dataclasses

import pandas as pd

from pipeline.run import tracking
from pipeline.database import MANIFEST, Database
from pipeline.export import save_pruned
from pipeline.modeling import count_params, load_dense, materialize
from pipeline.evaluate import perplexity
from pipeline.model_card import STRUCTURE_PNG, model_card
from pipeline.outputs import (DATABASE, FINETUNE_WORK, MODELS, PLOTS, TOKENS, atomic_dir, inputs_key, levels_path,
                              read_json, write_text)
from pipeline.plots import layer_structure, training_curve
from pipeline.stage import load_tokens, model_source, run_stage
from pipeline.resources import gib, require_disk, training_bytes
from pipeline.train import full_state_dict, train_causal_lm


def main(name, params, say, group):
    p = params.finetune
    levels = read_json(levels_path(name))
    db = Database(DATABASE)
    dense, tokenizer = load_dense(model_source(params), params.model.dtype, params.model.revision)
    db.check_model(dense)
    dense.to(group.device)
    model = materialize(dense, db.structure, db.weights_for(levels))
    train_set = load_tokens("train")
    eval_set = load_tokens("eval")
    oneshot_ppl = perplexity(model, eval_set, params.evaluate.batch_size) if group.is_main else None
    fsdp = params.compute.fsdp and group.world > 1
    say(f"{name}: {count_params(dense):,} -> {count_params(model):,} parameters; training {p.steps} steps "
        f"of {p.batch_size} x {train_set.shape[1]} tokens (distill {p.distill})"
        + (f" on {group.world} processes ({'FSDP' if fsdp else 'DDP'})" if group.world > 1 else ""))
    model_bytes = count_params(model) * model.dtype.itemsize
    checkpoint_bytes = training_bytes(count_params(model), model.dtype.itemsize)  # also the training state
    say(f"needs per process: training state {gib(checkpoint_bytes // (group.world if fsdp else 1))}"
        + (f" + the dense teacher {gib(count_params(dense) * dense.dtype.itemsize)}" if p.distill > 0 else "")
        + f" on {group.device.type}; disk: the model {gib(model_bytes)} and a checkpoint {gib(checkpoint_bytes)}")
    require_disk(FINETUNE_WORK, checkpoint_bytes + model_bytes, "finetune (checkpoint and model)")

    def on_step(step, values):
        tracking.log_metrics(values, step=step)
        if step % 25 == 0 or step == p.steps - 1:
            say(f"step {step + 1}/{p.steps} loss {values['loss']:.4f}")

    # A checkpoint belongs to one training: these params, levels, database and training tokens.
    key = inputs_key(dataclasses.asdict(p), (levels_path(name), DATABASE / MANIFEST, TOKENS / "train.pt"))
    checkpoint = FINETUNE_WORK / f"{name}-{key}.pt"
    if checkpoint.is_file():
        say(f"resuming the interrupted training from {checkpoint}")
    losses = train_causal_lm(model, train_set, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                             weight_decay=p.weight_decay, warmup_steps=p.warmup_steps, seed=p.seed,
                             teacher=dense if p.distill > 0 else None, distill=p.distill,
                             temperature=p.temperature, on_step=on_step, checkpoint=checkpoint,
                             checkpoint_every=p.checkpoint_every, group=group, fsdp=fsdp)
    if fsdp:  # the trained model is sharded: every rank helps gather it, rank 0 keeps it
        weights = full_state_dict(model, fsdp)
    if not group.is_main:
        return {}
    if fsdp:
        model = materialize(dense, db.structure, db.weights_for(levels))
        model.load_state_dict(weights)
    model.eval()
    results = {"dense": perplexity(dense, eval_set, params.evaluate.batch_size),
               "one-shot (before training)": oneshot_ppl,
               "pruned and trained": perplexity(model, eval_set, params.evaluate.batch_size)}
    say(f"eval perplexity: dense {results['dense']:.3f}, one-shot {oneshot_ppl:.3f}, "
        f"trained {results['pruned and trained']:.3f}")
    out = MODELS[name]
    shape = {"q": model.config.layer_q_heads, "kv": model.config.layer_kv_heads,
             "neurons": model.config.layer_intermediate_sizes}
    card = model_card(params, name, levels, count_params(dense), count_params(model), results, shape)
    with atomic_dir(out) as tmp:
        save_pruned(model, tokenizer, tmp, card)
        structure = {name: {"heads": [len(h) for h in model.config.layer_q_heads],
                            "neurons": list(model.config.layer_intermediate_sizes)}}
        layer_structure(structure, db.structure.num_heads, db.structure.intermediate_size).savefig(
            tmp / STRUCTURE_PNG, dpi=100)
    write_text(PLOTS / f"finetune_{name}_loss.csv", pd.DataFrame({"step": range(1, len(losses) + 1),
                                                                  "loss": losses}).to_csv(index=False))
    if losses:
        tracking.log_figure(training_curve(losses, f"finetune {name}"), f"finetune_{name}_loss.png")
    tracking.log_artifacts(out, f"model_{name}")
    checkpoint.unlink(missing_ok=True)
    return {"parameters": count_params(model), "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "eval_ppl": results["pruned and trained"], "eval_ppl_oneshot": oneshot_ppl}


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("name", choices=sorted(MODELS))
    name = args.parse_args().name
    run_stage(f"finetune@{name}", ("finetune",), lambda params, say, group: main(name, params, say, group),
              multiprocess=True)
