"""Stage finetune@<searched|uniform>: materialise the levels as a physically smaller model, train
it (causal-LM loss, optionally distilled from the dense model) and save a Hugging Face folder."""
import argparse

import pandas as pd

from pipeline.data import load_tokens
from pipeline.evaluate import perplexity
from pipeline.model.card import STRUCTURE_PNG, model_card
from pipeline.model.export import save_pruned
from pipeline.model.materialize import materialize
from pipeline.model.structure import count_params
from pipeline.pruning.database import MANIFEST, open_with_dense_model
from pipeline.run import tracking
from pipeline.run.hashing import inputs_key
from pipeline.run.outputs import (
    DATABASE,
    FINETUNE_WORK,
    MODELS,
    PLOTS,
    TOKENS,
    atomic_dir,
    levels_path,
    read_json,
    write_text,
)
from pipeline.run.plots import layer_structure, training_curve
from pipeline.run.resources import gib, require_disk, training_bytes
from pipeline.run.stage import run_stage
from pipeline.train import full_state_dict, train_causal_lm


def main(name, params, say, group):
    p = params.finetune
    levels = read_json(levels_path(name))
    db, dense, tokenizer = open_with_dense_model(params, group.device)
    model = materialize(dense, db.structure, db.weights_for(levels))
    train_set = load_tokens("train")
    eval_set = load_tokens("eval")
    oneshot_ppl = perplexity(model, eval_set, params.evaluate.batch_size) if group.is_main else None
    fsdp = params.compute.fsdp and group.world > 1
    say(f"{name}: {count_params(dense):,} -> {count_params(model):,} parameters; training {p.steps} steps "
        f"of {p.batch_size} x {train_set.shape[1]} tokens (distill {p.distill})"
        + (f" on {group.world} processes ({'FSDP' if fsdp else 'DDP'})" if group.world > 1 else ""))
    model_bytes = count_params(model) * model.dtype.itemsize
    checkpoint_bytes = training_bytes(count_params(model))  # also the training state
    say(f"needs per process: training state {gib(checkpoint_bytes // (group.world if fsdp else 1))}"
        + (f" + the dense teacher {gib(count_params(dense) * dense.dtype.itemsize)}" if p.distill > 0 else "")
        + f" on {group.device.type}; disk: the model {gib(model_bytes)} and a checkpoint {gib(checkpoint_bytes)}")
    require_disk(FINETUNE_WORK, checkpoint_bytes + model_bytes, "finetune (checkpoint and model)")

    def on_step(step, values):
        tracking.log_metrics(values, step=step)
        if step % 25 == 0 or step == p.steps - 1:
            say(f"step {step + 1}/{p.steps} loss {values['loss']:.4f}")

    # A checkpoint belongs to one training: these params, levels, database and training tokens.
    key = inputs_key(p.model_dump(), (levels_path(name), DATABASE / MANIFEST, TOKENS / "train.pt"))
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
    layers = model.config.layers
    shape = {"q": [r["q_heads"] for r in layers], "kv": [r["kv_heads"] for r in layers],
             "neurons": [r["mlp"] for r in layers]}
    card = model_card(params, name, levels, count_params(dense), count_params(model), results, shape)
    with atomic_dir(out) as tmp:
        save_pruned(model, tokenizer, tmp, card)
        structure = {name: {"heads": [len(q) for q in shape["q"]], "neurons": shape["neurons"]}}
        layer_structure(structure, db.structure.num_heads, db.structure.intermediate_size).savefig(
            tmp / STRUCTURE_PNG, dpi=100)
    write_text(PLOTS / f"finetune_{name}_loss.csv", pd.DataFrame({"step": range(1, len(losses) + 1),
                                                                  "loss": losses}).to_csv(index=False))
    if losses:
        tracking.log_figure(training_curve(losses, f"finetune {name}"), f"plots/finetune_{name}_loss.png")
    checkpoint.unlink(missing_ok=True)
    return {"parameters": count_params(model), "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "eval_ppl": results["pruned and trained"], "eval_ppl_oneshot": oneshot_ppl}


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("name", choices=sorted(MODELS))
    name = args.parse_args().name
    run_stage(f"finetune@{name}", ("finetune",), lambda params, say, group: main(name, params, say, group))
