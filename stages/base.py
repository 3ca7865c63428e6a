"""Stage base: the dense model. Demo: pretrain the embedded default. Real model: record what
`model.name_or_path` resolves to (no weights are copied, except that a GGUF file is dequantized once)."""
import json

import torch

from pipeline.data import token_stream, windows
from pipeline.model.demo import pretrain_demo, stdlib_corpus, train_tokenizer
from pipeline.model.resolve import describe_model
from pipeline.model.structure import count_params, is_gguf, load_dense
from pipeline.run import tracking
from pipeline.run.hashing import inputs_key
from pipeline.run.outputs import BASE, BASE_MODEL, BASE_WORK, DEMO_CORPUS, RESOLVED, atomic_dir, write_json
from pipeline.run.plots import training_curve
from pipeline.run.stage import run_stage

# Steps between pretraining checkpoints: a kill loses at most this many (about 6 s of the default
# demo's 600 steps), and saving the ~1M-parameter model with its optimiser state costs milliseconds.
PRETRAIN_CHECKPOINT_EVERY = 50


def main(params, say, group):
    if not params.is_demo:
        resolved = describe_model(params.model)
        say(f"resolved {resolved['name_or_path']}: {resolved['parameters']:,} parameters")
        if not is_gguf(params.model.name_or_path):
            write_json(RESOLVED, resolved)
            return {"parameters": resolved["parameters"]}
        say("dequantizing the GGUF file once into base/model (float32), where the later stages load it from")
        model, tokenizer = load_dense(params.model.name_or_path)
        with atomic_dir(BASE) as tmp:
            model.save_pretrained(tmp / BASE_MODEL.name)
            tokenizer.save_pretrained(tmp / BASE_MODEL.name)
            (tmp / RESOLVED.name).write_text(json.dumps(resolved, indent=2, default=str))
        return {"parameters": resolved["parameters"]}
    p = params.demo
    torch.manual_seed(p.seed)
    train_docs, eval_docs, corpus = stdlib_corpus(p.corpus_bytes, p.eval_bytes)
    say(f"stdlib corpus: {corpus['train_files']} train files ({corpus['train_bytes']:,} B), "
        f"{corpus['eval_files']} eval files ({corpus['eval_bytes']:,} B)")
    tokenizer = train_tokenizer(train_docs, p.vocab_size)
    tokenizer.model_max_length = p.seq_len
    sequences = windows(token_stream(train_docs, tokenizer), p.seq_len)
    say(f"BPE vocabulary {len(tokenizer)}; {sequences.numel():,} training tokens; pretraining {p.steps} steps")

    def on_step(step, values):
        tracking.log_metrics(values, step=step)
        if step % 50 == 0 or step == p.steps - 1:
            say(f"pretrain step {step + 1}/{p.steps} loss {values['loss']:.3f}")

    # A checkpoint belongs to one pretraining: these demo params and this stdlib corpus (the
    # tokenizer and the sequences follow from the two).
    checkpoint = BASE_WORK / f"pretrain-{inputs_key({'demo': p.model_dump(), 'corpus': corpus['sha256']})}.pt"
    if checkpoint.is_file():
        say(f"resuming the interrupted pretraining from {checkpoint}")
    model, losses = pretrain_demo(p, sequences, tokenizer, on_step=on_step, checkpoint=checkpoint,
                                  checkpoint_every=PRETRAIN_CHECKPOINT_EVERY)
    with atomic_dir(BASE) as tmp:
        model.save_pretrained(tmp / BASE_MODEL.name)
        tokenizer.save_pretrained(tmp / BASE_MODEL.name)
        (tmp / DEMO_CORPUS.name).mkdir()
        for split, docs in (("train", train_docs), ("eval", eval_docs)):
            (tmp / DEMO_CORPUS.name / f"{split}.jsonl").write_text(
                "".join(json.dumps({"text": d}) + "\n" for d in docs))
        resolved = {"kind": "demo", "name_or_path": str(BASE_MODEL), "parameters": count_params(model),
                    "corpus": corpus, "config": model.config.to_dict()}
        (tmp / RESOLVED.name).write_text(json.dumps(resolved, indent=2, default=str))
    checkpoint.unlink(missing_ok=True)
    tracking.log_figure(training_curve(losses, "demo pretraining"), "plots/pretrain_loss.png")
    return {"parameters": count_params(model), "final_loss": sum(losses[-20:]) / len(losses[-20:])}


if __name__ == "__main__":
    run_stage("base", ("model", "demo"), main)
