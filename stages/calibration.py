"""Stage calibration: tokenize the corpora into the disjoint calib / fitness / train sets and the
held-out eval set, drawn once (seeded) and saved."""
import torch
from transformers import AutoTokenizer

from pipeline.data import eval_set, read_documents, split_train_sets, token_stream
from pipeline.model.structure import dense_source
from pipeline.run.outputs import DEMO_CORPUS, TOKENS, atomic_dir, write_json
from pipeline.run.resources import gib, require_disk
from pipeline.run.stage import run_stage


def main(params, say, group):
    tokenizer = AutoTokenizer.from_pretrained(dense_source(params), revision=params.model.revision)
    p = params.data
    sets = {}
    for source_key, split in (("train", "train"), ("eval", "eval")):
        # For a real model the validate stage has already checked these budgets with the same
        # functions; the demo corpus only exists now, so for the demo this is the first check.
        documents = read_documents(getattr(p, source_key), DEMO_CORPUS, split)
        stream = token_stream(documents, tokenizer)
        say(f"data.{source_key}: {len(documents):,} documents -> {len(stream):,} tokens")
        if source_key == "train":
            sets.update(split_train_sets(stream, p))
        else:
            sets["eval"] = eval_set(stream, p)
    need = sum(t.numel() * t.element_size() for t in sets.values())
    say(f"token sets take {gib(need)} on disk")
    require_disk(TOKENS.parent, need, "the token sets")
    with atomic_dir(TOKENS) as tmp:
        for name, tensor in sets.items():
            torch.save(tensor, tmp / f"{name}.pt")
        write_json(tmp / "summary.json", {name: list(t.shape) for name, t in sets.items()})
    return {f"tokens.{name}": t.numel() for name, t in sets.items()}


if __name__ == "__main__":
    run_stage("calibration", ("model", "data"), main)
